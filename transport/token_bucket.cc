#include "token_bucket.h"

#include <algorithm>

namespace pmlmig::transport {

TokenBucket::TokenBucket(uint64_t rate, TimePoint start)
    : rate_(static_cast<double>(rate)),
      burst_(std::max(static_cast<double>(rate) / 20, 256.0 * 1024)),
      tokens_(burst_),
      last_(start) {}

std::chrono::duration<double> TokenBucket::TakeLocked(uint64_t bytes, TimePoint now) {
  tokens_ = std::min(burst_, tokens_ + rate_ * std::chrono::duration<double>(now - last_).count());
  last_ = now;
  tokens_ -= static_cast<double>(bytes);
  if (tokens_ >= 0) return std::chrono::duration<double>::zero();
  return std::chrono::duration<double>(-tokens_ / rate_);
}

std::chrono::duration<double> TokenBucket::Take(uint64_t bytes, TimePoint now) {
  std::lock_guard lock(mu_);
  return TakeLocked(bytes, now);
}

bool TokenBucket::Acquire(uint64_t bytes, const std::atomic<bool>& stop) {
  std::unique_lock lock(mu_);
  const auto wait = TakeLocked(bytes, std::chrono::steady_clock::now());
  if (wait.count() <= 0) return true;
  return !cv_.wait_for(lock, wait, [&] { return stop.load(std::memory_order_relaxed); });
}

void TokenBucket::Wake() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

}  // namespace pmlmig::transport
