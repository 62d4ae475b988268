#include "pmlmig/engine/switchover_policy.h"

#include <algorithm>
#include <cstdio>

namespace pmlmig::engine {
namespace {

// A round's remaining pages are a new low when they are this far under the
// last low: noise of a few pages is not progress.
constexpr double kNewLow = 0.9;
// Forcing, a round this close to the fewest remaining pages seen is good enough.
constexpr double kCloseToFewest = 1.1;
// QEMU's throttle-trigger-threshold: dirty bytes above this share of the
// bytes the last round sent make a round dirty-high.
constexpr double kDirtyHigh = 0.5;
// Post-copy auto without an aid: a round that leaves more than this share of
// what it sent still to send switches at once. Pre-copy would take several
// more rounds, each sending the hot pages again; post-copy sends each of
// them once (docs/BENCHMARKS.md, "Post-copy": waiting for two dirty-high
// rounds cost 1.64x one full send).
constexpr double kPostcopyDirtyShare = 0.25;
// Dirty-limit, derived: the share of the bandwidth the vCPUs may dirty at
// first, and how far the halving goes.
constexpr double kQuotaShareOfBandwidth = 0.5;
constexpr double kQuotaFloorDivisor = 64;

}  // namespace

double ExpectedDowntimeMs(uint64_t pages, double bytes_per_page, double bandwidth_bytes_per_s) {
  if (bandwidth_bytes_per_s <= 0) return 1e9;
  return static_cast<double>(pages) * bytes_per_page / bandwidth_bytes_per_s * 1000.0;
}

std::string_view PostcopyModeName(PostcopyMode mode) {
  switch (mode) {
    case PostcopyMode::kOff: return "off";
    case PostcopyMode::kAuto: return "auto";
    case PostcopyMode::kNow: return "now";
  }
  return "unknown";
}

std::string_view ConvergeAidName(ConvergeAid aid) {
  switch (aid) {
    case ConvergeAid::kNone: return "none";
    case ConvergeAid::kDirtyLimit: return "dirty-limit";
    case ConvergeAid::kAutoConverge: return "auto-converge";
  }
  return "unknown";
}

void DowntimeLimitPolicy::Begin() {
  start_ = clock_.Now();
  best_ = fewest_ = 0;
  stalled_ = dirty_high_ = forcing_since_ = 0;
  first_quota_ = 0;
}

std::optional<ThrottleRequest> DowntimeLimitPolicy::NextStep(const RoundSummary& r) const {
  if (!r.can_throttle) return std::nullopt;
  ThrottleRequest next;
  switch (options_.aid) {
    case ConvergeAid::kNone: return std::nullopt;
    case ConvergeAid::kAutoConverge: {
      const uint32_t max = std::min<uint32_t>(options_.throttle_max, 99);
      if (r.throttle_pct >= max) return std::nullopt;
      next.duty_pct = r.throttle_pct == 0 ? options_.throttle_initial : r.throttle_pct + options_.throttle_increment;
      next.duty_pct = std::min(std::max<uint32_t>(next.duty_pct, 1), max);
      return next;
    }
    case ConvergeAid::kDirtyLimit: {
      if (r.vcpu_dirty_rates.empty()) return std::nullopt;
      if (options_.dirty_limit > 0) {  // a given quota: one step
        if (r.vcpu_quota_pages_per_s > 0) return std::nullopt;
        next.vcpu_quota_pages_per_s = options_.dirty_limit;
        return next;
      }
      if (r.vcpu_quota_pages_per_s == 0) {
        if (r.bandwidth_bytes_per_s <= 0) return std::nullopt;  // nothing to derive it from yet
        next.vcpu_quota_pages_per_s = kQuotaShareOfBandwidth * r.bandwidth_bytes_per_s /
                                      std::max(r.bytes_per_page, 1.0) /
                                      static_cast<double>(r.vcpu_dirty_rates.size());
        return next;
      }
      const double halved = r.vcpu_quota_pages_per_s / 2;
      if (halved < first_quota_ / kQuotaFloorDivisor) return std::nullopt;
      next.vcpu_quota_pages_per_s = halved;
      return next;
    }
  }
  return std::nullopt;
}

std::string DowntimeLimitPolicy::NotConverging(const RoundSummary& r, SwitchoverReason reason,
                                               double elapsed_ms) const {
  char why[600];
  int n = std::snprintf(why, sizeof why,
                        "not converging: after %u rounds and %.0f ms, %llu pages stay dirty (about %.0f pages/s) and "
                        "the expected downtime is %.0f ms against a limit of %lld ms at %.0f Mbit/s",
                        r.round - 1, elapsed_ms, static_cast<unsigned long long>(r.remaining_pages),
                        r.dirty_pages_rate, r.expected_downtime_ms,
                        static_cast<long long>(options_.downtime_limit.count()), r.bandwidth_bytes_per_s * 8 / 1e6);
  if (reason == SwitchoverReason::kNotConverging && n > 0 && static_cast<size_t>(n) < sizeof why) {
    n += std::snprintf(why + n, sizeof why - static_cast<size_t>(n),
                       "; the dirty set has not shrunk below %llu pages in %u rounds",
                       static_cast<unsigned long long>(best_), stalled_);
  }
  if (n > 0 && static_cast<size_t>(n) < sizeof why) {
    if (r.throttle_pct > 0) {
      std::snprintf(why + n, sizeof why - static_cast<size_t>(n), ", with every vCPU throttled %u%%", r.throttle_pct);
    } else if (r.vcpu_quota_pages_per_s > 0) {
      std::snprintf(why + n, sizeof why - static_cast<size_t>(n), ", with each vCPU limited to %.0f dirty pages/s",
                    r.vcpu_quota_pages_per_s);
    }
  }
  return why;
}

SwitchoverDecision DowntimeLimitPolicy::Decide(const RoundSummary& r) {
  if (r.expected_downtime_ms <= static_cast<double>(options_.downtime_limit.count())) {
    return {SwitchoverAction::kStopAndCopy, SwitchoverReason::kConverged, ""};
  }
  // The trend.
  if (best_ == 0 || static_cast<double>(r.remaining_pages) < kNewLow * static_cast<double>(best_)) {
    best_ = std::max<uint64_t>(r.remaining_pages, 1);
    stalled_ = 0;
  } else {
    ++stalled_;
  }
  fewest_ = fewest_ == 0 ? std::max<uint64_t>(r.remaining_pages, 1) : std::min(fewest_, r.remaining_pages);
  const bool dirty_high = r.last_round_wire_bytes > 0 &&
                          static_cast<double>(r.remaining_pages) * r.bytes_per_page >
                              kDirtyHigh * static_cast<double>(r.last_round_wire_bytes);
  if (dirty_high) ++dirty_high_;
  const bool stalled = options_.stall_rounds > 0 && stalled_ >= options_.stall_rounds;

  // An aid's step comes first, while it has one.
  if (forcing_since_ == 0 && (dirty_high_ >= 2 || stalled)) {
    if (const std::optional<ThrottleRequest> step = NextStep(r)) {
      dirty_high_ = 0;
      stalled_ = 0;
      if (first_quota_ == 0) first_quota_ = step->vcpu_quota_pages_per_s;
      return {SwitchoverAction::kThrottle, SwitchoverReason::kNotConverging, "", *step};
    }
  }

  const double elapsed_ms = MsSince(clock_, start_);
  const bool out_of_rounds = r.round > options_.max_rounds;
  const bool out_of_time =
      options_.timeout.count() > 0 && elapsed_ms >= static_cast<double>(options_.timeout.count());
  const bool postcopy_round = options_.aid == ConvergeAid::kNone && r.last_round_wire_bytes > 0 &&
                              static_cast<double>(r.remaining_pages) * r.bytes_per_page >
                                  kPostcopyDirtyShare * static_cast<double>(r.last_round_wire_bytes);
  const bool postcopy_now = options_.postcopy == PostcopyMode::kAuto && (dirty_high_ >= 2 || postcopy_round);
  if (!out_of_rounds && !out_of_time && !stalled && forcing_since_ == 0 && !postcopy_now) {
    return SwitchoverDecision::Continue();
  }
  const SwitchoverReason reason = out_of_time     ? SwitchoverReason::kOutOfTime
                                  : out_of_rounds ? SwitchoverReason::kOutOfRounds
                                                  : SwitchoverReason::kNotConverging;
  // Post-copy instead of giving up or forcing: at the first sign (the
  // trigger of an aid step, with no step left) rather than after the stall.
  if (options_.postcopy == PostcopyMode::kAuto) {
    return {SwitchoverAction::kPostcopy, reason, "not converging: switching to post-copy"};
  }
  if (options_.force_on_timeout) {
    if (forcing_since_ == 0) forcing_since_ = r.round;
    const uint32_t grace = std::max<uint32_t>(options_.stall_rounds, 3);
    if (static_cast<double>(r.remaining_pages) <= kCloseToFewest * static_cast<double>(fewest_) ||
        r.round >= forcing_since_ + grace) {
      return {SwitchoverAction::kStopAndCopy, reason, "forced"};
    }
    return SwitchoverDecision::Continue();
  }
  return {SwitchoverAction::kAbort, reason, NotConverging(r, reason, elapsed_ms)};
}

}  // namespace pmlmig::engine
