#include "direct_stream.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>

namespace pmlmig::transport {

DirectStream::DirectStream(uint32_t index, const GrpcSinkOptions& o, SinkCalls& calls, TokenBucket* bucket)
    : index_(index),
      options_(o),
      calls_(calls),
      bucket_(bucket),
      name_("stream " + std::to_string(index) + " to " + o.target),
      builder_(o.compress, o.zstd_level),
      payload_(new uint8_t[kMaxBatchPayload]) {}

bool DirectStream::Fail(const Status& s, bool weak) {
  over_ = true;
  calls_.Fail(s, weak);
  return false;
}

Status DirectStream::Open(const std::string& host, uint16_t port, uint64_t session_id, const direct::Key& key) {
  const auto deadline = std::chrono::steady_clock::now() + options_.connect_timeout;
  PMLMIG_ASSIGN_OR_RETURN(fd_, direct::Connect(host, port, calls_.stop(), deadline));
  direct::Hello h;
  h.stream = index_;
  h.session_id = session_id;
  h.key = key;
  const auto bytes = direct::EncodeHello(h);
  return direct::WriteFull(fd_.get(), bytes.data(), bytes.size(), calls_.stop(), deadline).WithContext(name_);
}

bool DirectStream::HandleReply(const direct::Reply& r, std::string_view message) {
  switch (r.kind) {
    case direct::ReplyKind::kAck: {
      if (ledger_.empty()) return Fail(DataLoss(name_ + ": acknowledgement for a batch never sent"));
      if (Status s = ledger_.Acknowledge(r.b, r.a, name_); !s.ok()) return Fail(s);
      progress_.Touch();
      return true;
    }
    case direct::ReplyKind::kEnd:
      if (!ledger_.empty() || r.b != ledger_.next_sequence()) {
        return Fail(DataLoss(name_ + ": receiver ended the stream after " + std::to_string(r.b) + " batches; " +
                             std::to_string(ledger_.next_sequence()) + " were sent, " + std::to_string(ledger_.in_flight()) +
                             " not acknowledged"));
      }
      ended_ = true;
      over_ = true;
      return true;
    case direct::ReplyKind::kError: {
      const Code code = r.a >= 1 && r.a <= static_cast<uint32_t>(Code::kInternal) ? static_cast<Code>(r.a)
                                                                                   : Code::kInternal;
      return Fail(Status(code, name_ + ": " + std::string(message)));
    }
  }
  return Fail(Internal(name_ + ": unknown reply"));
}

bool DirectStream::Replies(bool wait) {
  const std::atomic<bool>& stop = calls_.stop();
  for (;;) {
    // Whole replies first.
    bool handled = false;
    size_t at = 0;
    while (rx_.size() - at >= direct::kReplyBytes) {
      Result<direct::Reply> r = direct::DecodeReply(
          std::span<const uint8_t, direct::kReplyBytes>(reinterpret_cast<const uint8_t*>(rx_.data() + at),
                                                        direct::kReplyBytes));
      if (!r.ok()) return Fail(DataLoss(name_ + ": malformed reply from the receiver: " + r.status().message()));
      const size_t msg = r->kind == direct::ReplyKind::kError ? r->b : 0;
      if (rx_.size() - at < direct::kReplyBytes + msg) break;
      if (!HandleReply(*r, std::string_view(rx_).substr(at + direct::kReplyBytes, msg))) return false;
      at += direct::kReplyBytes + msg;
      handled = true;
      if (ended_) break;
    }
    rx_.erase(0, at);
    if (ended_) return true;
    // Then whatever has arrived.
    char buf[4096];
    const ssize_t n = ::recv(fd_.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      rx_.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      return Fail(Unavailable(name_ + ": the receiver closed the connection (it ended the migration, or is gone)"),
                  /*weak=*/true);
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return Fail(Status::FromErrno(errno, name_ + ": reading the receiver's replies"), /*weak=*/true);
    }
    if (handled || !wait) return true;
    if (stop.load(std::memory_order_relaxed)) return Fail(Aborted(name_ + ": stopped"), /*weak=*/true);
    pollfd p{fd_.get(), POLLIN, 0};
    (void)::poll(&p, 1, 50);
    wait = false;  // one slice; the caller loops
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) == 0) return true;
  }
}

