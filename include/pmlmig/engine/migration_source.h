// MigrationSource: pre-copy live migration of one VM through a MigrationSink.
//
//   setup      Begin(): the target builds the VM.
//   round 0    tracking on, then every page that holds data (memfd holes,
//              i.e. never-touched memory, are skipped without being read).
//   rounds 1+  Collect() from the tracker (which re-protects the pages), then
//              send them. Before sending, the switch-over policy decides
//              from the round's summary (expected downtime = remaining dirty
//              bytes / bandwidth measured over the last rounds, a window of
//              at least 100 ms): continue, stop-and-copy, or abort. The
//              default (DowntimeLimitPolicy) switches over when the expected
//              downtime is within the limit; past max_rounds or the timeout
//              it cancels or forces as configured.
//   switch     pause the vCPUs, a complete collection, send the rest, the
//              vCPU/VM state (and a memory digest with verify); once the
//              target has restored it (prepared), Commit: the target resumes.
// On any failure or cancel before Commit: the tracker is disabled, the VM
// resumed, the target told to abort, and the reason reported. After Commit
// the source resumes only if the sink knows the target does not run the VM
// (kNotCommitted); in doubt the VM stays paused and the status says so.
// The caller stops the source VM after a completed migration.
//
// Thread-safety: Run() on one thread; Cancel() and progress() from any.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "pmlmig/base/clock.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/postcopy.h"
#include "pmlmig/engine/source_digest.h"
#include "pmlmig/engine/switchover_policy.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/vcpu_throttle.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

struct MigrationOptions {
  // The default switch-over policy's options. Its timeout also ends a round
  // in progress (unless force_on_timeout), whatever the policy.
  DowntimeLimitOptions convergence;
  // Compare chunk digests of both sides' memory at the pause point
  // (source_digest.h says why the source's cannot miss a stale page); when
  // is verify_order's choice. Default off.
  bool verify = false;
  VerifyOrder verify_order = VerifyOrder::kAfterCommit;
  std::chrono::milliseconds bandwidth_window{100};  // rounds measured for the bandwidth; default 100 ms
  // Replaces the default DowntimeLimitPolicy(convergence) when set.
  std::shared_ptr<SwitchoverPolicy> policy;
  // false: pause the VM first and send every page once, paused (a snapshot
  // of a stopped VM); no tracking, no live round. Default true.
  bool live = true;
};

struct RoundStats {
  uint32_t round = 0;
  uint64_t dirty_pages = 0;  // pages collected for this round (round 0: pages with data)
  TransferStats sent;
  double duration_ms = 0;
  double bandwidth_mbps = 0;         // wire bytes / duration, megabits/s
  double expected_downtime_ms = 0;   // estimated before the round started
  uint32_t throttle_pct = 0;         // auto-converge's throttle while it was sent (0: none)
  double vcpu_quota_pages_per_s = 0; // dirty-limit's per-vCPU quota while it was sent (0: none)
};

// Why a migration ended cancelled, so a caller can advise its user (the
// engine's message names no command-line flag).
enum class CancelReason : uint8_t {
  kNone,
  kRequested,      // Cancel()
  kNotConverging,  // the policy gave up (out of rounds or time) after round 0
  kTimedOut,       // the timeout ended a round in progress (round 0: sending all memory)
  kPolicy,         // a custom policy aborted (its detail is the error)
};

// The switch-over policy's aid, with what it did (vcpu_throttle.h).
struct ThrottleReport {
  ConvergeAid aid = ConvergeAid::kNone;  // what the default policy was allowed (a custom policy's: none)
  uint32_t steps = 0;                    // throttle steps taken
  uint32_t final_pct = 0;                // auto-converge's throttle at the end (0: none)
  double final_quota_pages_per_s = 0;    // dirty-limit's quota at the end (0: none)
  ThrottleStats at_end;                  // the vCPUs' rates and hold times when the migration ended
};

// What verification found.
enum class VerifyVerdict : uint8_t {
  kNotAsked,   // verify was off
  kMatched,    // every chunk digest matched
  kMismatch,   // some differ: `mismatch` (or, before Commit, the target's error) names them
  kNotDone,    // the migration ended before a comparison, or the peer returned no digests
};
// "not-asked", "matched", "mismatch", "not-done".
std::string_view VerifyVerdictName(VerifyVerdict verdict);

