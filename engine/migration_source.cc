#include "pmlmig/engine/migration_source.h"

#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/watchdog.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <optional>
#include <thread>

namespace pmlmig::engine {

std::string_view PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kSetup: return "setup";
    case Phase::kRound: return "round";
    case Phase::kStopAndCopy: return "stop-and-copy";
    case Phase::kCommit: return "commit";
    case Phase::kDone: return "done";
    case Phase::kPostcopy: return "postcopy";
  }
  return "unknown";
}

std::string_view VerifyVerdictName(VerifyVerdict verdict) {
  switch (verdict) {
    case VerifyVerdict::kNotAsked: return "not-asked";
    case VerifyVerdict::kMatched: return "matched";
    case VerifyVerdict::kMismatch: return "mismatch";
    case VerifyVerdict::kNotDone: return "not-done";
  }
  return "unknown";
}

std::vector<PageRun> RunsOf(DirtySet& set) {
  std::vector<PageRun> runs;
  set.TakeEach([&](uint64_t gpa) {
    if (!runs.empty() && runs.back().gpa + (runs.back().pages << kPageShift) == gpa) {
      ++runs.back().pages;
    } else {
      runs.push_back({gpa, 1});
    }
  });
  return runs;
}

MigrationSource::MigrationSource(VmControl& vm, DirtyTracker& tracker, MigrationSink& sink, MigrationOptions options,
                                 std::string vm_description, const Clock& clock)
    : vm_(vm),
      tracker_(tracker),
      sink_(sink),
      options_(std::move(options)),
      vm_description_(std::move(vm_description)),
      clock_(clock),
      policy_(options_.policy ? options_.policy
                              : std::make_shared<DowntimeLimitPolicy>(options_.convergence, clock)) {}

void MigrationSource::AddThrottle(MigrationProgress& p) const {
  if (!throttle_) return;
  ThrottleStats t = throttle_->stats();
  p.throttle_pct = t.duty_pct;
  p.vcpu_quota_pages_per_s = t.quota_pages_per_s;
  if (t.per_vcpu_rates || t.duty_pct > 0) p.vcpus = std::move(t.vcpus);
}

MigrationProgress MigrationSource::progress() const {
  std::lock_guard lock(progress_mu_);
  MigrationProgress p = progress_;
  AddThrottle(p);
  if (sending_ != nullptr) {  // mid-round: what the transport has not taken yet, and the time now
    p.remaining_pages = sending_->total_pages() - sending_->taken();
    p.elapsed_ms += MsSince(clock_, published_at_);
  }
  return p;
}

Status MigrationSource::CheckAid() {
  if (options_.policy) return Status::Ok();  // a custom policy: its throttle requests are checked as they come
  const ConvergeAid aid = options_.convergence.aid;
  if (aid == ConvergeAid::kNone) return Status::Ok();
  const std::string name(ConvergeAidName(aid));
  std::vector<VcpuDirtyCount> counts;
  if (aid == ConvergeAid::kDirtyLimit && !tracker_.vcpu_counts(counts)) {
    return InvalidArgument(name + " needs each vCPU's dirty rate, which the " + std::string(tracker_.name()) +
                              " tracker does not give (the dirty ring does)");
  }
  if (!vm_.SetVcpuThrottleHook(nullptr)) {
    return InvalidArgument(name + ": this VMM cannot hold its vCPUs (its VmControl takes no vCPU throttle hook; "
                                  "through the C ABI, pmlmig_vm_ops.kick_vcpu is not set)");
  }
  return Status::Ok();
}

Status MigrationSource::ApplyThrottle(const ThrottleRequest& request) {
  std::lock_guard lock(progress_mu_);
  if (!throttle_) return Unavailable("throttle requested while no vCPU is measured");
  Status s = request.duty_pct > 0 ? throttle_->SetDutyCycle(request.duty_pct)
                                  : throttle_->SetQuota(request.vcpu_quota_pages_per_s);
  if (!s.ok()) return s;
  ++stats_.throttle.steps;
  return Status::Ok();
}

