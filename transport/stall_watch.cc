#include "stall_watch.h"

#include <algorithm>

namespace pmlmig::transport {

int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

StallWatch::StallWatch(std::vector<const StreamProgress*> streams, std::chrono::milliseconds stall_timeout)
    : streams_(std::move(streams)), stall_timeout_(stall_timeout), running_(streams_.size()) {}

std::optional<StallWatch::Stall> StallWatch::Check(int64_t now_ns) const {
  for (size_t i = 0; i < streams_.size(); ++i) {
    const StreamProgress& p = *streams_[i];
    if (!p.running.load(std::memory_order_relaxed) || p.throttled.load(std::memory_order_relaxed)) continue;
    const auto idle = std::chrono::nanoseconds(now_ns - p.last_progress_ns.load(std::memory_order_relaxed));
    if (idle > stall_timeout_) return Stall{i, idle};
  }
  return std::nullopt;
}

void StallWatch::StreamDone() {
  std::lock_guard lock(mu_);
  --running_;
  cv_.notify_all();
}

void StallWatch::Watch(const std::atomic<bool>& stop, const std::function<void(const Stall&)>& on_stall) {
  const auto tick = std::clamp(stall_timeout_ / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(500));
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, tick, [&] { return running_ == 0; })) {
    if (stop.load(std::memory_order_relaxed)) continue;  // the cancel is on its way
    if (std::optional<Stall> s = Check(SteadyNowNs())) {
      lock.unlock();  // on_stall cancels calls: never under mu_
      on_stall(*s);
      lock.lock();
    }
  }
}

}  // namespace pmlmig::transport