struct VerifyReport {
  VerifyVerdict verdict = VerifyVerdict::kNotAsked;
  VerifyOrder order = VerifyOrder::kAfterCommit;
  DigestMismatch mismatch;
  std::string detail;          // what was compared, or why nothing was
  SourceDigestStats source;    // the witness and the cost at the pause
  double source_digest_ms = 0; // the source's digest at the pause (before Commit: inside the downtime,
                               // overlapped with the final round)
};

// What post-copy did (PostcopyResult's figures) when the migration used it.
struct PostcopyReport {
  bool used = false;          // the migration switched to post-copy
  PostcopyMode mode = PostcopyMode::kOff;
  uint64_t owed_pages = 0;    // owed at the switch
  double switch_ms = 0;       // pause to the target running (the downtime)
  double phase_ms = 0;        // the target running to it holding every page, or to the failure (as the source saw it)
  uint64_t owed_left = 0;     // post-copy failed: pages the target never got
  PostcopyResult result;      // the target's figures and the source's; empty if it broke
};

struct MigrationStats {
  // kCompleted; kFailed or kCancelled (the VM runs here in both); or
  // kInDoubt (the VM is paused here and may run on the target: never resume
  // it without learning the target's outcome).
  Outcome outcome = Outcome::kFailed;
  CancelReason cancel_reason = CancelReason::kNone;
  std::string error;
  Code error_code = Code::kOk;       // the failure's kind (kUnavailable: the target unreachable or gone)
  // Failed or cancelled, and resuming the VM here failed too (VmControl::
  // Resume's error is in `error`): the VM is paused here, not running.
  bool source_paused = false;
  double setup_time_ms = 0;
  double total_time_ms = 0;
  double downtime_ms = 0;            // source pause to target resumed (as the source sees it)
  uint32_t rounds = 0;               // rounds sent, including round 0 and the final one
  TransferStats transferred;
  double throughput_mbps = 0;        // wire bytes / total time
  double dirty_pages_rate = 0;       // pages/s, measured over the last live round
  double expected_downtime_ms = 0;   // at the switch-over decision
  bool verified = false;             // verification.verdict == kMatched
  VerifyReport verification;
  bool commit_resolved = false;      // the commit's reply was lost; Resolve gave the outcome
  bool shared_memory = false;        // a same-host handover: the target took the memory itself, no page was copied
  bool source_kept = false;          // the target was a copy (a snapshot): completed, and the VM runs on here
  FinalReply final_reply;
  std::vector<RoundStats> round_stats;
  ThrottleReport throttle;
  PostcopyReport postcopy;
};

// kPostcopy: the VM runs on the target; owed pages still go out.
enum class Phase : uint8_t { kSetup, kRound, kStopAndCopy, kCommit, kDone, kPostcopy };
// "setup", "round", "stop-and-copy", "commit", "done", "postcopy".
std::string_view PhaseName(Phase phase);

struct MigrationProgress {
  Phase phase = Phase::kSetup;
  uint32_t round = 0;
  uint64_t remaining_pages = 0;
  double bandwidth_mbps = 0;
  double expected_downtime_ms = 0;
  uint64_t wire_bytes = 0;
  double elapsed_ms = 0;
  // Live, when the tracker counts per vCPU: each vCPU's dirty rate, quota and
  // hold time, and the throttle in force.
  uint32_t throttle_pct = 0;
  double vcpu_quota_pages_per_s = 0;
  std::vector<VcpuRate> vcpus;
  // Post-copy: pages still owed (remaining_pages) and requests answered;
  // whether the link is down now (the sink tries to resume it) and how
  // many times it was resumed.
  uint64_t postcopy_requests = 0;
  uint64_t postcopy_pushed_pages = 0;     // sent in the background so far
  double postcopy_latency_p50_ms = 0;     // the target's request latency so far (0: not reported yet)
  double postcopy_latency_p99_ms = 0;
  bool postcopy_link_down = false;
  uint32_t postcopy_recoveries = 0;
};

// Events of a migration, on its thread (Run()'s; in post-copy, on_progress
// comes from a watcher thread while Run()'s waits, never two at once): keep
// them short.
struct MigrationCallbacks {
  std::function<void(const MigrationProgress&)> on_progress;  // after each round and phase change
  std::function<void(const RoundStats&)> on_round;            // after each round was sent
  std::function<void(const MigrationStats&)> on_done;         // once, with the final statistics
};

