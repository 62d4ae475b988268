// VmControl: what the engine needs from the VMM that runs the guest. vmm/
// implements it (vmm::Machine); a larger VMM embedding pmlmig implements it
// for its own VMs. The engine depends on nothing else of the VMM.
//
// Thread-safety: every method from the engine's controlling thread, except
// the ring-full handler and the throttle hook, which the VMM calls on a vCPU
// thread, and KickVcpu, from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {

class VmControl {
 public:
  virtual ~VmControl() = default;

  // Guest memory as memslots (host addresses valid while the VM lives).
  virtual const SlotTable& memory_slots() const = 0;
  virtual int vm_fd() const = 0;
  virtual uint32_t vcpu_count() const = 0;
  virtual int vcpu_fd(uint32_t vcpu) const = 0;
  // Entries per vCPU dirty ring (enabled before the vCPUs were created), 0
  // when the VM has no dirty ring.
  virtual uint32_t dirty_ring_entries() const = 0;
  // The file and offset behind a memslot's memory, when it is file-backed
  // (a memfd): lets a migration skip holes (never-touched memory) without
  // reading them. nullopt: unknown, read everything.
  struct Backing {
    int fd = -1;
    uint64_t offset = 0;
  };
  virtual std::optional<Backing> slot_backing(uint32_t slot) const {
    (void)slot;
    return std::nullopt;
  }
  // Sets or clears KVM_MEM_LOG_DIRTY_PAGES on every memslot.
  virtual Status SetDirtyLogging(bool on) = 0;

  // Every vCPU out of KVM_RUN and parked / running again. Resume on a VM
  // whose vCPUs never ran starts them.
  virtual Status Pause() = 0;
  virtual Status Resume() = 0;
  // Returns once every running vCPU has left guest mode at least once since
  // the call (which flushes PML buffers into the dirty rings).
  virtual Status KickAll() = 0;
  // Called on the vCPU's thread on KVM_EXIT_DIRTY_RING_FULL; returns once the
  // ring has room again (or an error, which stops that vCPU).
  virtual void SetDirtyRingFullHandler(std::function<Status(uint32_t vcpu)> handler) = 0;

  // Throttling, for dirty-limit and auto-converge (optional: the defaults say
  // "not supported", and the engine then refuses those modes).
  //
  // The VMM calls `hook` on a vCPU's thread each time before that vCPU enters
  // KVM_RUN, and keeps the vCPU out of guest mode for the time it returns
  // (0: enter at once). A pause or stop of the vCPU ends the wait early.
  // nullptr removes the hook; once that call returns the hook is never called
  // again. Returns false when the VMM cannot throttle.
  using ThrottleHook = std::function<std::chrono::nanoseconds(uint32_t vcpu)>;
  virtual bool SetVcpuThrottleHook(ThrottleHook hook) {
    (void)hook;
    return false;
  }
  // Makes `vcpu` leave guest mode soon (so the hook runs), without waiting
  // for it. Any thread.
  virtual void KickVcpu(uint32_t vcpu) { (void)vcpu; }

  // The architectural state of the VM and every vCPU, as an opaque,
  // versioned blob (vCPUs paused).
  virtual Result<std::vector<uint8_t>> SaveState() = 0;
  virtual Status LoadState(std::span<const uint8_t> state) = 0;
};

}  // namespace pmlmig::engine
