// VM exits, decoded in one place. DecodeExit turns the kvm_run page into an
// ExitEvent (validating every offset KVM gave us); HandleExit maps an event to
// what the vCPU loop does next, calling an ExitHandler for the exits that need
// the VMM (port I/O, HLT, a full dirty ring). Both are free functions so unit
// tests drive them with made-up exits.
#pragma once

#include <linux/kvm.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "pmlmig/base/status.h"

namespace pmlmig::vmm {

#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif

enum class ExitKind {
  kIo,
  kMmio,
  kHlt,
  kShutdown,
  kFailEntry,
  kInternalError,
  kDirtyRingFull,
  kIntr,           // KVM_EXIT_INTR: a signal, nothing to do
  kSystemEvent,
  kMalformed,      // KVM gave offsets outside the run page: never touch the data
  kUnknown,
};

struct ExitEvent {
  ExitKind kind = ExitKind::kUnknown;
  uint32_t reason = 0;  // kvm_run::exit_reason
  // kIo: direction, port, access size (1, 2, 4), repeat count, and the data
  // inside the run page (validated to lie within it).
  bool io_out = false;
  uint16_t port = 0;
  uint8_t size = 0;
  uint32_t count = 0;
  uint8_t* data = nullptr;
  // kMmio
  uint64_t mmio_addr = 0;
  uint32_t mmio_len = 0;
  bool mmio_write = false;
  // kFailEntry / kInternalError / kSystemEvent
  uint64_t hw_reason = 0;
  uint32_t suberror = 0;

  // The first element of an IO OUT, little-endian, zero-extended.
  uint64_t io_value() const;
};

// `run_size` is the size of the kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
ExitEvent DecodeExit(kvm_run* run, size_t run_size);
// "IO out port 0x504 size 4 count 1", "SHUTDOWN", ...
std::string DescribeExit(const ExitEvent& e);

// What the vCPU loop does after an exit.
struct ExitAction {
  enum Kind { kContinue, kStop } kind = kContinue;
  Status error;  // why the vCPU stopped (kStop only)
  static ExitAction Continue() { return {}; }
  static ExitAction Stop(Status s) { return {kStop, std::move(s)}; }
};

// The VMM side of exit handling. Called on the vCPU's own thread.
class ExitHandler {
 public:
  virtual ~ExitHandler() = default;
  virtual ExitAction OnPortOut(uint32_t vcpu, uint16_t port, uint8_t size, uint64_t value) = 0;
  virtual ExitAction OnHalt(uint32_t vcpu) = 0;
  virtual ExitAction OnDirtyRingFull(uint32_t vcpu) = 0;
};

// Port reads return all ones (no device, as on a PC); MMIO, shutdown, entry
// failures, internal errors and unknown exits stop the vCPU with an error
// naming the vCPU and the exit.
ExitAction HandleExit(uint32_t vcpu, const ExitEvent& e, ExitHandler& handler);

}  // namespace pmlmig::vmm
