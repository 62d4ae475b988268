#include "pmlmig/base/clock.h"
#include "pmlmig/base/watchdog.h"

namespace pmlmig {
namespace {

class SteadyClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
};

}  // namespace

const Clock& Clock::Steady() {
  static const SteadyClock clock;
  return clock;
}

Watchdog::Watchdog(std::chrono::steady_clock::time_point deadline, std::function<void()> fire) {
  thread_ = std::thread([this, deadline, fire = std::move(fire)] {
    std::unique_lock lock(mu_);
    if (cv_.wait_until(lock, deadline, [&] { return disarmed_; })) return;
    fired_ = true;
    lock.unlock();
    fire();
  });
}

void Watchdog::Disarm() {
  {
    std::lock_guard lock(mu_);
    disarmed_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

bool Watchdog::fired() const {
  std::lock_guard lock(mu_);
  return fired_;
}

}  // namespace pmlmig
