#include "push_window.h"

#include <algorithm>

namespace pmlmig::transport {

bool PushWindow::WaitToSend(uint64_t bytes, const std::atomic<bool>& stop) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] {
    return closed_ || stop.load(std::memory_order_relaxed) || in_flight_ == 0 || in_flight_ + bytes <= window_;
  });
  return !closed_ && !stop.load(std::memory_order_relaxed);
}

void PushWindow::Close() {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

void PushWindow::Sent(uint64_t bytes, Clock::time_point now) {
  std::lock_guard lock(mu_);
  unacked_.push_back({bytes, now});
  in_flight_ += bytes;
}

void PushWindow::Acked(uint64_t batches, Clock::time_point now) {
  {
    std::lock_guard lock(mu_);
    while (acked_ < batches && !unacked_.empty()) {
      const Batch b = unacked_.front();
      unacked_.pop_front();
      ++acked_;
      in_flight_ -= b.bytes;
      const Clock::duration rtt = now - b.sent;
      // The base: the smallest round trip of the current span, or of the
      // previous one while the current one is young.
      if (base_since_ == Clock::time_point{} || now - base_since_ > o_.base_span) {
        base_ = std::min(next_base_, rtt);
        next_base_ = rtt;
        base_since_ = now;
      } else {
        next_base_ = std::min(next_base_, rtt);
      }
      base_ = std::min(base_, rtt);
      // The current delay: the least of the last few round trips, as LEDBAT
      // filters it (scheduling noise only ever adds delay).
      recent_[recent_next_++ % kRecent] = rtt;
      Clock::duration current = rtt;
      for (size_t i = 0; i < std::min<size_t>(recent_next_, kRecent); ++i) current = std::min(current, recent_[i]);
      queueing_ = current - base_;
      const double target = std::chrono::duration<double>(o_.target).count();
      const double q = std::chrono::duration<double>(queueing_).count();
      double w = static_cast<double>(window_);
      if (slow_start_ && q < target / 2) {
        w += static_cast<double>(b.bytes);  // doubling per round trip, up to the first sign of a queue
      } else {
        // LEDBAT's controller: up to one batch per round trip while the
        // queue is under the target, down in proportion to the excess
        // above it (at most an eighth per acknowledgement).
        slow_start_ = false;
        const double per_rtt = static_cast<double>(b.bytes) * static_cast<double>(b.bytes) / w;
        w += std::max(-w / 8, (target - q) / target * per_rtt);
      }
      window_ = static_cast<uint64_t>(std::clamp(w, static_cast<double>(o_.min_bytes), static_cast<double>(o_.max_bytes)));
    }
  }
  cv_.notify_all();
}

void PushWindow::Wake() {
  { std::lock_guard lock(mu_); }
  cv_.notify_all();
}

uint64_t PushWindow::window() const {
  std::lock_guard lock(mu_);
  return window_;
}

uint64_t PushWindow::in_flight() const {
  std::lock_guard lock(mu_);
  return in_flight_;
}

std::chrono::microseconds PushWindow::base_rtt() const {
  std::lock_guard lock(mu_);
  return base_ == Clock::duration::max() ? std::chrono::microseconds(0)
                                         : std::chrono::duration_cast<std::chrono::microseconds>(base_);
}

std::chrono::microseconds PushWindow::last_queueing() const {
  std::lock_guard lock(mu_);
  return std::chrono::duration_cast<std::chrono::microseconds>(queueing_);
}

}  // namespace pmlmig::transport
