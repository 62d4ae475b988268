// TokenBucket: the sender's bandwidth limit (GrpcSinkOptions::max_bandwidth),
// shared by all data streams. A stream takes its batch's bytes and, if that
// puts the bucket in debt, sleeps until the debt is repaid; so the long-run
// rate is exact and a burst is at most burst() bytes.
//
// Thread-safety: Acquire and Wake from any thread, concurrently; mu_ guards
// the token count and the time of the last refill, nothing else. It must
// never be held across anything but its own arithmetic and the wait.
// Knows nothing of gRPC (tests/transport/transport_parts_test.cc runs it
// under ThreadSanitizer).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace pmlmig::transport {

class TokenBucket {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  // `rate` bytes per second, > 0; full at `start`.
  explicit TokenBucket(uint64_t rate, TimePoint start = std::chrono::steady_clock::now());
  TokenBucket(const TokenBucket&) = delete;
  TokenBucket& operator=(const TokenBucket&) = delete;

  // Takes `bytes` at `now`; returns how long the taker must wait for the
  // debt it leaves to be repaid (zero when there is none). The arithmetic
  // of Acquire, with time as an input.
  std::chrono::duration<double> Take(uint64_t bytes, TimePoint now);

  // Takes `bytes` and sleeps off the debt; false if `stop` became true while
  // waiting (whoever sets it calls Wake).
  bool Acquire(uint64_t bytes, const std::atomic<bool>& stop);
  // Wakes every Acquire, which then looks at its `stop` again.
  void Wake();

  double burst() const { return burst_; }

 private:
  std::chrono::duration<double> TakeLocked(uint64_t bytes, TimePoint now);

  const double rate_;
  const double burst_;
  std::mutex mu_;
  std::condition_variable cv_;
  double tokens_;   // guarded by mu_; negative: debt
  TimePoint last_;  // guarded by mu_: when tokens_ was last refilled
};

}  // namespace pmlmig::transport
