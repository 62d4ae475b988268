// MigrationSource and MigrationController against fakes: a VM in plain
// memory, a scripted tracker, a sink that records. The switch-over policy,
// the outcomes and what happens to the source VM after each, without KVM.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "pmlmig/engine/migration_controller.h"
#include "pmlmig/engine/migration_source.h"

namespace pmlmig::engine {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kPages = 256;

class FakeVm final : public VmControl {
 public:
  FakeVm() {
    mem_ = static_cast<uint8_t*>(mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    EXPECT_NE(mem_, MAP_FAILED);
    EXPECT_TRUE(slots_.Set({.slot = 0, .gpa = 0, .host = mem_, .size = kPages * kPageSize}).ok());
  }
  ~FakeVm() override { munmap(mem_, kPages * kPageSize); }
  const SlotTable& memory_slots() const override { return slots_; }
  int vm_fd() const override { return -1; }
  uint32_t vcpu_count() const override { return 1; }
  int vcpu_fd(uint32_t) const override { return -1; }
  uint32_t dirty_ring_entries() const override { return 0; }
  Status SetDirtyLogging(bool) override { return Status::Ok(); }
  Status Pause() override {
    paused = true;
    ++pauses;
    return Status::Ok();
  }
  Status Resume() override {
    ++resumes;
    if (fail_resume) return Internal("the test VMM cannot resume");
    paused = false;
    return Status::Ok();
  }
  Status KickAll() override { return Status::Ok(); }
  void SetDirtyRingFullHandler(std::function<Status(uint32_t)>) override {}
  Result<std::vector<uint8_t>> SaveState() override { return std::vector<uint8_t>{1, 2, 3}; }
  Status LoadState(std::span<const uint8_t>) override { return Status::Ok(); }

  bool paused = false;
  bool fail_resume = false;
  int pauses = 0;
  int resumes = 0;

 private:
  uint8_t* mem_ = nullptr;
  SlotTable slots_;
};

// Reports `dirty_per_collect` pages at every Collect (pages 0..n-1).
class ScriptedTracker final : public DirtyTracker {
 public:
  explicit ScriptedTracker(uint64_t dirty_per_collect) : n_(dirty_per_collect) {}
  std::string_view name() const override { return "scripted"; }
  Status Enable() override {
    enabled = true;
    return Status::Ok();
  }
  Status Collect(DirtySet& out) override {
    for (uint64_t p = 0; p < n_; ++p) out.MarkGpa(p * kPageSize);
    ++collections;
    return Status::Ok();
  }
  Status Disable() override {
    enabled = false;
    return Status::Ok();
  }
  TrackerStats stats() const override { return {}; }
  bool enabled = false;
  int collections = 0;

 private:
  uint64_t n_;
};

class RecordingSink final : public MigrationSink {
 public:
  Status Begin(const MigrationSetup& setup, const SlotTable&) override {
    description = setup.vm_description;
    return Status::Ok();
  }
  Result<TransferStats> SendPages(uint32_t round, PageList& pages) override {
    {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return !hold || aborted; });
      if (aborted) return Aborted("aborted: " + abort_reason);
    }
    if (static_cast<int>(round) == fail_round) return Unavailable("receiver gone");
    TransferStats st;
    PageRun run;
    while (pages.Next(64, &run)) {
      st.pages += run.pages;
      st.normal_pages += run.pages;
      st.wire_bytes += run.pages * kPageSize;
      ++st.batches;
    }
    rounds.push_back(round);
    return st;
  }
  Result<FinalReply> Finish(const FinalState& state) override {
    finished = true;
    state_size = state.vm_state.size();
    FinalReply r;
    r.prepared = true;
    return r;
  }
  CommitResult Commit() override {
    CommitResult r;
    r.state = commit_state;
    if (r.state != CommitState::kCommitted) r.detail = Unavailable("commit reply lost");
    return r;
  }
  void Abort(const std::string& why) override {
    std::lock_guard lock(mu);
    aborted = true;
    abort_reason = why;
    cv.notify_all();
  }
  void Release() {
    std::lock_guard lock(mu);
    hold = false;
    cv.notify_all();
  }

  std::mutex mu;
  std::condition_variable cv;
  bool hold = false;     // guarded by mu: SendPages waits while set
  bool aborted = false;  // guarded by mu
  std::string abort_reason;
  int fail_round = -1;
  CommitState commit_state = CommitState::kCommitted;
  std::vector<uint32_t> rounds;
  std::string description;
  bool finished = false;
  size_t state_size = 0;
};

