// The default switch-over policy driven by synthetic rounds and a fake clock:
// no KVM, no sleeping.
#include "pmlmig/engine/switchover_policy.h"

#include <gtest/gtest.h>

namespace pmlmig::engine {
namespace {

using namespace std::chrono_literals;

RoundSummary Round(uint32_t round, uint64_t pages, double bandwidth_bytes_per_s) {
  RoundSummary r;
  r.round = round;
  r.remaining_pages = pages;
  r.bytes_per_page = 4096;
  r.bandwidth_bytes_per_s = bandwidth_bytes_per_s;
  r.expected_downtime_ms = ExpectedDowntimeMs(pages, r.bytes_per_page, bandwidth_bytes_per_s);
  return r;
}

TEST(ExpectedDowntime, PagesTimesBytesOverBandwidth) {
  EXPECT_DOUBLE_EQ(ExpectedDowntimeMs(1000, 4096, 4096e3), 1000.0);
  EXPECT_DOUBLE_EQ(ExpectedDowntimeMs(0, 4096, 1e6), 0.0);
  EXPECT_DOUBLE_EQ(ExpectedDowntimeMs(10, 4096, 0), 1e9);  // bandwidth not yet known: never "fits"
}

TEST(DowntimeLimitPolicy, StopsAndCopiesOnceTheExpectedDowntimeFits) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 300ms}, clock);
  p.Begin();
  // 1 GB/s: 300 ms carries 73242 pages of 4 KiB.
  EXPECT_EQ(p.Decide(Round(1, 100000, 1e9)).action, SwitchoverAction::kContinue);
  const SwitchoverDecision d = p.Decide(Round(2, 73000, 1e9));
  EXPECT_EQ(d.action, SwitchoverAction::kStopAndCopy);
  EXPECT_EQ(d.reason, SwitchoverReason::kConverged);
  // Exactly at the limit counts as fitting.
  RoundSummary at = Round(3, 1, 1e9);
  at.expected_downtime_ms = 300;
  EXPECT_EQ(p.Decide(at).action, SwitchoverAction::kStopAndCopy);
  RoundSummary above = at;
  above.expected_downtime_ms = 300.001;
  EXPECT_EQ(p.Decide(above).action, SwitchoverAction::kContinue);
}

TEST(DowntimeLimitPolicy, UnknownBandwidthNeverSwitchesOver) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 300ms}, clock);
  p.Begin();
  EXPECT_EQ(p.Decide(Round(1, 1, 0)).action, SwitchoverAction::kContinue);
}

TEST(DowntimeLimitPolicy, AbortsAfterMaxRoundsWithTheNumbersAndNoFlag) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 5}, clock);
  p.Begin();
  for (uint32_t round = 1; round <= 5; ++round) {
    clock.Advance(200ms);
    ASSERT_EQ(p.Decide(Round(round, 50000, 1e8)).action, SwitchoverAction::kContinue) << round;
  }
  clock.Advance(200ms);
  RoundSummary r = Round(6, 50000, 1e8);
  r.dirty_pages_rate = 28000;
  const SwitchoverDecision d = p.Decide(r);
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
  EXPECT_EQ(d.reason, SwitchoverReason::kOutOfRounds);
  EXPECT_NE(d.detail.find("not converging: after 5 rounds and 1200 ms, 50000 pages stay dirty"), std::string::npos)
      << d.detail;
  EXPECT_NE(d.detail.find("against a limit of 10 ms at 800 Mbit/s"), std::string::npos) << d.detail;
  EXPECT_EQ(d.detail.find("--"), std::string::npos) << "a library message names no flag: " << d.detail;
}

TEST(DowntimeLimitPolicy, TimeoutFollowsTheClockFromBegin) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 1000, .timeout = 30s}, clock);
  clock.Advance(1h);  // before Begin: does not count
  p.Begin();
  uint32_t round = 1;
  // A hundred rounds of 290 ms: 29 s, all within the timeout.
  for (; round <= 100; ++round) {
    clock.Advance(290ms);
    ASSERT_EQ(p.Decide(Round(round, 50000, 1e8)).action, SwitchoverAction::kContinue) << round;
  }
  clock.Advance(1s);
  const SwitchoverDecision d = p.Decide(Round(round, 50000, 1e8));
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
  EXPECT_EQ(d.reason, SwitchoverReason::kOutOfTime);
}

TEST(DowntimeLimitPolicy, ForceSwitchesOverInsteadOfAborting) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 2, .force_on_timeout = true}, clock);
  p.Begin();
  EXPECT_EQ(p.Decide(Round(1, 50000, 1e8)).action, SwitchoverAction::kContinue);
  EXPECT_EQ(p.Decide(Round(2, 50000, 1e8)).action, SwitchoverAction::kContinue);
  const SwitchoverDecision d = p.Decide(Round(3, 50000, 1e8));
  EXPECT_EQ(d.action, SwitchoverAction::kStopAndCopy);
  EXPECT_EQ(d.reason, SwitchoverReason::kOutOfRounds);
}

TEST(DowntimeLimitPolicy, ConvergingDirtySetStopsAtTheFirstRoundThatFits) {
  // A dirty set halving every round at 100 MB/s with a 50 ms limit: 50 ms
  // carries 1220 pages, so the first round at or under that switches over.
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 50ms}, clock);
  p.Begin();
  uint64_t pages = 1 << 20;
  uint32_t round = 1;
  for (; round < 100; ++round, pages /= 2) {
    clock.Advance(10ms);
    if (p.Decide(Round(round, pages, 1e8)).action != SwitchoverAction::kContinue) break;
  }
  EXPECT_EQ(pages, 1024u);  // 2048 pages need 84 ms; 1024 need 42 ms
  EXPECT_EQ(round, 11u);
}

}  // namespace
}  // namespace pmlmig::engine