class MigrationSource {
 public:
  MigrationSource(VmControl& vm, DirtyTracker& tracker, MigrationSink& sink, MigrationOptions options,
                  std::string vm_description, const Clock& clock = Clock::Steady());

  // Blocks until the migration completed, failed or was cancelled.
  MigrationStats Run();
  // Asks a running migration to stop and keep the VM here; a transfer in
  // progress is aborted.
  void Cancel() {
    cancel_.store(true);
    sink_.Abort("cancelled by request");
  }
  MigrationProgress progress() const;
  // Whether the default policy's aid (options.convergence.aid) can work with
  // this tracker and VMM; Run() fails with the same error. Before Run().
  Status CheckAid();
  // Before Run().
  void SetCallbacks(MigrationCallbacks callbacks) { callbacks_ = std::move(callbacks); }

 private:
  MigrationStats RunPhases();
  MigrationStats Finished(Outcome outcome, CancelReason reason, const Status& why);
  Status SendRound(uint32_t round, std::vector<PageRun> runs, uint64_t dirty, double expected_ms);
  RoundSummary Summarize(uint32_t round, uint64_t remaining, Clock::TimePoint collect_start);
  std::vector<PageRun> PagesWithData() const;
  double BandwidthBytesPerSecond() const;
  void Publish(Phase phase, uint32_t round, uint64_t remaining, double expected_ms);
  Status Fail(const Status& why);
  Status ApplyThrottle(const ThrottleRequest& request);
  void AddThrottle(MigrationProgress& p) const;  // progress_mu_ held
  void StopThrottle();
  // After the target's FinalReply: compares its digests with the source's.
  void CompareDigests(const FinalReply& reply, const std::vector<uint64_t>& mine);
  void CompareDigests(const ChunkLayout& layout, const FinalReply& reply, const std::vector<uint64_t>& mine);
  // The same for the source's own digest, which may have failed.
  void CompareDigests(const FinalReply& reply, const Result<std::vector<uint64_t>>& mine);
  // After a prepared Finish: Commit. The migration's end (failed, in doubt)
  // if it did not commit; nullopt once the target runs the VM (downtime and
  // the final reply recorded).
  std::optional<MigrationStats> CommitSwitch(Clock::TimePoint pause, const FinalReply& reply, const char* what);
  // From the pause on, with `owed` the pages the target lacks: switch,
  // commit, serve the pages, verify.
  MigrationStats RunPostcopy(Clock::TimePoint pause, std::vector<PageRun> owed);
  // A same-host handover (sink_.shares_memory()): from setup (with the
  // memory's files) to the commit; no tracking, no page sent.
  MigrationStats RunHandover(MigrationSetup setup);
  // options_.live false: pause, every page with data as the one round, the
  // state, commit.
  MigrationStats RunPaused();
  // After the commit to a target that keeps the source (a snapshot).
  MigrationStats KeptSource(Clock::TimePoint pause);

  VmControl& vm_;
  DirtyTracker& tracker_;
  MigrationSink& sink_;
  MigrationOptions options_;
  std::string vm_description_;
  const Clock& clock_;
  std::shared_ptr<SwitchoverPolicy> policy_;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> timed_out_{false};  // set by the timeout watchdog (cancel mode)
  MigrationCallbacks callbacks_;
  Clock::TimePoint start_;
  MigrationStats stats_;                // Run()'s thread
  double last_expected_ms_ = 0;         // Run()'s thread
  bool final_round_ = false;            // Run()'s thread
  bool resume_failed_ = false;          // Run()'s thread: Fail() could not resume the VM
  std::unique_ptr<SourceDigest> digest_;  // verifying; Run()'s thread
  mutable std::mutex progress_mu_;
  MigrationProgress progress_;          // guarded by progress_mu_
  Clock::TimePoint published_at_;       // guarded by progress_mu_: when progress_ was published
  // The round being sent, for progress() to count what the transport has
  // taken of it; set and cleared by Run()'s thread under progress_mu_.
  const PageList* sending_ = nullptr;
  // Measures and slows the vCPUs from tracking on until the end; set and
  // reset by Run()'s thread under progress_mu_ (progress() reads it).
  std::unique_ptr<VcpuThrottle> throttle_;
};

// Runs of pages set in `set`, in gpa order (consecutive pages merged).
std::vector<PageRun> RunsOf(DirtySet& set);

}  // namespace pmlmig::engine