// Records every summary and decides by a script.
class ScriptedPolicy final : public SwitchoverPolicy {
 public:
  explicit ScriptedPolicy(uint32_t act_at, SwitchoverAction action) : act_at_(act_at), action_(action) {}
  SwitchoverDecision Decide(const RoundSummary& r) override {
    seen.push_back(r);
    if (r.round < act_at_) return SwitchoverDecision::Continue();
    return {action_, SwitchoverReason::kPolicy, action_ == SwitchoverAction::kAbort ? "the guest is too busy" : ""};
  }
  std::vector<RoundSummary> seen;

 private:
  uint32_t act_at_;
  SwitchoverAction action_;
};

MigrationOptions WithPolicy(std::shared_ptr<SwitchoverPolicy> p) {
  MigrationOptions o;
  o.policy = std::move(p);
  return o;
}

TEST(MigrationSource, PolicyStopAndCopyCompletesAndLeavesTheVmPaused) {
  FakeVm vm;
  ScriptedTracker tracker(10);
  RecordingSink sink;
  auto policy = std::make_shared<ScriptedPolicy>(3, SwitchoverAction::kStopAndCopy);
  MigrationSource source(vm, tracker, sink, WithPolicy(policy), "desc");
  std::vector<uint32_t> round_events;
  MigrationCallbacks callbacks;
  callbacks.on_round = [&](const RoundStats& r) { round_events.push_back(r.round); };
  source.SetCallbacks(callbacks);
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kCompleted) << st.error;
  EXPECT_EQ(st.cancel_reason, CancelReason::kNone);
  EXPECT_TRUE(vm.paused);
  EXPECT_EQ(vm.resumes, 0);
  EXPECT_FALSE(tracker.enabled);
  EXPECT_EQ(sink.description, "desc");
  EXPECT_EQ(sink.state_size, 3u);
  // Round 0 (all of memory: no backing to skip holes with), rounds 1-2 live,
  // round 3 the stop-and-copy.
  EXPECT_EQ(sink.rounds, (std::vector<uint32_t>{0, 1, 2, 3}));
  EXPECT_EQ(round_events, sink.rounds);
  ASSERT_EQ(policy->seen.size(), 3u);
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(policy->seen[i].round, i + 1);
    EXPECT_EQ(policy->seen[i].remaining_pages, 10u);
  }
  EXPECT_EQ(st.rounds, 4u);
  EXPECT_EQ(st.transferred.pages, kPages + 10 + 10 + 10);
}

TEST(MigrationSource, PolicyAbortCancelsAndResumesTheVm) {
  FakeVm vm;
  ScriptedTracker tracker(10);
  RecordingSink sink;
  MigrationSource source(vm, tracker, sink,
                         WithPolicy(std::make_shared<ScriptedPolicy>(2, SwitchoverAction::kAbort)), "desc");
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kCancelled);
  EXPECT_EQ(st.cancel_reason, CancelReason::kPolicy);
  EXPECT_NE(st.error.find("the guest is too busy"), std::string::npos) << st.error;
  EXPECT_FALSE(vm.paused);
  EXPECT_EQ(vm.resumes, 1);
  EXPECT_FALSE(tracker.enabled);
  EXPECT_TRUE(sink.aborted);
  EXPECT_FALSE(sink.finished);
}

TEST(MigrationSource, DefaultPolicyGivesUpAsNotConverging) {
  FakeVm vm;
  ScriptedTracker tracker(200);
  RecordingSink sink;
  MigrationOptions o;
  o.convergence.downtime_limit = 0ms;  // 200 dirty pages never fit
  o.convergence.max_rounds = 3;
  MigrationSource source(vm, tracker, sink, o, "desc");
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kCancelled);
  EXPECT_EQ(st.cancel_reason, CancelReason::kNotConverging);
  EXPECT_NE(st.error.find("not converging: after 3 rounds"), std::string::npos) << st.error;
  EXPECT_EQ(st.error.find("--"), std::string::npos) << st.error;
  EXPECT_EQ(sink.rounds, (std::vector<uint32_t>{0, 1, 2, 3}));
  EXPECT_FALSE(vm.paused);
}

TEST(MigrationSource, SinkFailureFailsAndResumes) {
  FakeVm vm;
  ScriptedTracker tracker(10);
  RecordingSink sink;
  sink.fail_round = 1;
  MigrationSource source(vm, tracker, sink,
                         WithPolicy(std::make_shared<ScriptedPolicy>(5, SwitchoverAction::kStopAndCopy)), "d");
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kFailed);
  EXPECT_NE(st.error.find("round 1: receiver gone"), std::string::npos) << st.error;
  EXPECT_EQ(st.error_code, Code::kUnavailable);  // the C ABI's -EHOSTUNREACH
  EXPECT_FALSE(st.source_paused);
  EXPECT_FALSE(vm.paused);
  EXPECT_EQ(vm.resumes, 1);
}