void MigrationSource::StopThrottle() {
  std::unique_ptr<VcpuThrottle> gone;
  {
    std::lock_guard lock(progress_mu_);
    if (!throttle_) return;
    stats_.throttle.at_end = throttle_->stats();
    stats_.throttle.final_pct = stats_.throttle.at_end.duty_pct;
    stats_.throttle.final_quota_pages_per_s = stats_.throttle.at_end.quota_pages_per_s;
    gone = std::move(throttle_);
  }
  gone.reset();  // lifts every limit (outside the lock: it joins its thread)
}

void MigrationSource::Publish(Phase phase, uint32_t round, uint64_t remaining, double expected_ms) {
  MigrationProgress p;
  p.phase = phase;
  p.round = round;
  p.remaining_pages = remaining;
  p.bandwidth_mbps = BandwidthBytesPerSecond() * 8 / 1e6;
  p.expected_downtime_ms = expected_ms;
  p.wire_bytes = stats_.transferred.wire_bytes;
  p.elapsed_ms = MsSince(clock_, start_);
  {
    std::lock_guard lock(progress_mu_);
    progress_ = p;
    published_at_ = clock_.Now();
    AddThrottle(p);
  }
  if (callbacks_.on_progress) callbacks_.on_progress(p);
}

std::vector<PageRun> MigrationSource::PagesWithData() const {
  // Round 0 reads only what holds data: on a memfd, SEEK_DATA/SEEK_HOLE
  // name the extents the guest or the host ever wrote (holes read as zero on
  // the target too, whose memory starts zeroed).
  std::vector<PageRun> runs;
  for (const MemorySlot& s : vm_.memory_slots().slots()) {
    const auto backing = vm_.slot_backing(s.slot);
    if (!backing) {
      runs.push_back({s.gpa, s.pages()});
      continue;
    }
    const off_t begin = static_cast<off_t>(backing->offset);
    const off_t end = begin + static_cast<off_t>(s.size);
    off_t pos = begin;
    while (pos < end) {
      off_t data = ::lseek(backing->fd, pos, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data after pos
        runs.push_back({s.gpa + static_cast<uint64_t>(pos - begin), static_cast<uint64_t>(end - pos) >> kPageShift});
        break;  // cannot tell: send the rest
      }
      if (data >= end) break;
      off_t hole = ::lseek(backing->fd, data, SEEK_HOLE);
      if (hole < 0 || hole > end) hole = end;
      data &= ~static_cast<off_t>(kPageSize - 1);
      const off_t hole_up = (hole + static_cast<off_t>(kPageSize) - 1) & ~static_cast<off_t>(kPageSize - 1);
      runs.push_back({s.gpa + static_cast<uint64_t>(data - begin), static_cast<uint64_t>(hole_up - data) >> kPageShift});
      pos = hole_up;
    }
  }
  return runs;
}

double MigrationSource::BandwidthBytesPerSecond() const {
  // The last rounds, newest first, until they add up to the window.
  double bytes = 0, ms = 0;
  for (auto it = stats_.round_stats.rbegin(); it != stats_.round_stats.rend(); ++it) {
    bytes += static_cast<double>(it->sent.wire_bytes);
    ms += it->duration_ms;
    if (ms >= static_cast<double>(options_.bandwidth_window.count())) break;
  }
  return ms > 0 ? bytes / (ms / 1000.0) : 0;
}

namespace {
// Test stand-ins for a tracking miss: a page the round leaves out.
void TamperWithRound(bool final_round, std::vector<PageRun>& runs) {
  if (runs.empty()) return;
  // The last page of round 0 (or of a live round): never sent, or stale.
  if (TamperPoint("tamper.source.drop_page")) {
    if (--runs.back().pages == 0) runs.pop_back();
    return;
  }
  // The first page of the final round: the target keeps an earlier round's copy.
  if (final_round && TamperPoint("tamper.source.stale_page")) {
    runs.front().gpa += kPageSize;
    if (--runs.front().pages == 0) runs.erase(runs.begin());
  }
}
}  // namespace

