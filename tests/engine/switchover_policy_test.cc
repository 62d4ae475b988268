// The default switch-over policy driven by synthetic rounds and a fake clock:
// no KVM, no sleeping.
#include "pmlmig/engine/switchover_policy.h"

#include <gtest/gtest.h>

#include <vector>

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
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 5, .stall_rounds = 0}, clock);
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
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 1000, .timeout = 30s, .stall_rounds = 0}, clock);
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
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 2, .force_on_timeout = true, .stall_rounds = 0}, clock);
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


// --- Non-convergence seen early, and the aids (issue 12) -------------------

// A round of a guest that keeps `pages` dirty at 100 MB/s, each round having
// sent `last_sent` bytes, with `vcpus` measured vCPUs that can be throttled.
RoundSummary Busy(uint32_t round, uint64_t pages, uint64_t last_sent = 0, size_t vcpus = 2) {
  RoundSummary r = Round(round, pages, 1e8);
  r.last_round_wire_bytes = last_sent;
  r.can_throttle = true;
  r.vcpu_dirty_rates.assign(vcpus, 20000);
  return r;
}

TEST(DowntimeLimitPolicy, AStalledDirtySetAbortsLongBeforeMaxRounds) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 50, .stall_rounds = 5}, clock);
  p.Begin();
  // A new low every round (10% under the last) is progress, however slow.
  uint64_t pages = 100000, last = 0;
  for (uint32_t round = 1; round <= 8; ++round, pages = pages * 85 / 100) {
    clock.Advance(100ms);
    ASSERT_EQ(p.Decide(Busy(round, pages)).action, SwitchoverAction::kContinue) << round;
    last = pages;
  }
  // Then it hovers around round 8's count: five rounds without a new low end
  // it, at round 13 of 50.
  uint32_t round = 9;
  SwitchoverDecision d;
  for (; round < 50; ++round) {
    clock.Advance(100ms);
    d = p.Decide(Busy(round, last + (round % 2) * 500));
    if (d.action != SwitchoverAction::kContinue) break;
  }
  EXPECT_EQ(round, 13u);
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
  EXPECT_EQ(d.reason, SwitchoverReason::kNotConverging);
  EXPECT_NE(d.detail.find("not converging: after 12 rounds"), std::string::npos) << d.detail;
  EXPECT_NE(d.detail.find("has not shrunk below"), std::string::npos) << d.detail;
  EXPECT_EQ(d.detail.find("--"), std::string::npos) << d.detail;
}

TEST(DowntimeLimitPolicy, ForcedSwitchOverWaitsForTheRoundWithTheFewestPages) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .force_on_timeout = true, .stall_rounds = 3}, clock);
  p.Begin();
  // 40000 is the fewest; then the set hovers above it.
  const uint64_t rounds[] = {50000, 40000, 43000, 42000, 47000, 46000, 41000};
  SwitchoverDecision d;
  uint32_t round = 1;
  for (uint64_t pages : rounds) {
    clock.Advance(100ms);
    d = p.Decide(Busy(round, pages));
    if (d.action != SwitchoverAction::kContinue) break;
    ++round;
  }
  // Stalled at round 5 (47000, not close to 40000): it waits; 46000 is not
  // either; 41000 is within 10% of the fewest, so round 7 switches over.
  EXPECT_EQ(round, 7u);
  EXPECT_EQ(d.action, SwitchoverAction::kStopAndCopy);
  EXPECT_EQ(d.reason, SwitchoverReason::kNotConverging);
}

TEST(DowntimeLimitPolicy, ForcingGivesUpWaitingAfterAFewRounds) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .force_on_timeout = true, .stall_rounds = 3}, clock);
  p.Begin();
  EXPECT_EQ(p.Decide(Busy(1, 10000)).action, SwitchoverAction::kContinue);
  uint32_t round = 2;
  SwitchoverDecision d;
  for (; round < 20; ++round) {
    d = p.Decide(Busy(round, 30000));  // never close to the 10000 of round 1 again
    if (d.action != SwitchoverAction::kContinue) break;
  }
  // Stalled at round 4, then 3 rounds of grace.
  EXPECT_EQ(round, 7u);
  EXPECT_EQ(d.action, SwitchoverAction::kStopAndCopy);
}

