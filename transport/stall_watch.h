// The sender's stall watch: during a round, a data stream that is neither
// done nor throttled (sleeping in the TokenBucket) and has made no progress
// (no write completed, no ack) for stall_timeout fails the migration.
// (Closing the streams in Finish has a single deadline instead: a base
// Watchdog.)
//
// Thread-safety: each StreamProgress is written by its stream's sender
// thread and read by the watch; its fields are relaxed atomics because they
// order nothing else (a timestamp and two flags; the watch tolerates a value
// one tick stale). StallWatch: StreamDone from the sender threads, Watch
// from one thread (the controlling one); mu_ guards the count of running
// streams only. Knows nothing of gRPC (tests/transport/
// transport_parts_test.cc runs it under ThreadSanitizer).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

namespace pmlmig::transport {

// Steady-clock nanoseconds, the unit of StreamProgress's timestamp.
int64_t SteadyNowNs();

struct StreamProgress {
  // Sender thread: the stream moved (or starts the round: Begin).
  void Touch() { last_progress_ns.store(SteadyNowNs(), std::memory_order_relaxed); }
  void Begin() {
    Touch();
    running.store(true, std::memory_order_relaxed);
  }

  std::atomic<int64_t> last_progress_ns{0};
  std::atomic<bool> throttled{false};  // sleeping in the token bucket: not a stall
  std::atomic<bool> running{false};    // between Begin and the end of its round
};

class StallWatch {
 public:
  // One round of `streams`, each already Begin()-ed.
  StallWatch(std::vector<const StreamProgress*> streams, std::chrono::milliseconds stall_timeout);

  // The first running, unthrottled stream idle for more than stall_timeout
  // at `now_ns`: its position in `streams` and how long it has been idle.
  struct Stall {
    size_t stream;
    std::chrono::nanoseconds idle;
  };
  std::optional<Stall> Check(int64_t now_ns) const;

  // A sender thread: its stream's round is over.
  void StreamDone();
  // Blocks until every stream is done. Every tick (stall_timeout / 4,
  // within 10..500 ms) while `stop` is false, Check; a stall goes to
  // `on_stall`, which is expected to fail the migration (and set `stop`).
  void Watch(const std::atomic<bool>& stop, const std::function<void(const Stall&)>& on_stall);

 private:
  const std::vector<const StreamProgress*> streams_;
  const std::chrono::milliseconds stall_timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t running_;  // guarded by mu_: streams not yet done
};

}  // namespace pmlmig::transport
