// The switch-over decision of a pre-copy migration, as an object.
//
// Before each live round (round >= 1) the source collects the dirty set and
// asks the policy, handing it the round's statistics by value: continue
// (send the round live), stop-and-copy (pause and send the rest), or abort
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
#include <string>

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
};

enum class SwitchoverAction : uint8_t { kContinue, kStopAndCopy, kAbort };

// Why a policy stopped or aborted, for the outcome (kNone: continue, or an
// embedder's own reason given in `detail`).
enum class SwitchoverReason : uint8_t {
  kNone,
  kConverged,      // the expected downtime fits the limit
  kOutOfRounds,    // more live rounds than allowed
  kOutOfTime,      // the migration's time is up
  kPolicy,         // a custom policy's own reason (see detail)
};

struct SwitchoverDecision {
  SwitchoverAction action = SwitchoverAction::kContinue;
  SwitchoverReason reason = SwitchoverReason::kNone;
  std::string detail;  // for an abort: what the user reads (no CLI advice: the caller adds that)

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

// The default, QEMU's rule plus limits: switch over once the expected
// downtime is within the limit; past max_rounds live rounds or the timeout,
// abort (or, with force_on_timeout, switch over anyway).
struct DowntimeLimitOptions {
  std::chrono::milliseconds downtime_limit{300};  // default 300 ms, as QEMU
  uint32_t max_rounds = 50;                       // live rounds after round 0; default 50
  std::chrono::milliseconds timeout{0};           // since Begin; default 0 = none
  bool force_on_timeout = false;                  // default false: abort (the VM stays on the source)
};

class DowntimeLimitPolicy final : public SwitchoverPolicy {
 public:
  explicit DowntimeLimitPolicy(DowntimeLimitOptions options, const Clock& clock = Clock::Steady())
      : options_(options), clock_(clock) {}
  void Begin() override { start_ = clock_.Now(); }
  SwitchoverDecision Decide(const RoundSummary& round) override;
  const DowntimeLimitOptions& options() const { return options_; }

 private:
  DowntimeLimitOptions options_;
  const Clock& clock_;
  Clock::TimePoint start_{};
};

// Expected downtime of sending `pages` at `bytes_per_page` over
// `bandwidth_bytes_per_s`, in ms; 1e9 while the bandwidth is unknown (0).
double ExpectedDowntimeMs(uint64_t pages, double bytes_per_page, double bandwidth_bytes_per_s);

}  // namespace pmlmig::engine