bool DirectStream::Send(const uint8_t* payload, size_t len) {
  const std::atomic<bool>& stop = calls_.stop();
  iovec iov[2] = {{head_.data(), head_.size()}, {const_cast<uint8_t*>(payload), len}};
  size_t first = 0;
  const int count = len > 0 ? 2 : 1;
  while (first < static_cast<size_t>(count)) {
    msghdr m{};
    m.msg_iov = iov + first;
    m.msg_iovlen = static_cast<size_t>(count) - first;
    const ssize_t w = ::sendmsg(fd_.get(), &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
      progress_.Touch();
      size_t done = static_cast<size_t>(w);
      while (first < static_cast<size_t>(count) && done >= iov[first].iov_len) {
        done -= iov[first].iov_len;
        ++first;
      }
      if (first < static_cast<size_t>(count)) {
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + done;
        iov[first].iov_len -= done;
      }
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      // The receiver may have said why before it closed.
      (void)Replies(false);
      return Fail(Status::FromErrno(errno, name_ + ": writing a batch"), /*weak=*/true);
    }
    if (stop.load(std::memory_order_relaxed)) return Fail(Aborted(name_ + ": stopped"), /*weak=*/true);
    pollfd p{fd_.get(), POLLOUT | POLLIN, 0};
    (void)::poll(&p, 1, 50);
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0 && !Replies(false)) return false;
  }
  return true;
}

void DirectStream::Run(const engine::SlotTable& source, uint64_t session_id, uint32_t round,
                       engine::PageList& pages) {
  ledger_.StartRound();
  const std::atomic<bool>& stop = calls_.stop();
  std::vector<engine::PageRun> gathered;
  gathered.reserve(options_.batch_pages);
  while (!over_ && !stop.load(std::memory_order_relaxed)) {
    const uint64_t n = GatherBatch(pages, options_.batch_pages, &gathered);
    if (n == 0) break;
    size_t len = 0;
    const BatchHeader h{session_id, index_, round, ledger_.next_sequence()};
    if (Status s = builder_.Build(source, gathered, h, &header_, payload_.get(), &len); !s.ok()) {
      Fail(s.WithContext(name_));
      break;
    }
    const size_t hlen = header_.ByteSizeLong();
    head_.resize(direct::kFrameBytes + hlen);
    direct::PutU32(reinterpret_cast<uint8_t*>(head_.data()), static_cast<uint32_t>(hlen));
    direct::PutU32(reinterpret_cast<uint8_t*>(head_.data()) + 4, static_cast<uint32_t>(len));
    header_.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(head_.data()) + direct::kFrameBytes);
    const uint64_t bytes = head_.size() + len;
    // At most max_inflight_bytes unacknowledged, but always one batch.
    while (!ledger_.Fits(bytes, options_.max_inflight_bytes)) {
      if (!Replies(true) || stop.load(std::memory_order_relaxed)) break;
    }
    if (over_ || stop.load(std::memory_order_relaxed)) break;
    if (!PaceWrite(bucket_, bytes, progress_, stop)) break;
    if (!Send(payload_.get(), len)) break;
    ledger_.Sent(static_cast<uint32_t>(n), header_.uncompressed_length(), bytes);
    if (!Replies(false)) break;
  }
  // Every batch acknowledged before the round ends.
  while (!over_ && !ledger_.empty() && !stop.load(std::memory_order_relaxed)) {
    if (!Replies(true)) break;
  }
  progress_.running.store(false, std::memory_order_relaxed);
}

Status DirectStream::Close() {
  if (ended_) return Status::Ok();
  if (over_ || !fd_.valid()) {
    const Status f = calls_.failure();
    return f.ok() ? Internal(name_ + ": the stream is over") : f;
  }
  uint8_t end[direct::kFrameBytes] = {};
  if (Status s = direct::WriteFull(fd_.get(), end, sizeof end, calls_.stop()); !s.ok()) {
    (void)Replies(false);
    Fail(s.WithContext(name_), /*weak=*/true);
    return calls_.failure();
  }
  while (!over_) {
    if (!Replies(true)) break;
    if (calls_.stop().load(std::memory_order_relaxed) && !ended_) {
      Fail(Aborted(name_ + ": stopped while closing"), /*weak=*/true);
      break;
    }
  }
  if (ended_) return Status::Ok();
  const Status f = calls_.failure();
  return f.ok() ? Internal(name_ + ": the stream ended without the receiver's end") : f;
}

}  // namespace pmlmig::transport
