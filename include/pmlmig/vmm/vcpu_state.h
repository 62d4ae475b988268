// Architectural state of a VM and its vCPUs, as a migration needs it, and its
// serialized form. The wire format is owned here and documented at the top of
// vmm/vcpu_state.cc; the transport carries it as an opaque, versioned blob.
//
// Capture and restore are called with the vCPUs out of KVM_RUN (paused or not
// yet started) by the thread that owns the Machine.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "pmlmig/base/status.h"

namespace pmlmig::vmm {

struct VcpuState {
  uint32_t id = 0;
  kvm_regs regs{};
  kvm_sregs sregs{};
  kvm_fpu fpu{};
  std::vector<uint8_t> xsave;            // KVM_GET_XSAVE(2) area; empty if unsupported
  kvm_xcrs xcrs{};
  bool has_xcrs = false;
  std::vector<kvm_msr_entry> msrs;       // every MSR KVM reports as saveable (incl. TSC)
  std::optional<kvm_lapic_state> lapic;  // only with an in-kernel irqchip
  kvm_vcpu_events events{};
  kvm_mp_state mp_state{};
  kvm_debugregs debugregs{};
};

struct VmState {
  kvm_clock_data clock{};                // KVM_GET_CLOCK
  uint32_t tsc_khz = 0;                  // KVM_GET_TSC_KHZ of vCPU 0; checked on restore
  bool irqchip = false;
  kvm_irqchip pic_master{};              // KVM_GET_IRQCHIP, only with an irqchip
  kvm_irqchip pic_slave{};
  kvm_irqchip ioapic{};
};

struct MachineState {
  VmState vm;
  std::vector<VcpuState> vcpus;
};

// Ioctl-level capture and restore. `msr_indices` is Kvm::MsrIndexList();
// `xsave_size` is KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) (0 -> legacy 4096-byte
// KVM_GET_XSAVE). Errors name the ioctl, the vCPU and errno.
Result<VcpuState> CaptureVcpuState(int vcpu_fd, uint32_t id,
                                   const std::vector<uint32_t>& msr_indices, bool irqchip,
                                   size_t xsave_size);
Status RestoreVcpuState(int vcpu_fd, const VcpuState& state);
Result<VmState> CaptureVmState(int vm_fd, int vcpu0_fd, bool irqchip);
Status RestoreVmState(int vm_fd, const VmState& state);

// Versioned, explicit little-endian encoding (see vmm/vcpu_state.cc).
std::vector<uint8_t> EncodeMachineState(const MachineState& state);
// Rejects wrong magic or version, truncation, trailing bytes, absurd counts
// and sizes, with a message naming the problem and its offset.
Result<MachineState> DecodeMachineState(std::span<const uint8_t> bytes);

}  // namespace pmlmig::vmm
