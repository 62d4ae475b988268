// Time as an input. Decisions that depend on time (the switch-over policy,
// deadlines) take a Clock, so a test drives them with a FakeClock through a
// hundred rounds in a millisecond.
//
// Thread-safety: SteadyClock and FakeClock may be read from any thread;
// FakeClock::Advance may run concurrently with Now().
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace pmlmig {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
  // The process's steady clock (a singleton).
  static const Clock& Steady();
};

// Starts at the steady clock's epoch plus `start`; moves only by Advance.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(std::chrono::nanoseconds start = std::chrono::hours(1)) : now_(start.count()) {}
  TimePoint Now() const override { return TimePoint(std::chrono::nanoseconds(now_.load(std::memory_order_relaxed))); }
  void Advance(std::chrono::nanoseconds d) { now_.fetch_add(d.count(), std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> now_;  // nanoseconds since the epoch; relaxed: it orders nothing else
};

// Milliseconds from `from` to `to`, as a double.
inline double MsBetween(Clock::TimePoint from, Clock::TimePoint to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}
inline double MsSince(const Clock& clock, Clock::TimePoint from) { return MsBetween(from, clock.Now()); }

}  // namespace pmlmig
