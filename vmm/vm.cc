#include "pmlmig/vmm/vm.h"

#include <sys/mman.h>

#include <cstring>
#include <memory>

#include "ioctl.h"
#include "kvm_abi.h"

namespace pmlmig::vmm {

Result<std::unique_ptr<Vm>> Vm::Create(const Kvm& kvm, const VmOptions& options) {
  auto vm = std::unique_ptr<Vm>(new Vm());
  vm->options_ = options;
  auto fd = PMLMIG_KVM(kvm.fd(), KVM_CREATE_VM, 0ul, "/dev/kvm");
  if (!fd.ok()) return fd.status();
  vm->fd_.Reset(*fd);
  // Identity-map and TSS addresses just below 4 GiB, inside the PC hole, as
  // Intel hosts require them set before the first vCPU runs.
  if (kvm.CheckExtension(KVM_CAP_SET_TSS_ADDR) > 0) {
    PMLMIG_KVM_OR_RETURN(vm->fd(), KVM_SET_TSS_ADDR, 0xfffbd000ul, "vm");
  }
  if (kvm.CheckExtension(KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0) {
    uint64_t addr = 0xfffbc000;
    PMLMIG_KVM_OR_RETURN(vm->fd(), KVM_SET_IDENTITY_MAP_ADDR, &addr, "vm");
  }
  if (options.irqchip) PMLMIG_KVM_OR_RETURN(vm->fd(), KVM_CREATE_IRQCHIP, 0ul, "vm");
  if (options.dirty_ring_bytes != 0) {
    kvm_enable_cap cap{};
    cap.cap = KVM_CAP_DIRTY_LOG_RING;
#ifdef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    if (options.dirty_ring_acq_rel &&
        ::ioctl(vm->fd(), KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0) {
      cap.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    }
#endif
    cap.args[0] = options.dirty_ring_bytes;
    PMLMIG_KVM_OR_RETURN(vm->fd(), KVM_ENABLE_CAP, &cap,
                         "vm, dirty ring of " + std::to_string(options.dirty_ring_bytes) + " bytes");
  }
  return vm;
}

Status Vm::SetMemorySlot(const engine::MemorySlot& slot) {
  PMLMIG_RETURN_IF_ERROR(slots_.Validate(slot));
  kvm_userspace_memory_region region{};
  region.slot = slot.slot;
  region.flags = slot.flags;
  region.guest_phys_addr = slot.gpa;
  region.memory_size = slot.size;
  region.userspace_addr = reinterpret_cast<uint64_t>(slot.host);
  PMLMIG_KVM_OR_RETURN(fd(), KVM_SET_USER_MEMORY_REGION, &region, engine::DescribeSlot(slot));
  return slots_.Set(slot);
}

Status Vm::AddMemory(const GuestMemory& memory, uint32_t flags) {
  uint32_t id = 0;
  for (const MemoryRegion& r : memory.regions()) {
    PMLMIG_RETURN_IF_ERROR(SetMemorySlot({id++, r.gpa, memory.host() + r.offset, r.size, flags}));
  }
  return Status::Ok();
}

Result<std::unique_ptr<Vcpu>> Vm::CreateVcpu(const Kvm& kvm, uint32_t id,
                                             const std::vector<kvm_cpuid_entry2>& cpuid) {
  const std::string name = "vcpu " + std::to_string(id);
  auto fd = PMLMIG_KVM(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id), name);
  if (!fd.ok()) return fd.status();
  UniqueFd vcpu_fd(*fd);
  PMLMIG_ASSIGN_OR_RETURN(size_t run_size, kvm.VcpuMmapSize());
  PMLMIG_ASSIGN_OR_RETURN(Mapping run, Mapping::Map(run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                    vcpu_fd.get(), 0, "kvm_run of " + name));
  // The APIC id in leaf 1 EBX[31:24] and leaves 0xb/0x1f EDX is the vCPU's id.
  std::vector<kvm_cpuid_entry2> entries = cpuid;
  for (kvm_cpuid_entry2& e : entries) {
    if (e.function == 1) e.ebx = (e.ebx & 0x00ffffffu) | (id << 24);
    if (e.function == 0xb || e.function == 0x1f) e.edx = id;
  }
  std::vector<uint8_t> buf(sizeof(abi::CountPadHeader) + entries.size() * sizeof(kvm_cpuid_entry2));
  const abi::CountPadHeader h{static_cast<uint32_t>(entries.size()), 0};
  std::memcpy(buf.data(), &h, sizeof h);
  std::memcpy(buf.data() + sizeof h, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
  auto set = KvmIoctl(vcpu_fd.get(), abi::kSetCpuid2, buf.data(), "KVM_SET_CPUID2", name);
  if (!set.ok()) return set.status();
  return std::make_unique<Vcpu>(id, std::move(vcpu_fd), std::move(run));
}

}  // namespace pmlmig::vmm
