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
  Start(deadline, std::chrono::milliseconds(0), [fire = std::move(fire)] {
    fire();
    return true;
  });
}

Watchdog::Watchdog(std::chrono::milliseconds tick, std::function<bool()> check) {
  Start(std::chrono::steady_clock::now() + tick, tick, std::move(check));
}

void Watchdog::Start(std::chrono::steady_clock::time_point first, std::chrono::milliseconds tick,
                     std::function<bool()> check) {
  thread_ = std::thread([this, first, tick, check = std::move(check)] {
    std::unique_lock lock(mu_);
    for (auto next = first;; next += tick) {
      if (cv_.wait_until(lock, next, [&] { return disarmed_; })) return;
      lock.unlock();
      const bool acted = check();
      lock.lock();
      if (acted || tick.count() == 0) {
        fired_ = acted;
        return;
      }
    }
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
