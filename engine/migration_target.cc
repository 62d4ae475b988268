#include "pmlmig/engine/migration_target.h"

#include <sys/stat.h>

#include <cstdio>

#include "pmlmig/base/units.h"
#include "pmlmig/engine/memory_digest.h"

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
  if (!setup.shared_memory.empty()) PMLMIG_RETURN_IF_ERROR(CheckSharedMemory(setup, **vm));
  setup_ = setup;
  setup_.shared_memory.clear();  // the transport's fds; the VM holds its own references
  shared_ = !setup.shared_memory.empty();
  vm_ = std::move(*vm);
  // Its own memory is zeroed: the digests start as those of zero pages and
  // follow every page the transport writes. Shared memory is digested at
  // Final, as it is then.
  if (setup.verify && !shared_) {
    digests_ = std::make_unique<PageDigestTable>(vm_->memory_slots(), PageDigestTable::Initial::kZero);
  }
  return Status::Ok();
}

// A handover's VM must be built over the very files it was handed (the same
// inode at the same offset), not over memory of its own: a factory that
// ignored them would resume the guest on zeroed memory.
Status VmMigrationTarget::CheckSharedMemory(const MigrationSetup& setup, const VmControl& vm) {
  if (setup.shared_memory.size() != setup.memory.size()) {
    return InvalidArgument("setup: " + std::to_string(setup.shared_memory.size()) + " memory files for " +
                           std::to_string(setup.memory.size()) + " memory ranges");
  }
  for (size_t i = 0; i < setup.memory.size(); ++i) {
    const MemoryFile& handed = setup.shared_memory[i];
    const std::optional<VmControl::Backing> b = vm.slot_backing(setup.memory[i].slot);
    struct stat a{}, m{};
    if (!b || b->fd < 0 || ::fstat(handed.fd, &a) != 0 || ::fstat(b->fd, &m) != 0 || a.st_dev != m.st_dev ||
        a.st_ino != m.st_ino || b->offset != handed.offset) {
      return InvalidArgument("setup: the VM built from the description does not map the memory handed over for "
                             "slot " + std::to_string(setup.memory[i].slot) +
                             " (its VMM cannot take a same-host handover)");
    }
  }
  return Status::Ok();
}

const SlotTable& VmMigrationTarget::memory() const { return vm_ ? vm_->memory_slots() : empty_; }

std::optional<MemoryFile> VmMigrationTarget::memory_file(uint32_t slot) const {
  if (!vm_) return std::nullopt;
  const std::optional<VmControl::Backing> b = vm_->slot_backing(slot);
  if (!b) return std::nullopt;
  return MemoryFile{b->fd, b->offset};
}

Result<FinalReply> VmMigrationTarget::OnFinal(const FinalState& state) {
  if (!vm_) return InvalidArgument("final state before setup");
  const auto start = std::chrono::steady_clock::now();
  FinalReply reply;
  PMLMIG_RETURN_IF_ERROR(vm_->LoadState(state.vm_state).WithContext("restore state"));
  if (setup_.verify && !state.postcopy) {  // post-copy: the digests go back once every page is here
    PMLMIG_RETURN_IF_ERROR(Verify(state, &reply));
    // The VMM's own check needs the vCPUs paused, so it costs downtime:
    // only when the VM waits for verification anyway.
    // A handover waits anyway: the source compares the digests before its commit.
    if (check_ && (setup_.verify_order == VerifyOrder::kBeforeCommit || shared_)) {
      auto checked = check_(*vm_);
      if (!checked.ok()) return checked.status().WithContext("verify");
      reply.verify_detail += "; " + *checked;
    }
  }
  prepared_ = true;
  reply.prepared = true;
  reply.target_restore_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  reply.source_paused_ms = state.source_paused_ms;
  return reply;
}

