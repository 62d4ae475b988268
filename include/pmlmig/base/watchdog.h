// Watchdog: runs a function once, on its own thread, if it is not disarmed
// before a deadline. The one deadline thread of the project's blocking
// operations (a migration's timeout; a transport's phase deadlines).
//
// Thread-safety: Disarm() from any thread; the destructor disarms and joins.
// `fire` runs on the watchdog's thread and must not call Disarm().
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include "pmlmig/base/clock.h"

namespace pmlmig {

class Watchdog {
 public:
  Watchdog() = default;  // disarmed: never fires
  Watchdog(std::chrono::steady_clock::time_point deadline, std::function<void()> fire);
  ~Watchdog() { Disarm(); }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // After it returns, `fire` has either run to completion or will never run.
  void Disarm();
  bool fired() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;  // guarded by mu_
  bool fired_ = false;     // guarded by mu_
  std::thread thread_;
};

}  // namespace pmlmig
