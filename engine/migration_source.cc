#include "pmlmig/engine/migration_source.h"

#include "pmlmig/base/failpoint.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <condition_variable>
#include <thread>

namespace pmlmig::engine {
namespace {

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

}  // namespace

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

MigrationSource::MigrationSource(VmControl& vm, DirtyTracker& tracker, MigrationSink& sink,
                                 const MigrationOptions& options, std::string vm_description)
    : vm_(vm), tracker_(tracker), sink_(sink), options_(options), vm_description_(std::move(vm_description)) {}

MigrationProgress MigrationSource::progress() const {
  std::lock_guard lock(progress_mu_);
  return progress_;
}

void MigrationSource::Publish(const std::string& phase, uint32_t round, uint64_t remaining, double expected_ms) {
  MigrationProgress p;
  p.phase = phase;
  p.round = round;
  p.remaining_pages = remaining;
  p.bandwidth_mbps = BandwidthBytesPerSecond() * 8 / 1e6;
  p.expected_downtime_ms = expected_ms;
  p.wire_bytes = stats_.transferred.wire_bytes;
  p.elapsed_ms = MsSince(start_);
  {
    std::lock_guard lock(progress_mu_);
    progress_ = p;
  }
  if (on_progress_) on_progress_(p);
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

Status MigrationSource::SendRound(uint32_t round, std::vector<PageRun> runs, uint64_t dirty, double expected_ms) {
  FailPoint("source.round");
  PageList list(std::move(runs));
  if (!final_round_) Publish("round", round, list.total_pages(), expected_ms);
  const auto t = Clock::now();
  auto sent = sink_.SendPages(round, list);
  if (!sent.ok()) return sent.status().WithContext("round " + std::to_string(round));
  RoundStats r;
  r.round = round;
  r.dirty_pages = dirty;
  r.sent = *sent;
  r.duration_ms = MsSince(t);
  r.bandwidth_mbps = r.duration_ms > 0 ? static_cast<double>(r.sent.wire_bytes) * 8 / 1e3 / r.duration_ms : 0;
  r.expected_downtime_ms = expected_ms;
  stats_.transferred += r.sent;
  stats_.round_stats.push_back(r);
  ++stats_.rounds;
  return Status::Ok();
}

Status MigrationSource::Fail(const Status& why) {
  // Keep the VM here: logging off, vCPUs running, the target told to drop
  // what it has.
  sink_.Abort(why.message());
  (void)tracker_.Disable();
  Status resumed = vm_.Resume();
  if (!resumed.ok()) return why.WithContext("and resuming the source VM failed (" + resumed.message() + ")");
  return why;
}

MigrationStats MigrationSource::Run() {
  start_ = Clock::now();
  stats_ = MigrationStats{};
  final_round_ = false;
  // With --on-timeout cancel, the timeout also ends a round in progress: a
  // watchdog aborts the transfer (Run() then reports it and resumes the VM).
  std::mutex watchdog_mu;
  std::condition_variable watchdog_cv;
  bool finished = false;
  std::thread watchdog;
  if (options_.timeout.count() > 0 && !options_.force_on_timeout) {
    watchdog = std::thread([&] {
      std::unique_lock lock(watchdog_mu);
      if (!watchdog_cv.wait_until(lock, start_ + options_.timeout, [&] { return finished; })) {
        timed_out_.store(true);
        sink_.Abort("migration timeout");
      }
    });
  }
  MigrationStats result = RunPhases();
  {
    std::lock_guard lock(watchdog_mu);
    finished = true;
  }
  watchdog_cv.notify_all();
  if (watchdog.joinable()) watchdog.join();
  return result;
}

MigrationStats MigrationSource::RunPhases() {
  Publish("setup", 0, 0, 0);

  MigrationSetup setup;
  setup.vm_description = vm_description_;
  setup.vcpus = vm_.vcpu_count();
  setup.verify = options_.verify;
  for (const MemorySlot& s : vm_.memory_slots().slots()) setup.memory.push_back({s.slot, s.gpa, s.size});
  if (Status s = sink_.Begin(setup, vm_.memory_slots()); !s.ok()) {
    stats_.error = Fail(s.WithContext("setup")).message();
    stats_.total_time_ms = MsSince(start_);
    return stats_;
  }
  stats_.setup_time_ms = MsSince(start_);

  DirtySet dirty(vm_.memory_slots());
  auto finish_failed = [&](const Status& s, const char* status) {
    Status why = s;
    if (timed_out_.load()) {
      status = "cancelled";
      char buf[400];
      if (stats_.rounds >= 1) {  // round 0 done: the live rounds did not converge
        std::snprintf(buf, sizeof buf,
                      "not converging: timed out after %lld ms in round %u; the expected downtime was still %.0f ms "
                      "against a limit of %lld ms (about %.0f pages/s dirtied); the VM keeps running here (raise "
                      "--downtime-limit or --timeout, or use --on-timeout force)",
                      static_cast<long long>(options_.timeout.count()), stats_.rounds, last_expected_ms_,
                      static_cast<long long>(options_.downtime_limit.count()), stats_.dirty_pages_rate);
      } else {
        std::snprintf(buf, sizeof buf,
                      "timed out after %lld ms while sending all memory (round 0); the VM keeps running here "
                      "(raise --timeout)",
                      static_cast<long long>(options_.timeout.count()));
      }
      why = Aborted(buf);
    }
    stats_.status = status;
    stats_.error = Fail(why).message();
    // What went out includes the part of the round that failed.
    if (const TransferStats sent = sink_.totals(); sent.wire_bytes > stats_.transferred.wire_bytes) {
      stats_.transferred = sent;
    }
    stats_.total_time_ms = MsSince(start_);
    stats_.throughput_mbps = stats_.total_time_ms > 0
                                 ? static_cast<double>(stats_.transferred.wire_bytes) * 8 / 1e3 / stats_.total_time_ms
                                 : 0;
    Publish("done", stats_.rounds, 0, 0);
    return stats_;
  };

  // Tracking on before the first read of memory: every later write is seen.
  if (Status s = tracker_.Enable(); !s.ok()) return finish_failed(s.WithContext("tracker"), "failed");
  {
    std::vector<PageRun> runs = PagesWithData();
    uint64_t pages = 0;
    for (const PageRun& r : runs) pages += r.pages;
    if (Status s = SendRound(0, std::move(runs), pages, 0); !s.ok()) return finish_failed(s, "failed");
  }

  // Live rounds.
  double expected_ms = 0;
  for (uint32_t round = 1;; ++round) {
    if (cancel_.load()) return finish_failed(Aborted("cancelled by request"), "cancelled");
    const auto collect_start = Clock::now();
    if (Status s = tracker_.Collect(dirty); !s.ok()) return finish_failed(s.WithContext("collect"), "failed");
    const uint64_t remaining = dirty.Count();
    // Bytes per page on the wire so far (zero pages and compression make it
    // smaller than 4 KiB), times what is left, over the measured bandwidth.
    const double per_page = stats_.transferred.pages > 0 ? static_cast<double>(stats_.transferred.wire_bytes) /
                                                                static_cast<double>(stats_.transferred.pages)
                                                          : static_cast<double>(kPageSize);
    const double bw = BandwidthBytesPerSecond();
    expected_ms = bw > 0 ? static_cast<double>(remaining) * per_page / bw * 1000.0 : 1e9;
    last_expected_ms_ = expected_ms;
    if (!stats_.round_stats.empty()) {
      const RoundStats& last = stats_.round_stats.back();
      const double since = last.duration_ms + std::chrono::duration<double, std::milli>(Clock::now() - collect_start).count();
      stats_.dirty_pages_rate = since > 0 ? static_cast<double>(remaining) / (since / 1000.0) : 0;
    }
    if (expected_ms <= static_cast<double>(options_.downtime_limit.count())) break;
    const bool out_of_rounds = round > options_.max_rounds;
    const bool out_of_time = options_.timeout.count() > 0 && MsSince(start_) >= static_cast<double>(options_.timeout.count());
    if (out_of_rounds || out_of_time) {
      if (!options_.force_on_timeout) {
        char why[512];
        std::snprintf(why, sizeof why,
                      "not converging: after %u rounds and %.0f ms, %llu pages stay dirty (about %.0f pages/s) and "
                      "the expected downtime is %.0f ms against a limit of %lld ms at %.0f Mbit/s; the VM keeps "
                      "running here (raise --downtime-limit, --max-rounds or --timeout, or use --on-timeout force)",
                      round - 1, MsSince(start_), static_cast<unsigned long long>(remaining), stats_.dirty_pages_rate,
                      expected_ms, static_cast<long long>(options_.downtime_limit.count()), bw * 8 / 1e6);
        return finish_failed(Aborted(why), "cancelled");
      }
      break;  // force: switch over anyway
    }
    if (Status s = SendRound(round, RunsOf(dirty), remaining, expected_ms); !s.ok()) return finish_failed(s, "failed");
  }
  stats_.expected_downtime_ms = expected_ms;

  // Stop and copy.
  const auto pause = Clock::now();
  if (Status s = vm_.Pause(); !s.ok()) return finish_failed(s.WithContext("pause"), "failed");
  // Complete collection: with the vCPUs out of guest mode, every write
  // (and every PML buffer) is in the logs. ORs into what is still unsent.
  if (Status s = tracker_.Collect(dirty); !s.ok()) return finish_failed(s.WithContext("final collect"), "failed");
  const uint64_t final_pages = dirty.Count();
  final_round_ = true;
  Publish("stop-and-copy", stats_.rounds, final_pages, expected_ms);
  if (Status s = SendRound(stats_.rounds, RunsOf(dirty), final_pages, expected_ms); !s.ok()) {
    return finish_failed(s, "failed");
  }
  FinalState final_state;
  {
    auto state = vm_.SaveState();
    if (!state.ok()) return finish_failed(state.status().WithContext("save state"), "failed");
    final_state.vm_state = std::move(*state);
  }
  if (options_.verify) {
    final_state.has_digest = true;
    final_state.memory_digest = MemoryDigest(vm_.memory_slots());
  }
  final_state.source_paused_ms = MsSince(pause);
  auto reply = sink_.Finish(final_state);
  if (!reply.ok()) return finish_failed(reply.status().WithContext("switch-over"), "failed");
  if (!reply->prepared) {
    return finish_failed(Internal("the target did not prepare the VM: " + reply->verify_detail), "failed");
  }
  FailPoint("source.prepared");
  // Point of no return: from here the source never resumes its VM unless the
  // target is known not to run it.
  Publish("commit", stats_.rounds, 0, expected_ms);
  const CommitResult commit = sink_.Commit();
  if (commit.state == CommitState::kNotCommitted) {
    return finish_failed(commit.detail.WithContext("switch-over: the target does not run the VM"), "failed");
  }
  if (commit.state == CommitState::kInDoubt) {
    (void)tracker_.Disable();
    stats_.status = "in-doubt";
    stats_.error = commit.detail.message();
    stats_.total_time_ms = MsSince(start_);
    Publish("done", stats_.rounds, 0, expected_ms);
    return stats_;
  }
  reply->target_resume_ms = commit.target_resume_ms;
  stats_.commit_resolved = commit.resolved;
  stats_.downtime_ms = MsSince(pause);
  stats_.final_reply = *reply;
  stats_.verified = reply->verified;
  (void)tracker_.Disable();
  stats_.status = "completed";
  stats_.total_time_ms = MsSince(start_);
  stats_.throughput_mbps =
      stats_.total_time_ms > 0 ? static_cast<double>(stats_.transferred.wire_bytes) * 8 / 1e3 / stats_.total_time_ms : 0;
  Publish("done", stats_.rounds, 0, expected_ms);
  return stats_;
}

}  // namespace pmlmig::engine