Status MigrationSource::SendRound(uint32_t round, std::vector<PageRun> runs, uint64_t dirty, double expected_ms) {
  FailPoint("source.round");
  TamperWithRound(final_round_, runs);
  PageList list(std::move(runs));
  if (!final_round_) Publish(Phase::kRound, round, list.total_pages(), expected_ms);
  const auto t = clock_.Now();
  {
    std::lock_guard lock(progress_mu_);
    sending_ = &list;
  }
  auto sent = sink_.SendPages(round, list);
  {
    std::lock_guard lock(progress_mu_);
    sending_ = nullptr;
  }
  if (!sent.ok()) return sent.status().WithContext("round " + std::to_string(round));
  RoundStats r;
  r.round = round;
  r.dirty_pages = dirty;
  r.sent = *sent;
  r.duration_ms = MsSince(clock_, t);
  r.bandwidth_mbps = r.duration_ms > 0 ? static_cast<double>(r.sent.wire_bytes) * 8 / 1e3 / r.duration_ms : 0;
  r.expected_downtime_ms = expected_ms;
  {
    std::lock_guard lock(progress_mu_);
    if (throttle_) {
      const ThrottleStats now = throttle_->stats();
      r.throttle_pct = now.duty_pct;
      r.vcpu_quota_pages_per_s = now.quota_pages_per_s;
    }
  }
  stats_.transferred += r.sent;
  stats_.round_stats.push_back(r);
  ++stats_.rounds;
  if (callbacks_.on_round) callbacks_.on_round(r);
  return Status::Ok();
}

Status MigrationSource::Fail(const Status& why) {
  // Keep the VM here: logging off, vCPUs running, the target told to drop
  // what it has.
  sink_.Abort(why.message());
  (void)tracker_.Disable();
  Status resumed = vm_.Resume();
  if (!resumed.ok()) {
    resume_failed_ = true;
    return Status(why.code(), why.message() + "; resuming the source VM failed too, so it stays paused here (" +
                                  resumed.message() + ")");
  }
  return why;
}

MigrationStats MigrationSource::Run() {
  start_ = clock_.Now();
  stats_ = MigrationStats{};
  final_round_ = false;
  resume_failed_ = false;
  policy_->Begin();
  // Unless forced, the timeout also ends a round in progress: the watchdog
  // aborts the transfer (RunPhases then reports it and resumes the VM).
  const DowntimeLimitOptions& c = options_.convergence;
  std::optional<Watchdog> watchdog;
  if (c.timeout.count() > 0 && !c.force_on_timeout) {
    watchdog.emplace(std::chrono::steady_clock::now() + c.timeout, [this] {
      timed_out_.store(true);
      sink_.Abort("migration timeout");
    });
  }
  return RunPhases();
}

MigrationStats MigrationSource::Finished(Outcome outcome, CancelReason reason, const Status& why) {
  StopThrottle();  // whatever the outcome, before the VM may resume here
  Status failure;
  if (timed_out_.load()) {  // the watchdog ended a round: say so, whatever failed as a result
    outcome = Outcome::kCancelled;
    char buf[400];
    if (stats_.rounds >= 1) {  // round 0 done: the live rounds did not converge
      reason = CancelReason::kNotConverging;
      std::snprintf(buf, sizeof buf,
                    "not converging: timed out after %lld ms in round %u; the expected downtime was still %.0f ms "
                    "against a limit of %lld ms (about %.0f pages/s dirtied); the VM keeps running here",
                    static_cast<long long>(options_.convergence.timeout.count()), stats_.rounds, last_expected_ms_,
                    static_cast<long long>(options_.convergence.downtime_limit.count()), stats_.dirty_pages_rate);
    } else {
      reason = CancelReason::kTimedOut;
      std::snprintf(buf, sizeof buf,
                    "timed out after %lld ms while sending all memory (round 0); the VM keeps running here",
                    static_cast<long long>(options_.convergence.timeout.count()));
    }
    failure = Fail(Aborted(buf));
  } else if (outcome == Outcome::kFailed && cancel_.load()) {
    // Cancel() aborted the sink, which failed the step in progress.
    outcome = Outcome::kCancelled;
    reason = CancelReason::kRequested;
    failure = Fail(Aborted("cancelled by request"));
  } else if (outcome != Outcome::kCompleted && outcome != Outcome::kInDoubt && outcome != Outcome::kPostcopyFailed) {
    failure = Fail(why);
  } else {
    failure = why;
    (void)tracker_.Disable();
  }
  stats_.error = failure.ok() ? "" : failure.message();
  stats_.error_code = failure.code();
  stats_.source_paused = resume_failed_;
  if (digest_) {
    stats_.verification.source = digest_->stats();
    digest_.reset();  // the witness and its thread go
  }
  if (options_.verify && stats_.verification.verdict == VerifyVerdict::kNotAsked) {
    stats_.verification.verdict = VerifyVerdict::kNotDone;
    if (stats_.verification.detail.empty()) stats_.verification.detail = "the migration ended before the comparison";
  }
  stats_.verified = stats_.verification.verdict == VerifyVerdict::kMatched;
  stats_.outcome = outcome;
  stats_.cancel_reason = outcome == Outcome::kCancelled ? reason : CancelReason::kNone;
  // What went out includes the part of a round that failed.
  if (const TransferStats sent = sink_.totals();
      outcome != Outcome::kCompleted && sent.wire_bytes > stats_.transferred.wire_bytes) {
    stats_.transferred = sent;
  }
  stats_.total_time_ms = MsSince(clock_, start_);
  stats_.throughput_mbps = stats_.total_time_ms > 0
                               ? static_cast<double>(stats_.transferred.wire_bytes) * 8 / 1e3 / stats_.total_time_ms
                               : 0;
  Publish(Phase::kDone, stats_.rounds, 0, stats_.expected_downtime_ms);
  if (callbacks_.on_done) callbacks_.on_done(stats_);
  return stats_;
}