TEST(MigrationSource, FailureWhoseResumeFailsSaysTheVmIsPaused) {
  FakeVm vm;
  vm.fail_resume = true;
  ScriptedTracker tracker(10);
  RecordingSink sink;
  sink.fail_round = 1;
  MigrationSource source(vm, tracker, sink,
                         WithPolicy(std::make_shared<ScriptedPolicy>(5, SwitchoverAction::kStopAndCopy)), "d");
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kFailed);
  EXPECT_TRUE(st.source_paused);
  EXPECT_EQ(st.error_code, Code::kUnavailable);  // the migration's failure, not the resume's
  EXPECT_NE(st.error.find("round 1: receiver gone; resuming the source VM failed too, so it stays paused here "
                          "(the test VMM cannot resume)"),
            std::string::npos)
      << st.error;
}

// Takes `first` pages of round 0, then waits for Release before the rest.
class HalfwaySink final : public MigrationSink {
 public:
  explicit HalfwaySink(uint64_t first) : first_(first) {}
  Status Begin(const MigrationSetup&, const SlotTable&) override { return Status::Ok(); }
  Result<TransferStats> SendPages(uint32_t round, PageList& pages) override {
    TransferStats st;
    PageRun run;
    if (round == 0 && pages.Next(first_, &run)) {
      st.pages += run.pages;
      std::unique_lock lock(mu_);
      halfway_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return released_; });
    }
    while (pages.Next(64, &run)) st.pages += run.pages;
    return st;
  }
  Result<FinalReply> Finish(const FinalState&) override {
    FinalReply r;
    r.prepared = true;
    return r;
  }
  CommitResult Commit() override {
    CommitResult r;
    r.state = CommitState::kCommitted;
    return r;
  }
  void Abort(const std::string&) override {}
  void WaitHalfway() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return halfway_; });
  }
  void Release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  uint64_t first_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool halfway_ = false, released_ = false;  // guarded by mu_
};

TEST(MigrationSource, ProgressCountsWhatTheTransportTookOfTheRoundInFlight) {
  FakeVm vm;
  ScriptedTracker tracker(1);
  HalfwaySink sink(100);
  MigrationSource source(vm, tracker, sink,
                         WithPolicy(std::make_shared<ScriptedPolicy>(1, SwitchoverAction::kStopAndCopy)), "d");
  MigrationStats st;
  std::thread run([&] { st = source.Run(); });
  sink.WaitHalfway();
  const MigrationProgress p = source.progress();
  EXPECT_EQ(p.phase, Phase::kRound);
  EXPECT_EQ(p.round, 0u);
  EXPECT_EQ(p.remaining_pages, kPages - 100);  // of round 0's kPages, 100 taken
  sink.Release();
  run.join();
  EXPECT_EQ(st.outcome, Outcome::kCompleted) << st.error;
  EXPECT_EQ(source.progress().phase, Phase::kDone);
}

TEST(MigrationSource, CommitInDoubtKeepsTheVmPaused) {
  FakeVm vm;
  ScriptedTracker tracker(1);
  RecordingSink sink;
  sink.commit_state = CommitState::kInDoubt;
  MigrationSource source(vm, tracker, sink,
                         WithPolicy(std::make_shared<ScriptedPolicy>(1, SwitchoverAction::kStopAndCopy)), "d");
  const MigrationStats st = source.Run();
  EXPECT_EQ(st.outcome, Outcome::kInDoubt);
  EXPECT_NE(st.error.find("commit reply lost"), std::string::npos) << st.error;
  EXPECT_TRUE(vm.paused);
  EXPECT_EQ(vm.resumes, 0);
}

TEST(MigrationController, OneAtATimeThenLatchesMigrated) {
  FakeVm vm;
  ScriptedTracker tracker(1);
  MigrationController c(vm, tracker, "desc");
  EXPECT_EQ(c.status().last, Outcome::kNone);
  EXPECT_FALSE(c.Cancel().ok());  // nothing in flight
  auto sink = std::make_unique<RecordingSink>();
  RecordingSink* held = sink.get();
  held->hold = true;  // round 0 waits until released
  ASSERT_TRUE(c.Start(std::move(sink), WithPolicy(std::make_shared<ScriptedPolicy>(1, SwitchoverAction::kStopAndCopy)))
                  .ok());
  EXPECT_TRUE(c.busy());
  const Status second = c.Start(std::make_unique<RecordingSink>(), {});
  EXPECT_FALSE(second.ok());
  EXPECT_NE(second.message().find("already in progress"), std::string::npos);
  held->Release();
  const MigrationStats st = c.Wait();
  EXPECT_EQ(st.outcome, Outcome::kCompleted) << st.error;
  const ControllerStatus s = c.status();
  EXPECT_EQ(s.vm, VmPlacement::kMigrated);
  EXPECT_FALSE(s.active);
  EXPECT_EQ(s.progress.phase, Phase::kDone);
  const Status again = c.Start(std::make_unique<RecordingSink>(), {});
  EXPECT_NE(again.message().find("already migrated"), std::string::npos) << again.message();
}

