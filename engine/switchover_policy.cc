#include "pmlmig/engine/switchover_policy.h"

#include <cstdio>

namespace pmlmig::engine {

double ExpectedDowntimeMs(uint64_t pages, double bytes_per_page, double bandwidth_bytes_per_s) {
  if (bandwidth_bytes_per_s <= 0) return 1e9;
  return static_cast<double>(pages) * bytes_per_page / bandwidth_bytes_per_s * 1000.0;
}

SwitchoverDecision DowntimeLimitPolicy::Decide(const RoundSummary& r) {
  if (r.expected_downtime_ms <= static_cast<double>(options_.downtime_limit.count())) {
    return {SwitchoverAction::kStopAndCopy, SwitchoverReason::kConverged, ""};
  }
  const double elapsed_ms = MsSince(clock_, start_);
  const bool out_of_rounds = r.round > options_.max_rounds;
  const bool out_of_time =
      options_.timeout.count() > 0 && elapsed_ms >= static_cast<double>(options_.timeout.count());
  if (!out_of_rounds && !out_of_time) return SwitchoverDecision::Continue();
  const SwitchoverReason reason = out_of_time ? SwitchoverReason::kOutOfTime : SwitchoverReason::kOutOfRounds;
  if (options_.force_on_timeout) return {SwitchoverAction::kStopAndCopy, reason, "forced"};
  char why[400];
  std::snprintf(why, sizeof why,
                "not converging: after %u rounds and %.0f ms, %llu pages stay dirty (about %.0f pages/s) and the "
                "expected downtime is %.0f ms against a limit of %lld ms at %.0f Mbit/s",
                r.round - 1, elapsed_ms, static_cast<unsigned long long>(r.remaining_pages), r.dirty_pages_rate,
                r.expected_downtime_ms, static_cast<long long>(options_.downtime_limit.count()),
                r.bandwidth_bytes_per_s * 8 / 1e6);
  return {SwitchoverAction::kAbort, reason, why};
}

}  // namespace pmlmig::engine