RoundSummary MigrationSource::Summarize(uint32_t round, uint64_t remaining, Clock::TimePoint collect_start) {
  RoundSummary r;
  r.round = round;
  r.remaining_pages = remaining;
  // Bytes per page on the wire so far (zero pages and compression make it
  // smaller than 4 KiB), times what is left, over the measured bandwidth.
  r.bytes_per_page = stats_.transferred.pages > 0 ? static_cast<double>(stats_.transferred.wire_bytes) /
                                                        static_cast<double>(stats_.transferred.pages)
                                                  : static_cast<double>(kPageSize);
  r.bandwidth_bytes_per_s = BandwidthBytesPerSecond();
  r.expected_downtime_ms = ExpectedDowntimeMs(remaining, r.bytes_per_page, r.bandwidth_bytes_per_s);
  if (!stats_.round_stats.empty()) {
    const double since = stats_.round_stats.back().duration_ms + MsSince(clock_, collect_start);
    stats_.dirty_pages_rate = since > 0 ? static_cast<double>(remaining) / (since / 1000.0) : 0;
  }
  r.dirty_pages_rate = stats_.dirty_pages_rate;
  r.wire_bytes = stats_.transferred.wire_bytes;
  if (!stats_.round_stats.empty()) {
    r.last_round_wire_bytes = stats_.round_stats.back().sent.wire_bytes;
    r.last_round_ms = stats_.round_stats.back().duration_ms;
  }
  std::lock_guard lock(progress_mu_);
  if (throttle_) {
    const ThrottleStats t = throttle_->stats();
    r.throttle_pct = t.duty_pct;
    r.vcpu_quota_pages_per_s = t.quota_pages_per_s;
    r.can_throttle = t.can_throttle;
    if (t.per_vcpu_rates) {
      for (const VcpuRate& v : t.vcpus) r.vcpu_dirty_rates.push_back(v.dirty_pages_per_s);
    }
  }
  return r;
}

void MigrationSource::CompareDigests(const FinalReply& reply, const std::vector<uint64_t>& mine) {
  CompareDigests(digest_->layout(), reply, mine);
}

void MigrationSource::CompareDigests(const ChunkLayout& layout, const FinalReply& reply,
                                     const std::vector<uint64_t>& mine) {
  VerifyReport& v = stats_.verification;
  if (reply.chunk_digests.empty()) {
    v.verdict = VerifyVerdict::kNotDone;
    v.detail = "the target returned no memory digests (a receiver older than pmlmig 0.3)";
    return;
  }
  if (reply.chunk_digests.size() != mine.size() || reply.chunk_bytes != layout.chunk_bytes()) {
    v.verdict = VerifyVerdict::kNotDone;
    v.detail = "the target returned " + std::to_string(reply.chunk_digests.size()) + " digests of " +
               std::to_string(reply.chunk_bytes) + "-byte chunks; this source has " + std::to_string(mine.size()) +
               " of " + std::to_string(layout.chunk_bytes());
    return;
  }
  v.mismatch = CompareChunkDigests(layout, mine, reply.chunk_digests);
  if (v.mismatch.empty()) {
    v.verdict = VerifyVerdict::kMatched;
    v.detail = "all " + std::to_string(mine.size()) + " chunk digests match";
  } else {
    v.verdict = VerifyVerdict::kMismatch;
    v.detail = "the target's memory differs from the source's at the pause point: " + v.mismatch.Describe();
  }
}

