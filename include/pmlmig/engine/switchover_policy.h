// The switch-over decision of a pre-copy migration, as an object.
//
// Before each live round (round >= 1) the source collects the dirty set and
// asks the policy, handing it the round's statistics by value: continue
// (send the round live), throttle (send it, with the vCPUs slowed from now
// on: vcpu_throttle.h), stop-and-copy (pause and send the rest), or abort
// (keep the VM here; the migration ends cancelled with the policy's reason).
// A policy is time-dependent only through the Clock it was given, so tests
// drive it with synthetic rounds and a FakeClock, without KVM.
//
// Thread-safety: a policy belongs to one migration; Begin and Decide run on
// that migration's thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pmlmig/base/clock.h"

namespace pmlmig::engine {

// What the source knows before a live round. Plain values: a policy may keep
// a copy of every round it saw.
struct RoundSummary {
  uint32_t round = 0;               // the live round about to be sent (1, 2, ...)
  uint64_t remaining_pages = 0;     // dirty pages collected for it
  double bytes_per_page = 4096;     // on the wire, averaged over everything sent so far
  double bandwidth_bytes_per_s = 0; // measured over the last rounds (0: not yet known)
  double expected_downtime_ms = 0;  // remaining_pages * bytes_per_page / bandwidth (1e9 when unknown)
  double dirty_pages_rate = 0;      // pages/s dirtied while the previous round was sent
  uint64_t wire_bytes = 0;          // sent so far
  // The round sent last (round 0 for round 1): its wire bytes and duration.
  uint64_t last_round_wire_bytes = 0;
  double last_round_ms = 0;
  // The throttle in force, and what the source can do.
  uint32_t throttle_pct = 0;               // auto-converge's duty cycle (0: none)
  double vcpu_quota_pages_per_s = 0;       // dirty-limit's per-vCPU quota (0: none)
  std::vector<double> vcpu_dirty_rates;    // new dirty pages/s per vCPU (empty: the tracker cannot tell)
  bool can_throttle = false;               // the VMM can hold its vCPUs
};

// kThrottle: send this round, with SwitchoverDecision::throttle in force from
// now on (it replaces the previous one).
// kPostcopy: pause, send the state and the list of pages still owed, and
// let the target run while they follow (postcopy.h); needs a sink and
// target that can (MigrationSink::can_postcopy), else the migration fails
// with that error and the VM runs on here.
enum class SwitchoverAction : uint8_t { kContinue, kStopAndCopy, kAbort, kThrottle, kPostcopy };

// What kThrottle asks for: one of the two (vcpu_throttle.h).
struct ThrottleRequest {
  uint32_t duty_pct = 0;              // auto-converge: every vCPU held this % of the time
  double vcpu_quota_pages_per_s = 0;  // dirty-limit: each vCPU's new dirty pages per second
};

// Why a policy stopped or aborted, for the outcome (kNone: continue, or an
// embedder's own reason given in `detail`).
enum class SwitchoverReason : uint8_t {
  kNone,
  kConverged,      // the expected downtime fits the limit
  kOutOfRounds,    // more live rounds than allowed
  kOutOfTime,      // the migration's time is up
  kPolicy,         // a custom policy's own reason (see detail)
  kNotConverging,  // the dirty set stopped shrinking (seen before max_rounds or the timeout)
};

struct SwitchoverDecision {
  SwitchoverAction action = SwitchoverAction::kContinue;
  SwitchoverReason reason = SwitchoverReason::kNone;
  std::string detail;  // for an abort: what the user reads (no CLI advice: the caller adds that)
  ThrottleRequest throttle;  // kThrottle

