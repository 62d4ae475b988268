#include "pmlmig/engine/migration_target.h"

#include <cstdio>

namespace pmlmig::engine {

Status VmMigrationTarget::OnSetup(const MigrationSetup& setup) {
  if (vm_) return InvalidArgument("setup: a VM is already being received");
  auto vm = factory_(setup);
  if (!vm.ok()) return vm.status().WithContext("setup");
  // The VM we built must have exactly the memory the source announced.
  const auto slots = (*vm)->memory_slots().slots();
  if (slots.size() != setup.memory.size()) {
    return InvalidArgument("setup: source announced " + std::to_string(setup.memory.size()) +
                           " memory ranges, the VM built from its description has " + std::to_string(slots.size()));
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    const MemoryRange& r = setup.memory[i];
    if (slots[i].slot != r.slot || slots[i].gpa != r.gpa || slots[i].size != r.size) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "setup: memory range %zu is slot %u gpa 0x%llx size 0x%llx, expected %s", i,
                    r.slot, static_cast<unsigned long long>(r.gpa), static_cast<unsigned long long>(r.size),
                    DescribeSlot(slots[i]).c_str());
      return InvalidArgument(buf);
    }
  }
  if (setup.vcpus != (*vm)->vcpu_count()) {
    return InvalidArgument("setup: source announced " + std::to_string(setup.vcpus) + " vCPUs, the VM has " +
                           std::to_string((*vm)->vcpu_count()));
  }
  setup_ = setup;
  vm_ = std::move(*vm);
  return Status::Ok();
}

const SlotTable& VmMigrationTarget::memory() const { return vm_ ? vm_->memory_slots() : empty_; }

Result<FinalReply> VmMigrationTarget::OnFinal(const FinalState& state) {
  if (!vm_) return InvalidArgument("final state before setup");
  const auto start = std::chrono::steady_clock::now();
  FinalReply reply;
  PMLMIG_RETURN_IF_ERROR(vm_->LoadState(state.vm_state).WithContext("restore state"));
  if (setup_.verify) {
    if (!state.has_digest) return InvalidArgument("verify: the source sent no memory digest");
    const uint64_t mine = MemoryDigest(vm_->memory_slots());
    if (mine != state.memory_digest) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "verify: memory digest 0x%016llx differs from the source's 0x%016llx",
                    static_cast<unsigned long long>(mine), static_cast<unsigned long long>(state.memory_digest));
      return DataLoss(buf);
    }
    reply.verify_detail = "memory digest matches";
    if (check_) {
      auto checked = check_(*vm_);
      if (!checked.ok()) return checked.status().WithContext("verify");
      reply.verify_detail += "; " + *checked;
    }
    reply.verified = true;
  }
  prepared_ = true;
  reply.prepared = true;
  reply.target_restore_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  reply.source_paused_ms = state.source_paused_ms;
  return reply;
}

Result<double> VmMigrationTarget::OnCommit() {
  if (!vm_ || !prepared_) return InvalidArgument("commit before the final state was restored");
  const auto start = std::chrono::steady_clock::now();
  PMLMIG_RETURN_IF_ERROR(vm_->Resume().WithContext("resume"));
  resumed_ = true;
  resumed_at_ = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(resumed_at_ - start).count();
}

void VmMigrationTarget::OnAbort(const std::string&) {
  if (!resumed_) vm_.reset();  // never ran: discard
}

std::unique_ptr<VmControl> VmMigrationTarget::TakeVm() { return resumed_ ? std::move(vm_) : nullptr; }

}  // namespace pmlmig::engine
