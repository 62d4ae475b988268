// Vm: the one owner of a KVM VM fd and of its memslot table.
//
// Thread-safety: create vCPUs and change slots from one thread (the Machine's
// owner) while no vCPU runs; fd() may be used from any thread.
#pragma once

#include <cstdint>
#include <memory>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/vmm/guest_memory.h"
#include "pmlmig/vmm/kvm.h"
#include "pmlmig/vmm/vcpu.h"

namespace pmlmig::vmm {

struct VmOptions {
  bool irqchip = true;            // in-kernel PIC/IOAPIC/LAPIC (KVM_CREATE_IRQCHIP)
  uint32_t dirty_ring_bytes = 0;  // 0 = no dirty ring; else enabled before any vCPU
  bool dirty_ring_acq_rel = true; // prefer KVM_CAP_DIRTY_LOG_RING_ACQ_REL when available
};

class Vm {
 public:
  static Result<std::unique_ptr<Vm>> Create(const Kvm& kvm, const VmOptions& options);

  int fd() const { return fd_.get(); }
  bool irqchip() const { return options_.irqchip; }
  uint32_t dirty_ring_bytes() const { return options_.dirty_ring_bytes; }
  const engine::SlotTable& slots() const { return slots_; }

  // The one function that changes memslots: checks overlap with the table,
  // then KVM_SET_USER_MEMORY_REGION, then records the slot.
  Status SetMemorySlot(const engine::MemorySlot& slot);
  // One slot per region of `memory` (slot ids 0, 1, ...).
  Status AddMemory(const GuestMemory& memory, uint32_t flags);

  // KVM_CREATE_VCPU, mmap of kvm_run, KVM_SET_CPUID2 with `cpuid`.
  Result<std::unique_ptr<Vcpu>> CreateVcpu(const Kvm& kvm, uint32_t id,
                                           const std::vector<kvm_cpuid_entry2>& cpuid);

 private:
  UniqueFd fd_;
  VmOptions options_;
  engine::SlotTable slots_;
};

}  // namespace pmlmig::vmm