TEST(DowntimeLimitPolicy, AutoConvergeStepsLikeQemuThenGivesUp) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 25, .stall_rounds = 0, .aid = ConvergeAid::kAutoConverge},
                        clock);
  p.Begin();
  // Every round dirties 40000 pages (164 MB) after sending 100 MB: dirty-high.
  uint32_t pct = 0;
  std::vector<uint32_t> steps;
  SwitchoverDecision d;
  for (uint32_t round = 1; round < 40; ++round) {
    RoundSummary r = Busy(round, 40000, 100'000'000);
    r.throttle_pct = pct;
    d = p.Decide(r);
    if (d.action == SwitchoverAction::kThrottle) {
      EXPECT_EQ(d.throttle.vcpu_quota_pages_per_s, 0);
      pct = d.throttle.duty_pct;
      steps.push_back(pct);
    } else if (d.action != SwitchoverAction::kContinue) {
      break;
    }
  }
  // Every second dirty-high round takes a step: 20, 30, ... 90, 99.
  EXPECT_EQ(steps, (std::vector<uint32_t>{20, 30, 40, 50, 60, 70, 80, 90, 99}));
  // At 99% it has nothing left; stall_rounds = 0, so it runs to max_rounds.
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
  EXPECT_EQ(d.reason, SwitchoverReason::kOutOfRounds);
  EXPECT_NE(d.detail.find("with every vCPU throttled 99%"), std::string::npos) << d.detail;
}

TEST(DowntimeLimitPolicy, PostcopyAutoSwitchesAtTheFirstRoundThatLeavesAQuarter) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 25, .postcopy = PostcopyMode::kAuto}, clock);
  p.Begin();
  // After round 0 (1 GiB sent) a fifth is dirty again: pre-copy goes on.
  EXPECT_EQ(p.Decide(Busy(1, 52000, 1ull << 30)).action, SwitchoverAction::kContinue);
  // Round 1 sent those 52000 pages and leaves 23000 (over a quarter): post-copy,
  // long before the dirty-high rule, the stall rule or max_rounds.
  const SwitchoverDecision d = p.Decide(Busy(2, 23000, 52000ull * 4096));
  EXPECT_EQ(d.action, SwitchoverAction::kPostcopy);
  EXPECT_EQ(d.reason, SwitchoverReason::kNotConverging);
}

TEST(DowntimeLimitPolicy, PostcopyAutoWaitsForADirtySetThatShrinksFourfold) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 25, .postcopy = PostcopyMode::kAuto}, clock);
  p.Begin();
  // Each round leaves a fifth of what it sent: pre-copy is paying off.
  uint64_t sent = 1ull << 30, pages = 52000;
  uint32_t round = 1;
  for (; round <= 4; ++round, sent = pages * 4096, pages /= 5) {
    EXPECT_EQ(p.Decide(Busy(round, pages, sent)).action, SwitchoverAction::kContinue) << "round " << round;
  }
  EXPECT_EQ(p.Decide(Busy(round, pages, sent)).action, SwitchoverAction::kStopAndCopy);  // converged, no post-copy
}

TEST(DowntimeLimitPolicy, PostcopyAutoComesAfterTheAidsSteps) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .max_rounds = 25, .stall_rounds = 0, .aid = ConvergeAid::kAutoConverge,
                         .postcopy = PostcopyMode::kAuto},
                        clock);
  p.Begin();
  uint32_t pct = 0, steps = 0;
  SwitchoverDecision d;
  for (uint32_t round = 1; round < 40; ++round) {
    RoundSummary r = Busy(round, 40000, 100'000'000);
    r.throttle_pct = pct;
    d = p.Decide(r);
    if (d.action == SwitchoverAction::kThrottle) {
      pct = d.throttle.duty_pct;
      ++steps;
    } else if (d.action != SwitchoverAction::kContinue) {
      break;
    }
  }
  EXPECT_EQ(steps, 9u);  // 20 ... 99, as without post-copy
  EXPECT_EQ(d.action, SwitchoverAction::kPostcopy);  // then post-copy rather than giving up
}

TEST(DowntimeLimitPolicy, ConvergingNeverSwitchesToPostcopy) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 300ms, .postcopy = PostcopyMode::kAuto}, clock);
  p.Begin();
  EXPECT_EQ(p.Decide(Round(1, 100000, 1e9)).action, SwitchoverAction::kContinue);
  EXPECT_EQ(p.Decide(Round(2, 73000, 1e9)).action, SwitchoverAction::kStopAndCopy);
}

TEST(DowntimeLimitPolicy, ADirtySetThatShrinksEnoughTakesNoStep) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .aid = ConvergeAid::kAutoConverge}, clock);
  p.Begin();
  // Each round dirties less than half of what the last one sent: no step.
  uint64_t pages = 100000;
  for (uint32_t round = 1; round <= 10; ++round, pages /= 3) {
    const SwitchoverDecision d = p.Decide(Busy(round, pages, pages * 4096 * 3));
    if (d.action == SwitchoverAction::kStopAndCopy) break;
    ASSERT_EQ(d.action, SwitchoverAction::kContinue) << round;
  }
}