  SwitchoverDecision() = default;
  // (A constructor, not an aggregate, so that 0.4's {action, reason, detail} still builds warning-free.)
  SwitchoverDecision(SwitchoverAction a, SwitchoverReason r, std::string d, ThrottleRequest t = {})
      : action(a), reason(r), detail(std::move(d)), throttle(t) {}
  static SwitchoverDecision Continue() { return {}; }
};

class SwitchoverPolicy {
 public:
  virtual ~SwitchoverPolicy() = default;
  // The migration starts now (before setup); a policy with a deadline reads
  // its clock here.
  virtual void Begin() {}
  virtual SwitchoverDecision Decide(const RoundSummary& round) = 0;
};

// What the default policy may do to make a busy guest converge.
enum class ConvergeAid : uint8_t {
  kNone,          // nothing: a migration that does not converge ends (or is forced)
  kDirtyLimit,    // cap each vCPU's dirty rate (needs per-vCPU rates: the ring tracker)
  kAutoConverge,  // hold every vCPU a share of the time
};
// "none", "dirty-limit", "auto-converge".
std::string_view ConvergeAidName(ConvergeAid aid);

// When the default policy switches to post-copy.
enum class PostcopyMode : uint8_t {
  kOff,   // never
  kAuto,  // pre-copy first; post-copy once the rounds do not converge (instead of giving up or forcing)
  kNow,   // pure post-copy: the switch comes before any round (the source does it; the policy is not asked)
};
// "off", "auto", "now".
std::string_view PostcopyModeName(PostcopyMode mode);

// The default, QEMU's rule plus limits: switch over once the expected
// downtime is within the limit.
//
// Non-convergence is seen early, from the trend: a round "stalls" when its
// remaining pages are not a new low (10% under the best so far), and after
// stall_rounds stalled rounds in a row the migration is not converging. So is
// one past max_rounds or the timeout. Then:
//   - with an aid that has a step left, it takes the step (kThrottle);
//   - else with force_on_timeout it switches over at the round with the
//     fewest remaining pages: this one if it is within 10% of the fewest
//     seen, else the first that is, within stall_rounds more rounds (at
//     least 3);
//   - else it aborts (the VM stays on the source), with the numbers.
// The aid's steps also follow QEMU's trigger: a round whose dirty bytes
// exceed half of what the previous round sent is "dirty-high", and two
// dirty-high rounds take a step. With post-copy auto (postcopy = kAuto) and
// no aid, the first round whose dirty bytes exceed a quarter of what the
// previous round sent switches to post-copy; with an aid, post-copy comes
// where the aid has no step left. Auto-converge: throttle_initial, then
// +throttle_increment per step, up to throttle_max. Dirty-limit: the given
// per-vCPU quota; or, derived (dirty_limit = 0), half the measured bandwidth
// in pages/s split between the vCPUs, halved at each further step (down to
// 1/64 of the first).
struct DowntimeLimitOptions {
  std::chrono::milliseconds downtime_limit{300};  // default 300 ms, as QEMU
  uint32_t max_rounds = 50;                       // live rounds after round 0; default 50
  std::chrono::milliseconds timeout{0};           // since Begin; default 0 = none
  bool force_on_timeout = false;                  // default false: abort (the VM stays on the source)
  uint32_t stall_rounds = 5;                      // default 5; 0: only max_rounds and the timeout end it
  ConvergeAid aid = ConvergeAid::kNone;           // default none
  double dirty_limit = 0;                         // dirty-limit's per-vCPU pages/s; default 0 = derived
  uint32_t throttle_initial = 20;                 // auto-converge, in %: QEMU's defaults
  uint32_t throttle_increment = 10;
  uint32_t throttle_max = 99;
  PostcopyMode postcopy = PostcopyMode::kOff;     // default off
};

class DowntimeLimitPolicy final : public SwitchoverPolicy {
 public:
  explicit DowntimeLimitPolicy(DowntimeLimitOptions options, const Clock& clock = Clock::Steady())
      : options_(options), clock_(clock) {}
  void Begin() override;
  SwitchoverDecision Decide(const RoundSummary& round) override;
  const DowntimeLimitOptions& options() const { return options_; }

 private:
  // The aid's next step from the throttle in force, or nullopt when it has none left.
  std::optional<ThrottleRequest> NextStep(const RoundSummary& r) const;
  std::string NotConverging(const RoundSummary& r, SwitchoverReason reason, double elapsed_ms) const;

  DowntimeLimitOptions options_;
  const Clock& clock_;
  Clock::TimePoint start_{};
  // What the rounds so far showed (Decide's thread).
  uint64_t best_ = 0;             // the last new low (10% under the one before)
  uint64_t fewest_ = 0;           // the fewest remaining pages of any round
  uint32_t stalled_ = 0;          // rounds in a row without a new low
  uint32_t dirty_high_ = 0;       // dirty-high rounds since the last step
  double first_quota_ = 0;        // dirty-limit derived: the first step's quota
  uint32_t forcing_since_ = 0;    // the round that decided to force (0: not forcing)
};

// Expected downtime of sending `pages` at `bytes_per_page` over
// `bandwidth_bytes_per_s`, in ms; 1e9 while the bandwidth is unknown (0).
double ExpectedDowntimeMs(uint64_t pages, double bytes_per_page, double bandwidth_bytes_per_s);

}  // namespace pmlmig::engine
