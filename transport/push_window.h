// PushWindow: how many bytes the post-copy push may have on its way to the
// target (written, not yet acknowledged as placed), so that a page request's
// answer, on its own connection, does not wait long behind push bytes queued
// at a shared bottleneck (a slow link's queue, which both connections pass).
//
// Delay-based, as LEDBAT (RFC 6817) and TCP Vegas are: each acknowledged
// batch gives a round trip; the smallest seen recently is the path's base,
// and what the least of the last four exceeds it by is queueing (noise only
// adds delay, so the least is the filter LEDBAT uses). The window starts at `min` and doubles
// per round trip until queueing reaches half the target; from then on it
// moves as LEDBAT's controller does: up to one batch per round trip while
// queueing is under the target, and down in proportion to the excess above
// it (at most an eighth per acknowledged batch), within [min, max].
// So the push runs at the link's rate with about `target` of queue ahead of
// an answer, on a LAN or a WAN alike, without knowing the link's rate.
//
// Thread-safety: every method from any thread (one pusher, one ack reader);
// mu_ guards everything. Knows nothing of gRPC: the times are inputs
// (tests/transport/transport_parts_test.cc).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>

namespace pmlmig::transport {

class PushWindow {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    // The defaults as measured on a 1 Gbit/s tbf link (docs/BENCHMARKS.md,
    // "Post-copy"): with a 0.75 ms target, request latency p50 was about
    // 0.7 ms and the push within 10% of the link's rate; 2 ms doubled p50.
    uint64_t min_bytes = 128 << 10;
    uint64_t max_bytes = 64 << 20;
    std::chrono::microseconds target{750};
    // The base round trip is the smallest of the last `base_span`, so a
    // path that changes is followed.
    std::chrono::milliseconds base_span{10000};
  };

  explicit PushWindow(Options o) : o_(o), window_(o.min_bytes) {}
  PushWindow() : PushWindow(Options{}) {}

  // Waits until a batch of `bytes` fits in the window (one always fits when
  // nothing is in flight); false if `stop` became true (whoever sets it
  // calls Wake) or the window was closed.
  bool WaitToSend(uint64_t bytes, const std::atomic<bool>& stop);
  // The next batch in sequence was written at `now`.
  void Sent(uint64_t bytes, Clock::time_point now);
  // The target has placed the first `batches` batches; the newest of them
  // at `now`.
  void Acked(uint64_t batches, Clock::time_point now);
  // Makes a WaitToSend look at its `stop` again.
  void Wake();
  // The acknowledgements are over (the call ended): WaitToSend returns
  // false from now on.
  void Close();

  uint64_t window() const;
  uint64_t in_flight() const;
  // The base round trip and the last queueing delay, for reports.
  std::chrono::microseconds base_rtt() const;
  std::chrono::microseconds last_queueing() const;

 private:
  struct Batch {
    uint64_t bytes;
    Clock::time_point sent;
  };

  const Options o_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t window_;                  // guarded by mu_
  bool closed_ = false;              // guarded by mu_
  bool slow_start_ = true;           // guarded by mu_
  static constexpr size_t kRecent = 4;
  Clock::duration recent_[kRecent]{};  // guarded by mu_: the last round trips
  size_t recent_next_ = 0;             // guarded by mu_
  uint64_t in_flight_ = 0;           // guarded by mu_
  uint64_t acked_ = 0;               // guarded by mu_: batches acknowledged
  std::deque<Batch> unacked_;        // guarded by mu_: from batch acked_ on
  Clock::duration base_ = Clock::duration::max();      // guarded by mu_
  Clock::duration next_base_ = Clock::duration::max();  // guarded by mu_: the minimum since base_since_
  Clock::time_point base_since_{};   // guarded by mu_
  Clock::duration queueing_{};       // guarded by mu_
};

}  // namespace pmlmig::transport