TEST(DowntimeLimitPolicy, DerivedDirtyLimitIsHalfTheBandwidthSplitThenHalves) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .stall_rounds = 2, .aid = ConvergeAid::kDirtyLimit}, clock);
  p.Begin();
  double quota = 0;
  std::vector<double> quotas;
  SwitchoverDecision d;
  for (uint32_t round = 1; round < 60; ++round) {
    RoundSummary r = Busy(round, 30000, 0, 4);  // no dirty-high signal: only the stall takes steps
    r.vcpu_quota_pages_per_s = quota;
    d = p.Decide(r);
    if (d.action == SwitchoverAction::kThrottle) {
      EXPECT_EQ(d.throttle.duty_pct, 0u);
      quota = d.throttle.vcpu_quota_pages_per_s;
      quotas.push_back(quota);
    } else if (d.action != SwitchoverAction::kContinue) {
      break;
    }
  }
  // 100 MB/s is 24414 pages/s; half of it over 4 vCPUs: 3052 pages/s each.
  ASSERT_FALSE(quotas.empty());
  EXPECT_NEAR(quotas[0], 1e8 / 4096 / 2 / 4, 0.01);
  ASSERT_EQ(quotas.size(), 7u);  // then halved six times, down to 1/64
  EXPECT_NEAR(quotas.back(), quotas[0] / 64, 0.01);
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
  EXPECT_NE(d.detail.find("with each vCPU limited to 48 dirty pages/s"), std::string::npos) << d.detail;
}

TEST(DowntimeLimitPolicy, AGivenDirtyLimitIsOneStep) {
  FakeClock clock;
  DowntimeLimitPolicy p(
      {.downtime_limit = 10ms, .stall_rounds = 2, .aid = ConvergeAid::kDirtyLimit, .dirty_limit = 1000}, clock);
  p.Begin();
  double quota = 0;
  int steps = 0;
  SwitchoverDecision d;
  for (uint32_t round = 1; round < 60; ++round) {
    RoundSummary r = Busy(round, 30000);
    r.vcpu_quota_pages_per_s = quota;
    d = p.Decide(r);
    if (d.action == SwitchoverAction::kThrottle) {
      quota = d.throttle.vcpu_quota_pages_per_s;
      ++steps;
    } else if (d.action != SwitchoverAction::kContinue) {
      break;
    }
  }
  EXPECT_EQ(steps, 1);
  EXPECT_EQ(quota, 1000);
  EXPECT_EQ(d.action, SwitchoverAction::kAbort);
}

TEST(DowntimeLimitPolicy, NoStepWithoutWhatTheAidNeeds) {
  FakeClock clock;
  DowntimeLimitPolicy p({.downtime_limit = 10ms, .stall_rounds = 2, .aid = ConvergeAid::kDirtyLimit}, clock);
  p.Begin();
  // The bitmap: no per-vCPU rates. The policy never asks for a dirty-limit.
  for (uint32_t round = 1; round < 10; ++round) {
    RoundSummary r = Busy(round, 30000);
    r.vcpu_dirty_rates.clear();
    const SwitchoverDecision d = p.Decide(r);
    ASSERT_NE(d.action, SwitchoverAction::kThrottle) << round;
    if (d.action == SwitchoverAction::kAbort) break;
  }
  DowntimeLimitPolicy q({.downtime_limit = 10ms, .stall_rounds = 2, .aid = ConvergeAid::kAutoConverge}, clock);
  q.Begin();
  for (uint32_t round = 1; round < 10; ++round) {
    RoundSummary r = Busy(round, 30000);
    r.can_throttle = false;  // a VMM that cannot hold its vCPUs
    const SwitchoverDecision d = q.Decide(r);
    ASSERT_NE(d.action, SwitchoverAction::kThrottle) << round;
    if (d.action == SwitchoverAction::kAbort) break;
  }
}

TEST(ConvergeAid, Names) {
  EXPECT_EQ(ConvergeAidName(ConvergeAid::kNone), "none");
  EXPECT_EQ(ConvergeAidName(ConvergeAid::kDirtyLimit), "dirty-limit");
  EXPECT_EQ(ConvergeAidName(ConvergeAid::kAutoConverge), "auto-converge");
}

}  // namespace
}  // namespace pmlmig::engine