Status VmMigrationTarget::Verify(const FinalState& state, FinalReply* reply) {
  if (shared_) {  // the source's own pages: digested as they are now, for the source to compare
    const ChunkLayout layout(memory());
    reply->chunk_digests = DigestAllChunks(memory(), layout);
    reply->chunk_bytes = layout.chunk_bytes();
    reply->verify_detail = "digests of " + std::to_string(reply->chunk_digests.size()) + " chunks of the shared " +
                           "memory returned to the source, which compares them before the commit";
    return Status::Ok();
  }
  reply->chunk_digests = digests_->Snapshot();
  reply->chunk_bytes = digests_->layout().chunk_bytes();
  const size_t n = reply->chunk_digests.size();
  if (setup_.verify_order == VerifyOrder::kAfterCommit) {
    reply->verify_detail = "digests of " + std::to_string(n) + " chunks of " + FormatBytes(reply->chunk_bytes) +
                           " returned to the source, which compares them after the VM resumed";
    return Status::Ok();
  }
  if (!state.has_digest) return InvalidArgument("verify: the source sent no memory digest");
  if (state.chunk_digests.empty()) {  // a source that sends only the sum
    uint64_t mine = 0;
    for (uint64_t d : reply->chunk_digests) mine += d;
    if (mine != state.memory_digest) {
      return DataLoss("verify: memory digest " + FormatHex(mine) + " differs from the source's " +
                      FormatHex(state.memory_digest));
    }
    reply->verify_detail = "memory digest matches";
    reply->verified = true;
    return Status::Ok();
  }
  if (state.chunk_digests.size() != n || state.chunk_bytes != reply->chunk_bytes) {
    return InvalidArgument("verify: the source sent " + std::to_string(state.chunk_digests.size()) +
                           " chunk digests of " + FormatBytes(state.chunk_bytes) + ", this target has " +
                           std::to_string(n) + " chunks of " + FormatBytes(reply->chunk_bytes));
  }
  const DigestMismatch m = CompareChunkDigests(digests_->layout(), reply->chunk_digests, state.chunk_digests);
  if (!m.empty()) {
    return DataLoss("verify: the memory received differs from the source's at the pause point: " + m.Describe());
  }
  reply->verify_detail = "all " + std::to_string(n) + " chunk digests match (" +
                         FormatBytes(digests_->layout().total_pages() << kPageShift) + ")";
  reply->verified = true;
  return Status::Ok();
}

Result<double> VmMigrationTarget::OnCommit() {
  if (!vm_ || !prepared_) return InvalidArgument("commit before the final state was restored");
  const auto start = std::chrono::steady_clock::now();
  PMLMIG_RETURN_IF_ERROR(vm_->Resume().WithContext("resume"));
  resumed_ = true;
  resumed_at_ = std::chrono::steady_clock::now();
  if (postcopy_ && counter_) {
    // The guest's progress while its pages arrive (a counter in guest
    // memory may itself wait for its page: then so does this thread).
    sampling_.store(true);
    sampler_ = std::thread([this] {
      while (sampling_.load()) {
        ProgressSample s;
        s.pages_written = counter_(*vm_);
        s.pages_missing = postcopy_ ? postcopy_->remaining() : 0;
        s.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - resumed_at_).count();
        {
          std::lock_guard lock(samples_mu_);
          samples_.push_back(s);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
  }
  return std::chrono::duration<double, std::milli>(resumed_at_ - start).count();
}

void VmMigrationTarget::StopSampling() {
  sampling_.store(false);
  if (sampler_.joinable()) sampler_.join();
}

void VmMigrationTarget::EndPostcopy() {
  StopSampling();
  postcopy_.reset();
}

std::vector<MigrationTarget::ProgressSample> VmMigrationTarget::postcopy_progress() const {
  std::lock_guard lock(samples_mu_);
  return samples_;
}

VmMigrationTarget::~VmMigrationTarget() {
  sampling_.store(false);
  if (postcopy_) postcopy_->Release();  // a sampler waiting on a fault wakes
  if (sampler_.joinable()) sampler_.join();
}

void VmMigrationTarget::OnAbort(const std::string&) {
  if (!resumed_ || postcopy_) {  // never ran, or cannot go on without its pages: discard
    sampling_.store(false);
    if (postcopy_) postcopy_->Release();  // wakes vCPUs (and the sampler) waiting on a fault, so the VM can stop
    if (sampler_.joinable()) sampler_.join();
    postcopy_.reset();
    vm_.reset();
    resumed_ = false;
  }
}

std::vector<std::optional<MemoryFile>> VmMigrationTarget::MemoryFiles() const {
  std::vector<std::optional<MemoryFile>> files;
  for (const MemorySlot& s : memory().slots()) files.push_back(memory_file(s.slot));
  return files;
}

Status VmMigrationTarget::PreparePostcopy(std::span<const PageRun> stale) {
  if (!vm_) return InvalidArgument("post-copy before setup");
  if (!punched_) punched_ = std::make_unique<PageBits>(memory());
  return PostcopyMemory::Punch(memory(), MemoryFiles(), stale, punched_.get());
}

Result<PostcopyMemory*> VmMigrationTarget::ArmPostcopy(std::span<const PageRun> owed) {
  if (!vm_) return InvalidArgument("post-copy before setup");
  PMLMIG_ASSIGN_OR_RETURN(postcopy_, PostcopyMemory::Arm(memory(), MemoryFiles(), owed, digests_.get(), punched_.get()));
  punched_.reset();
  return postcopy_.get();
}

std::unique_ptr<VmControl> VmMigrationTarget::TakeVm() { return resumed_ ? std::move(vm_) : nullptr; }

}  // namespace pmlmig::engine
