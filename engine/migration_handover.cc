// MigrationSource's same-host handover (MigrationSink::shares_memory()): the
// target maps this VM's own memory, so there is nothing to track and no page
// to send. What is left of a migration is the switch-over:
//
//   setup   the memory's files go to the target, which builds its VM over
//           them while this one runs on (outside the downtime);
//   pause   the vCPUs stop; the state is saved and sent; the target restores
//           it (verifying: both sides digest the shared memory at once, and
//           this side compares before Commit, because after it the guest
//           changes that memory);
//   commit  the target resumes. From here this side never touches the
//           memory: the VM is the target's.
// A failure before Commit resumes the VM here: the target wrote nothing.
#include <optional>
#include <thread>

#include "pmlmig/base/failpoint.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration_source.h"

namespace pmlmig::engine {

MigrationStats MigrationSource::RunHandover(MigrationSetup setup) {
  auto failed = [&](const Status& s) { return Finished(Outcome::kFailed, CancelReason::kNone, s); };
  stats_.shared_memory = true;
  stats_.verification.order = VerifyOrder::kBeforeCommit;
  if (options_.convergence.postcopy != PostcopyMode::kOff) {
    return failed(InvalidArgument("a same-host handover copies no memory: post-copy does not apply"));
  }
  if (!options_.policy && options_.convergence.aid != ConvergeAid::kNone) {
    return failed(InvalidArgument("a same-host handover copies no memory: " +
                                  std::string(ConvergeAidName(options_.convergence.aid)) + " does not apply"));
  }
  for (const MemorySlot& s : vm_.memory_slots().slots()) {
    const std::optional<VmControl::Backing> b = vm_.slot_backing(s.slot);
    if (!b || b->fd < 0) {
      return failed(InvalidArgument("handover: " + DescribeSlot(s) +
                                    " is not backed by a file (a memfd) that another process could map"));
    }
    setup.shared_memory.push_back({b->fd, b->offset});
  }
  // The target returns its digests and this side compares them (below).
  setup.verify_order = VerifyOrder::kAfterCommit;
  if (Status s = sink_.Begin(setup, vm_.memory_slots()); !s.ok()) return failed(s.WithContext("setup"));
  stats_.setup_time_ms = MsSince(clock_, start_);
  if (cancel_.load()) return Finished(Outcome::kCancelled, CancelReason::kRequested, Aborted("cancelled by request"));

  const auto pause = clock_.Now();
  if (Status s = vm_.Pause(); !s.ok()) return failed(s.WithContext("pause"));
  Publish(Phase::kStopAndCopy, 0, 0, 0);
  // Verifying, this side digests the paused memory while the target digests
  // the same pages through its own mapping.
  const ChunkLayout layout(vm_.memory_slots());
  std::vector<uint64_t> mine;
  double digest_ms = 0;
  std::optional<std::thread> digesting;
  if (options_.verify) {
    digesting.emplace([&] {
      const auto t = clock_.Now();
      mine = DigestAllChunks(vm_.memory_slots(), layout);
      digest_ms = MsSince(clock_, t);
    });
  }
  auto join = [&] {
    if (digesting) digesting->join();
    digesting.reset();
  };
  FinalState final_state;
  {
    auto state = vm_.SaveState();
    if (!state.ok()) {
      join();
      return failed(state.status().WithContext("save state"));
    }
    final_state.vm_state = std::move(*state);
  }
  final_state.source_paused_ms = MsSince(clock_, pause);
  auto reply = sink_.Finish(final_state);
  join();
  if (!reply.ok()) return failed(reply.status().WithContext("handover"));
  if (!reply->prepared) return failed(Internal("the target did not prepare the VM: " + reply->verify_detail));
  if (options_.verify) {
    stats_.verification.source_digest_ms = digest_ms;
    CompareDigests(layout, *reply, mine);
    if (stats_.verification.verdict != VerifyVerdict::kMatched) {
      return failed(DataLoss("verify: " + stats_.verification.detail));
    }
  }
  FailPoint("source.prepared");
  Publish(Phase::kCommit, 0, 0, 0);
  if (std::optional<MigrationStats> ended = CommitSwitch(pause, *reply, "handover")) return *ended;
  return Finished(Outcome::kCompleted, CancelReason::kNone, Status::Ok());
}

}  // namespace pmlmig::engine