TEST(MigrationController, CancelKeepsTheVmHereAndAllowsAnotherAttempt) {
  FakeVm vm;
  ScriptedTracker tracker(1);
  MigrationController c(vm, tracker, "desc");
  auto sink = std::make_unique<RecordingSink>();
  sink->hold = true;
  ASSERT_TRUE(c.Start(std::move(sink), {}).ok());
  ASSERT_TRUE(c.Cancel().ok());
  const MigrationStats st = c.Wait();
  EXPECT_EQ(st.outcome, Outcome::kCancelled);
  EXPECT_EQ(c.status().vm, VmPlacement::kHere);
  EXPECT_FALSE(vm.paused);
  // A second attempt may start.
  ASSERT_TRUE(c.Start(std::make_unique<RecordingSink>(),
                      WithPolicy(std::make_shared<ScriptedPolicy>(1, SwitchoverAction::kStopAndCopy)))
                  .ok());
  EXPECT_EQ(c.Wait().outcome, Outcome::kCompleted);
}

TEST(MigrationController, InDoubtLatches) {
  FakeVm vm;
  ScriptedTracker tracker(1);
  MigrationController c(vm, tracker, "desc");
  auto sink = std::make_unique<RecordingSink>();
  sink->commit_state = CommitState::kInDoubt;
  ASSERT_TRUE(c.Start(std::move(sink), WithPolicy(std::make_shared<ScriptedPolicy>(1, SwitchoverAction::kStopAndCopy)))
                  .ok());
  EXPECT_EQ(c.Wait().outcome, Outcome::kInDoubt);
  EXPECT_EQ(c.status().vm, VmPlacement::kPausedInDoubt);
  const Status again = c.Start(std::make_unique<RecordingSink>(), {});
  EXPECT_NE(again.message().find("in doubt"), std::string::npos) << again.message();
}

TEST(PageListTest, HandsOutEveryPageOnceAcrossThreadsWithinRuns) {
  // Runs of odd sizes, an empty one (dropped), far apart.
  std::vector<PageRun> runs;
  uint64_t total = 0;
  for (uint64_t i = 0; i < 200; ++i) {
    const uint64_t pages = (i * 37) % 3000;
    runs.push_back({i << 32, pages});
    total += pages;
  }
  PageList list(runs);
  EXPECT_EQ(list.total_pages(), total);
  std::vector<std::vector<PageRun>> got(4);
  std::vector<std::thread> threads;
  for (auto& out : got) {
    threads.emplace_back([&list, &out] {
      PageRun r;
      while (list.Next(1024, &r)) out.push_back(r);
    });
  }
  for (auto& t : threads) t.join();
  std::vector<PageRun> all;
  for (const auto& v : got) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end(), [](const PageRun& a, const PageRun& b) { return a.gpa < b.gpa; });
  // Merged back, the chunks are exactly the non-empty runs; none crosses a run.
  std::vector<PageRun> merged;
  for (const PageRun& c : all) {
    ASSERT_GE(c.pages, 1u);
    ASSERT_LE(c.pages, 1024u);
    EXPECT_EQ(c.gpa >> 32, (c.gpa + (c.pages << kPageShift) - 1) >> 32) << "a chunk crosses a run";
    if (!merged.empty() && merged.back().gpa + (merged.back().pages << kPageShift) == c.gpa) {
      merged.back().pages += c.pages;
    } else {
      merged.push_back(c);
    }
  }
  std::vector<PageRun> want;
  for (const PageRun& r : runs) {
    if (r.pages > 0) want.push_back(r);
  }
  ASSERT_EQ(merged.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(merged[i].gpa, want[i].gpa);
    EXPECT_EQ(merged[i].pages, want[i].pages);
  }
  PageRun r;
  EXPECT_FALSE(list.Next(1024, &r));
  EXPECT_FALSE(PageList({}).Next(1, &r));
}

}  // namespace
}  // namespace pmlmig::engine
