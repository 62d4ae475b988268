// MigrationSource without live rounds (MigrationOptions::live false): the
// VM pauses first and every page that holds data goes out once, paused. For
// a copy of a stopped VM (a snapshot taken without --live): nothing to
// track, nothing sent twice, and the copy is of the moment of the pause.
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration_source.h"

namespace pmlmig::engine {

MigrationStats MigrationSource::RunPaused() {
  auto failed = [&](const Status& s) { return Finished(Outcome::kFailed, CancelReason::kNone, s); };
  if (options_.convergence.postcopy != PostcopyMode::kOff) {
    return failed(InvalidArgument("a migration of a paused VM has no post-copy"));
  }
  const auto pause = clock_.Now();
  if (Status s = vm_.Pause(); !s.ok()) return failed(s.WithContext("pause"));
  final_round_ = true;
  std::vector<PageRun> runs = PagesWithData();
  uint64_t pages = 0;
  for (const PageRun& r : runs) pages += r.pages;
  Publish(Phase::kStopAndCopy, 0, pages, 0);
  FinalState final_state;
  std::vector<uint64_t> mine;
  if (options_.verify) {  // memory does not change while paused: one digest, before or after
    const ChunkLayout layout(vm_.memory_slots());
    const auto t = clock_.Now();
    mine = DigestAllChunks(vm_.memory_slots(), layout);
    stats_.verification.source_digest_ms = MsSince(clock_, t);
    final_state.has_digest = true;
    final_state.chunk_digests = mine;
    final_state.chunk_bytes = layout.chunk_bytes();
    for (uint64_t d : mine) final_state.memory_digest += d;
  }
  if (Status s = SendRound(0, std::move(runs), pages, 0); !s.ok()) return failed(s);
  {
    auto state = vm_.SaveState();
    if (!state.ok()) return failed(state.status().WithContext("save state"));
    final_state.vm_state = std::move(*state);
  }
  final_state.source_paused_ms = MsSince(clock_, pause);
  auto reply = sink_.Finish(final_state);
  if (!reply.ok()) return failed(reply.status().WithContext("final state"));
  if (!reply->prepared) return failed(Internal("the target did not prepare the VM: " + reply->verify_detail));
  if (options_.verify && !reply->chunk_digests.empty()) {
    CompareDigests(ChunkLayout(vm_.memory_slots()), *reply, mine);
    if (stats_.verification.verdict != VerifyVerdict::kMatched) return failed(DataLoss("verify: " + stats_.verification.detail));
  }
  Publish(Phase::kCommit, stats_.rounds, 0, 0);
  if (std::optional<MigrationStats> ended = CommitSwitch(pause, *reply, "switch-over")) return *ended;
  if (sink_.keeps_source()) return KeptSource(pause);
  return Finished(Outcome::kCompleted, CancelReason::kNone, Status::Ok());
}

}  // namespace pmlmig::engine
