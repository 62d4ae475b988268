// Watchdog: the one deadline thread of the project's blocking operations (a
// migration's timeout, the receiver's phase deadlines). Either it runs a
// function once at a deadline, or it runs a check every tick until the check
// says it has acted; in both cases only until it is disarmed.
//
// Thread-safety: Disarm() from any thread; the destructor disarms and joins.
// `fire` and `check` run on the watchdog's thread and must not call Disarm().
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
  // Calls `fire` once at `deadline`.
  Watchdog(std::chrono::steady_clock::time_point deadline, std::function<void()> fire);
  // Calls `check` every `tick` until it returns true (it has acted).
  Watchdog(std::chrono::milliseconds tick, std::function<bool()> check);
  ~Watchdog() { Disarm(); }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // After it returns, `fire` / `check` has either run to completion or will
  // never run again.
  void Disarm();
  bool fired() const;  // `fire` ran, or `check` returned true

 private:
  // Wakes at `first`, then every `tick` (0: once), until `check` is true.
  void Start(std::chrono::steady_clock::time_point first, std::chrono::milliseconds tick,
             std::function<bool()> check);


  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;  // guarded by mu_
  bool fired_ = false;     // guarded by mu_
  std::thread thread_;
};

}  // namespace pmlmig