std::optional<MigrationStats> MigrationSource::CommitSwitch(Clock::TimePoint pause, const FinalReply& reply,
                                                          const char* what) {
  const CommitResult commit = sink_.Commit();
  if (commit.state == CommitState::kNotCommitted) {
    return Finished(Outcome::kFailed, CancelReason::kNone,
                    commit.detail.WithContext(std::string(what) + ": the target does not run the VM"));
  }
  if (commit.state == CommitState::kInDoubt) return Finished(Outcome::kInDoubt, CancelReason::kNone, commit.detail);
  stats_.commit_resolved = commit.resolved;
  stats_.downtime_ms = MsSince(clock_, pause);
  stats_.final_reply = reply;
  stats_.final_reply.target_resume_ms = commit.target_resume_ms;
  return std::nullopt;
}

void MigrationSource::CompareDigests(const FinalReply& reply, const Result<std::vector<uint64_t>>& mine) {
  if (mine.ok()) {
    CompareDigests(reply, *mine);
    return;
  }
  stats_.verification.verdict = VerifyVerdict::kNotDone;
  stats_.verification.detail = "the source's digest failed: " + mine.status().message();
}

MigrationStats MigrationSource::RunPostcopy(Clock::TimePoint pause, std::vector<PageRun> owed) {
  auto failed = [&](const Status& s) { return Finished(Outcome::kFailed, CancelReason::kNone, s); };
  StopThrottle();  // the vCPUs are paused; nothing to slow any more
  PostcopyBacklog backlog(vm_.memory_slots(), owed);
  stats_.postcopy.used = true;
  stats_.postcopy.owed_pages = backlog.total_pages();
  Publish(Phase::kStopAndCopy, stats_.rounds, backlog.total_pages(), 0);
  if (digest_) digest_->Hold();  // it finishes after the commit, outside the downtime
  FinalState final_state;
  {
    auto state = vm_.SaveState();
    if (!state.ok()) return failed(state.status().WithContext("save state"));
    final_state.vm_state = std::move(*state);
  }
  final_state.postcopy = true;
  final_state.postcopy_pages = std::move(owed);
  final_state.source_paused_ms = MsSince(clock_, pause);
  auto reply = sink_.Finish(final_state);
  if (!reply.ok()) return failed(reply.status().WithContext("post-copy switch"));
  if (!reply->prepared) return failed(Internal("the target did not prepare the VM: " + reply->verify_detail));
  FailPoint("source.prepared");
  Publish(Phase::kCommit, stats_.rounds, backlog.total_pages(), 0);
  if (std::optional<MigrationStats> ended = CommitSwitch(pause, *reply, "post-copy switch")) return *ended;
  stats_.postcopy.switch_ms = stats_.downtime_ms;
  (void)tracker_.Disable();  // this copy never runs again unless post-copy fails and the caller decides so
  // The VM runs on the target; the pages it lacks go out from this paused
  // copy, which stays intact until the target holds every one.
  const auto running = clock_.Now();
  {
    std::lock_guard lock(progress_mu_);
    progress_.phase = Phase::kPostcopy;
  }
  std::atomic<bool> serving{true};
  // The progress of a phase that runs inside one sink call: published from
  // here while Run()'s thread waits in it (so still one caller at a time).
  std::thread watch([&] {
    for (int tick = 0; serving.load(); ++tick) {
      MigrationProgress p;
      {
        std::lock_guard lock(progress_mu_);
        progress_.remaining_pages = backlog.left();
        progress_.postcopy_requests = backlog.requests();
        progress_.postcopy_pushed_pages = backlog.pushed();
        progress_.postcopy_latency_p50_ms = backlog.latency_p50_ms();
        progress_.postcopy_latency_p99_ms = backlog.latency_p99_ms();
        progress_.postcopy_link_down = backlog.link_down();
        progress_.postcopy_recoveries = backlog.recoveries();
        progress_.elapsed_ms = MsSince(clock_, start_);
        p = progress_;
      }
      if (tick % 5 == 4 && callbacks_.on_progress) callbacks_.on_progress(p);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  Publish(Phase::kPostcopy, stats_.rounds, backlog.left(), 0);
  Result<PostcopyResult> served = sink_.Postcopy(backlog);
  serving.store(false);
  watch.join();
  stats_.postcopy.phase_ms = MsSince(clock_, running);
  if (!served.ok()) {
    // What the source knows without the target's report: the links resumed
    // before the one that failed, the requests it answered, the pages it
    // pushed (the bytes are in the sink's totals, which Finished takes).
    PostcopyResult& r = stats_.postcopy.result;
    r.recoveries = backlog.recoveries();
    r.requests_served = backlog.requests();
    r.background_pages = backlog.pushed();
    r.latency_p50_ms = backlog.latency_p50_ms();
    r.latency_p99_ms = backlog.latency_p99_ms();
    stats_.postcopy.owed_left = backlog.left();
    return Finished(Outcome::kPostcopyFailed, CancelReason::kNone,
                    served.status().WithContext("post-copy failed after the switch (the VM ran on the target, which "
                                                "could not get every page; this copy stays paused as of the switch)"));
  }
  stats_.postcopy.result = *served;
  stats_.transferred += served->pushed;
  stats_.transferred += served->answered;
  ++stats_.rounds;
  if (digest_ && served->done_lost) {
    stats_.verification.verdict = VerifyVerdict::kNotDone;
    stats_.verification.detail =
        "every page reached the target, but its digests were lost with the link (it completed while the link was "
        "down); compare on the target";
  } else if (digest_) {
    const auto t = clock_.Now();
    Result<std::vector<uint64_t>> mine = digest_->AtPause();
    stats_.verification.source_digest_ms = MsSince(clock_, t);
    FinalReply theirs;
    theirs.chunk_digests = served->chunk_digests;
    theirs.chunk_bytes = served->chunk_bytes;
    CompareDigests(theirs, mine);
  }
  return Finished(Outcome::kCompleted, CancelReason::kNone, Status::Ok());
}

// A copy was made (a snapshot): the VM resumes here. Its downtime is the
// pause, as for a migration.
MigrationStats MigrationSource::KeptSource(Clock::TimePoint pause) {
  stats_.source_kept = true;
  if (digest_ && options_.verify_order == VerifyOrder::kAfterCommit) digest_.reset();  // nothing to compare with
  (void)tracker_.Disable();
  if (Status s = vm_.Resume(); !s.ok()) {
    return Finished(Outcome::kFailed, CancelReason::kNone, s.WithContext("resume after the copy was made"));
  }
  stats_.downtime_ms = MsSince(clock_, pause);
  return Finished(Outcome::kCompleted, CancelReason::kNone, Status::Ok());
}

MigrationStats MigrationSource::RunPhases() {
  Publish(Phase::kSetup, 0, 0, 0);

  MigrationSetup setup;
  setup.vm_description = vm_description_;
  setup.vcpus = vm_.vcpu_count();
  setup.verify = options_.verify;
  setup.verify_order = options_.verify_order;
  stats_.verification.order = options_.verify_order;
  stats_.throttle.aid = options_.policy ? ConvergeAid::kNone : options_.convergence.aid;
  for (const MemorySlot& s : vm_.memory_slots().slots()) setup.memory.push_back({s.slot, s.gpa, s.size});
  if (sink_.shares_memory()) return RunHandover(std::move(setup));
  if (Status s = CheckAid(); !s.ok()) return Finished(Outcome::kFailed, CancelReason::kNone, s);
  if (Status s = sink_.Begin(setup, vm_.memory_slots()); !s.ok()) {
    return Finished(Outcome::kFailed, CancelReason::kNone, s.WithContext("setup"));
  }
  stats_.setup_time_ms = MsSince(clock_, start_);
  auto failed = [&](const Status& s) { return Finished(Outcome::kFailed, CancelReason::kNone, s); };
  const PostcopyMode postcopy = options_.convergence.postcopy;
  stats_.postcopy.mode = postcopy;
  if (postcopy != PostcopyMode::kOff && !sink_.can_postcopy()) {
    return failed(Unavailable("post-copy: the target cannot take it (a receiver older than pmlmig 0.6, or a host "
                              "without userfaultfd)"));
  }
  if (postcopy == PostcopyMode::kNow) {
    // Pure post-copy: nothing is sent before the switch; every page with
    // data is owed.
    if (options_.verify) {
      digest_ = std::make_unique<SourceDigest>(vm_.memory_slots());
      digest_->Start();
    }
    const auto pause = clock_.Now();
    if (Status s = vm_.Pause(); !s.ok()) return failed(s.WithContext("pause"));
    return RunPostcopy(pause, PagesWithData());
  }

  if (!options_.live) return RunPaused();
  // Tracking on before the first read of memory: every later write is seen.
  DirtySet dirty(vm_.memory_slots());
  if (Status s = tracker_.Enable(); !s.ok()) return failed(s.WithContext("tracker"));
  {
    auto throttle = VcpuThrottle::Start(vm_, tracker_);
    std::lock_guard lock(progress_mu_);
    throttle_ = std::move(throttle);
  }
  if (options_.verify) {  // its witness, like the tracker, on before memory is first read
    digest_ = std::make_unique<SourceDigest>(vm_.memory_slots());
    digest_->Start();
  }
  {
    std::vector<PageRun> runs = PagesWithData();
    uint64_t pages = 0;
    for (const PageRun& r : runs) pages += r.pages;
    if (Status s = SendRound(0, std::move(runs), pages, 0); !s.ok()) return failed(s);
  }

  // Live rounds, each decided by the policy.
  for (uint32_t round = 1;; ++round) {
    if (cancel_.load()) return Finished(Outcome::kCancelled, CancelReason::kRequested, Aborted("cancelled by request"));
    const auto collect_start = clock_.Now();
    if (Status s = tracker_.Collect(dirty); !s.ok()) return failed(s.WithContext("collect"));
    if (digest_) {
      if (Status s = digest_->Refresh(); !s.ok()) return failed(s);
    }
    const RoundSummary summary = Summarize(round, dirty.Count(), collect_start);
    last_expected_ms_ = summary.expected_downtime_ms;
    stats_.expected_downtime_ms = summary.expected_downtime_ms;
    const SwitchoverDecision d = policy_->Decide(summary);
    if (d.action == SwitchoverAction::kStopAndCopy) break;
    if (d.action == SwitchoverAction::kPostcopy) {
      if (!sink_.can_postcopy()) {
        return failed(Unavailable("the switch-over policy asked for post-copy, which the target cannot take"));
      }
      // What this round would have sent is owed: the target makes it
      // missing while the VM still runs here (outside the downtime).
      const std::vector<PageRun> stale = RunsOf(dirty);
      if (Status s = sink_.PreparePostcopy(stale); !s.ok()) return failed(s.WithContext("post-copy prepare"));
      const auto pause = clock_.Now();
      if (Status s = vm_.Pause(); !s.ok()) return failed(s.WithContext("pause"));
      // Everything written since the last round: owed, and followed through
      // the tracker no more (the VM runs on the target from the switch).
      if (Status s = tracker_.Collect(dirty); !s.ok()) return failed(s.WithContext("final collect"));
      for (const PageRun& r : stale) {
        if (Status s = dirty.MarkRange(r.gpa, r.pages << kPageShift); !s.ok()) return failed(s);
      }
      if (digest_) digest_->Queue(dirty);
      return RunPostcopy(pause, RunsOf(dirty));
    }
    if (d.action == SwitchoverAction::kThrottle) {
      if (Status s = ApplyThrottle(d.throttle); !s.ok()) return failed(s.WithContext("throttle"));
    }
    if (d.action == SwitchoverAction::kAbort) {
      const bool gave_up = d.reason == SwitchoverReason::kOutOfRounds || d.reason == SwitchoverReason::kOutOfTime ||
                           d.reason == SwitchoverReason::kNotConverging;
      std::string why = d.detail.empty() ? "the switch-over policy aborted the migration" : d.detail;
      return Finished(Outcome::kCancelled, gave_up ? CancelReason::kNotConverging : CancelReason::kPolicy,
                      Aborted(why + "; the VM keeps running here"));
    }
    if (Status s = SendRound(round, RunsOf(dirty), summary.remaining_pages, summary.expected_downtime_ms); !s.ok()) {
      return failed(s);
    }
  }
  const double expected_ms = stats_.expected_downtime_ms;

  // Stop and copy.
  const auto pause = clock_.Now();
  if (Status s = vm_.Pause(); !s.ok()) return failed(s.WithContext("pause"));
  // Complete collection: with the vCPUs out of guest mode, every write
  // (and every PML buffer) is in the logs. ORs into what is still unsent.
  if (Status s = tracker_.Collect(dirty); !s.ok()) return failed(s.WithContext("final collect"));
  const uint64_t final_pages = dirty.Count();
  final_round_ = true;
  Publish(Phase::kStopAndCopy, stats_.rounds, final_pages, expected_ms);
  // Verifying before Commit, the source's digest runs alongside the final
  // round (both only read the paused memory).
  std::optional<std::thread> digesting;
  Result<std::vector<uint64_t>> mine = std::vector<uint64_t>{};
  double digest_ms = 0;
  auto digest_now = [&] {
    const auto t = clock_.Now();
    mine = digest_->AtPause();
    digest_ms = MsSince(clock_, t);
  };
  if (digest_) {
    digest_->Queue(dirty);
    if (options_.verify_order == VerifyOrder::kBeforeCommit) {
      digesting.emplace(digest_now);
    } else {
      digest_->Hold();  // after commit it finishes; nothing of it inside the downtime
    }
  }
  auto join = [&] {
    if (digesting) digesting->join();
    digesting.reset();
  };
  if (Status s = SendRound(stats_.rounds, RunsOf(dirty), final_pages, expected_ms); !s.ok()) {
    join();
    return failed(s);
  }
  FinalState final_state;
  {
    auto state = vm_.SaveState();
    join();
    if (!state.ok()) return failed(state.status().WithContext("save state"));
    final_state.vm_state = std::move(*state);
  }
  if (digest_ && options_.verify_order == VerifyOrder::kBeforeCommit) {
    if (!mine.ok()) return failed(mine.status());
    stats_.verification.source_digest_ms = digest_ms;
    final_state.has_digest = true;
    final_state.chunk_digests = *mine;
    final_state.chunk_bytes = digest_->layout().chunk_bytes();
    for (uint64_t d : *mine) final_state.memory_digest += d;
  }
  final_state.source_paused_ms = MsSince(clock_, pause);
  auto reply = sink_.Finish(final_state);
  if (!reply.ok()) {
    if (digest_ && reply.status().code() == Code::kDataLoss &&
        reply.status().message().find("verify:") != std::string::npos) {
      stats_.verification.verdict = VerifyVerdict::kMismatch;  // the target compared and refused
      stats_.verification.detail = reply.status().message();
    }
    return failed(reply.status().WithContext("switch-over"));
  }
  if (!reply->prepared) return failed(Internal("the target did not prepare the VM: " + reply->verify_detail));
  if (digest_ && options_.verify_order == VerifyOrder::kBeforeCommit) {
    CompareDigests(*reply, *mine);
    if (stats_.verification.verdict != VerifyVerdict::kMatched) {
      return failed(DataLoss("verify: " + stats_.verification.detail));
    }
  }
  FailPoint("source.prepared");
  // Point of no return: from here the source never resumes its VM unless the
  // target is known not to run it.
  Publish(Phase::kCommit, stats_.rounds, 0, expected_ms);
  if (std::optional<MigrationStats> ended = CommitSwitch(pause, *reply, "switch-over")) return *ended;
  if (sink_.keeps_source()) return KeptSource(pause);
  if (digest_ && options_.verify_order == VerifyOrder::kAfterCommit) {
    // The VM runs on the target; this copy stays paused while the source
    // digests it and compares.
    digest_now();
    stats_.verification.source_digest_ms = digest_ms;
    CompareDigests(stats_.final_reply, mine);
  }
  return Finished(Outcome::kCompleted, CancelReason::kNone, Status::Ok());
}

}  // namespace pmlmig::engine
