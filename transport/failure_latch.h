// FailureLatch: the sender's first informative error. A failure anywhere
// (a stream, the control reader, the stall watch, Abort) records itself
// here; the first one wins, except that a `weak` one (such as a call
// cancelled by the peer, which only says that something else went wrong)
// gives way to a later precise one. Recording also raises stop(), which the
// sender threads' loops read without a lock.
//
// Thread-safety: everything from any thread; mu_ guards the recorded status.
// Knows nothing of gRPC (tests/transport/transport_parts_test.cc runs it
// under ThreadSanitizer).
#pragma once

#include <atomic>
#include <mutex>

#include "pmlmig/base/status.h"

namespace pmlmig::transport {

class FailureLatch {
 public:
  // Returns whether this was the first failure.
  bool Record(const Status& s, bool weak) {
    std::lock_guard lock(mu_);
    if (!failed_ || (weak_ && !weak)) {
      failure_ = s;
      weak_ = weak;
    }
    const bool first = !failed_;
    failed_ = true;
    // Relaxed: a loop that sees it stops; what it then reads of the failure
    // it reads through status(), under mu_.
    stop_.store(true, std::memory_order_relaxed);
    return first;
  }
  // Ok until a failure is recorded.
  Status status() const {
    std::lock_guard lock(mu_);
    return failure_;
  }
  bool failed() const {
    std::lock_guard lock(mu_);
    return failed_;
  }
  const std::atomic<bool>& stop() const { return stop_; }

 private:
  mutable std::mutex mu_;
  bool failed_ = false;   // guarded by mu_
  bool weak_ = false;     // guarded by mu_: failure_ may give way
  Status failure_;        // guarded by mu_
  std::atomic<bool> stop_{false};
};

}  // namespace pmlmig::transport
