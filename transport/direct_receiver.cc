#include "direct_receiver.h"

#include <algorithm>
#include <chrono>

#include <poll.h>
#include <sys/socket.h>

#include "pmlmig/base/units.h"
#include "stream_intake.h"

namespace pmlmig::transport {

using direct::Reply;
using direct::ReplyKind;

namespace {

// How long a refused stream's remaining input is read (and dropped) so that
// the source reads the refusal rather than a reset.
constexpr auto kDrainTimeout = std::chrono::seconds(2);
// ... and for how long once the session is over (Close() waits for it).
constexpr auto kDrainAfterStop = std::chrono::milliseconds(500);
// Connections beyond the session's streams (refused ones, being drained).
constexpr size_t kSpareConnections = 8;

// An error reply with `why` (the message cut at 4 KiB).
void SendErrorReply(int fd, const Status& why, bool blocking) {
  const std::string& m = why.message();
  const size_t len = std::min<size_t>(m.size(), direct::kMaxErrorBytes);
  std::string out(direct::kReplyBytes + len, '\0');
  const auto r = direct::EncodeReply({ReplyKind::kError, static_cast<uint32_t>(why.code()), len});
  std::copy(r.begin(), r.end(), out.begin());
  std::copy(m.begin(), m.begin() + static_cast<std::ptrdiff_t>(len), out.begin() + direct::kReplyBytes);
  if (blocking) {
    const std::atomic<bool> never{false};
    (void)direct::WriteFull(fd, reinterpret_cast<const uint8_t*>(out.data()), out.size(), never,
                            std::chrono::steady_clock::now() + kDrainTimeout);
  } else {
    (void)::send(fd, out.data(), out.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  }
}

}  // namespace

class DirectStreams::Connection final : public DataCall {
 public:
  Connection(Receiver& receiver, UniqueFd fd, const direct::Hello& hello)
      : intake_(receiver, this), fd_(std::move(fd)), hello_(hello) {}
  ~Connection() { Join(); }

  void Start() { thread_ = std::thread([this] { Run(); }); }
  bool done() const { return done_.load(std::memory_order_acquire); }
  // The session is over: end within one poll slice. A refusal being sent
  // still goes out (its write is bounded by kDrainTimeout) and is drained
  // for up to kDrainAfterStop, so the source reads why even when the
  // refusal itself ended the session.
  void Stop() { stop_.store(true, std::memory_order_relaxed); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

  // Under Receiver::mu_, from another thread: the session ends the stream.
  void Abandon(const Status& why) override {
    stop_.store(true, std::memory_order_relaxed);  // first: a blocked ack write lets go of write_mu_
    std::lock_guard lock(write_mu_);
    if (replied_end_) return;
    replied_end_ = true;
    SendErrorReply(fd_.get(), why, /*blocking=*/false);
    ::shutdown(fd_.get(), SHUT_WR);
  }

 private:
  // How Serve ended.
  enum class End { kClean, kRefused, kBroke, kStopped };

  void Run() {
    Status why;
    const End end = Serve(&why);
    switch (end) {
      case End::kClean:
      case End::kStopped:
        break;
      case End::kRefused: {
        // Tell the source why, then read what it still sends until it
        // closes, so that it reads the refusal and not a reset.
        bool tell;
        {
          std::lock_guard lock(write_mu_);
          tell = !replied_end_;
          replied_end_ = true;
          if (tell) SendErrorReply(fd_.get(), why, /*blocking=*/true);
        }
        ::shutdown(fd_.get(), SHUT_WR);
        if (tell) Drain();
        break;
      }
      case End::kBroke:
        intake_.Broke(why);
        break;
    }
    intake_.Done();
    ::shutdown(fd_.get(), SHUT_RDWR);
    done_.store(true, std::memory_order_release);
  }

  End Serve(Status* why) {
    const int fd = fd_.get();
    direct::TuneBulkSocket(fd);
    if (Status s = intake_.Attach(hello_.session_id, hello_.stream); !s.ok()) {
      *why = intake_.Refuse(s);
      return End::kRefused;
    }
    const std::string name = "stream " + std::to_string(hello_.stream);

    // Batches, until the end.
    std::unique_ptr<uint8_t[]> payload(new uint8_t[kMaxBatchPayload]);
    std::string header_bytes;
    uint64_t batches = 0;
    for (;;) {
      uint8_t frame[direct::kFrameBytes];
      if (Status s = direct::ReadFull(fd, frame, sizeof frame, stop_); !s.ok()) return Lost(name, s, why);
      const uint32_t header_len = direct::GetU32(frame);
      const uint32_t payload_len = direct::GetU32(frame + 4);
      if (header_len == 0 && payload_len == 0) {
        std::lock_guard lock(write_mu_);
        if (replied_end_) return End::kStopped;
        replied_end_ = true;
        (void)direct::WriteFull(fd, direct::EncodeReply({ReplyKind::kEnd, 0, batches}).data(),
                                direct::kReplyBytes, stop_);
        return End::kClean;
      }
      if (header_len == 0 || header_len > direct::kMaxHeaderBytes || payload_len > kMaxBatchPayload) {
        *why = intake_.Refuse(InvalidArgument(
            name + ": malformed frame: header of " + std::to_string(header_len) + " bytes (1.." +
            std::to_string(direct::kMaxHeaderBytes) + "), payload of " + std::to_string(payload_len) + " bytes (0.." +
            std::to_string(kMaxBatchPayload) + ")"));
        return End::kRefused;
      }
      header_bytes.resize(header_len);
      if (Status s = direct::ReadFull(fd, reinterpret_cast<uint8_t*>(header_bytes.data()), header_len, stop_);
          !s.ok()) {
        return Lost(name, s, why);
      }
      if (!header_.ParseFromString(header_bytes) || !header_.payload().empty()) {
        *why = intake_.Refuse(InvalidArgument(name + ": malformed PageBatch header (" + std::to_string(header_len) +
                                              " bytes that do not parse, or carry a payload of their own)"));
        return End::kRefused;
      }
      const uint64_t wire_bytes = direct::kFrameBytes + uint64_t{header_len} + payload_len;
      // Straight into target memory where it can go there (no staging
      // copy), else into the buffer.
      Result<bool> in_place = intake_.BeginInPlace(header_, payload_len);
      if (!in_place.ok()) {
        *why = intake_.Refuse(in_place.status());
        return End::kRefused;
      }
      Result<proto::BatchAck> ack = Aborted("unreachable");
      if (*in_place) {
        PayloadHash& hash = intake_.in_place_hash();
        if (Status s = direct::ReadScattered(fd, intake_.in_place_dest(), stop_,
                                             [&hash](const uint8_t* p, size_t n) { hash.Update(p, n); });
            !s.ok()) {
          intake_.AbandonInPlace();
          return Lost(name, s, why);
        }
        ack = intake_.FinishInPlace(header_, wire_bytes);
      } else {
        if (Status s = direct::ReadFull(fd, payload.get(), payload_len, stop_); !s.ok()) return Lost(name, s, why);
        const std::span<const uint8_t> data(payload.get(), payload_len);
        ack = intake_.Handle(header_, Chunks(&data, 1), wire_bytes);
      }
      if (!ack.ok()) {
        *why = intake_.Refuse(ack.status());
        return End::kRefused;
      }
      ++batches;
      std::lock_guard lock(write_mu_);
      if (replied_end_) return End::kStopped;
      if (Status s = direct::WriteFull(fd, direct::EncodeReply({ReplyKind::kAck, ack->pages(), ack->sequence()}).data(),
                                       direct::kReplyBytes, stop_);
          !s.ok()) {
        return Lost(name, s, why);
      }
    }
  }

  // A read or write failed: the session ended the stream (stop_), or the
  // connection broke.
  End Lost(const std::string& name, const Status& s, Status* why) {
    if (stop_.load(std::memory_order_relaxed)) return End::kStopped;
    *why = Unavailable(name + " broke (" + s.message() + ": the source went away or the connection was lost)");
    return End::kBroke;
  }

  // Ends when the source closes (it does once it has read the refusal), at
  // kDrainTimeout, or kDrainAfterStop after the session ended: closing with
  // unread input would send a reset, which can overtake the refusal (a
  // middlebox, or a retransmission, drops what the reset overtakes).
  void Drain() {
    auto deadline = std::chrono::steady_clock::now() + kDrainTimeout;
    bool stopped = false;
    uint8_t sink[64 << 10];
    while (std::chrono::steady_clock::now() < deadline) {
      if (!stopped && stop_.load(std::memory_order_relaxed)) {
        stopped = true;
        deadline = std::min(deadline, std::chrono::steady_clock::now() + kDrainAfterStop);
      }
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const ssize_t n = ::recv(fd_.get(), sink, sizeof sink, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;
    }
  }

  StreamIntake intake_;
  const UniqueFd fd_;
  const direct::Hello hello_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> done_{false};
  std::mutex write_mu_;
  bool replied_end_ = false;  // guarded by write_mu_: an end or error reply went out
  proto::PageBatch header_;
  std::thread thread_;
};

DirectStreams::DirectStreams(Receiver& receiver, uint64_t session_id, uint32_t streams, const direct::Key& key)
    : r_(receiver), session_id_(session_id), streams_(streams), key_(key) {}

DirectStreams::~DirectStreams() { Close(); }

void DirectStreams::Adopt(UniqueFd fd, const direct::Hello& hello) {
  if (hello.version != direct::kVersion) {
    return RefuseDirect(std::move(fd), InvalidArgument("direct stream version " + std::to_string(hello.version) +
                                                       ", this receiver speaks " + std::to_string(direct::kVersion)));
  }
  const std::string_view key(reinterpret_cast<const char*>(hello.key.data()), hello.key.size());
  if (hello.session_id != session_id_ || !direct::SameKey(key_, key)) {
    return RefuseDirect(std::move(fd), PermissionDenied("direct stream: the key is not that of session " +
                                                        FormatHex(hello.session_id)));
  }
  std::lock_guard lock(mu_);
  if (closed_) return RefuseDirect(std::move(fd), Aborted("the migration is over"));
  std::erase_if(connections_, [](const std::unique_ptr<Connection>& c) { return c->done(); });
  if (connections_.size() >= streams_ + kSpareConnections) {
    return RefuseDirect(std::move(fd), ResourceExhausted("direct stream: more connections than the session's " +
                                                         std::to_string(streams_) + " streams"));
  }
  connections_.push_back(std::make_unique<Connection>(r_, std::move(fd), hello));
  connections_.back()->Start();
}

void DirectStreams::Close() {
  std::vector<std::unique_ptr<Connection>> connections;
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    connections.swap(connections_);
  }
  for (auto& c : connections) c->Stop();
  connections.clear();  // joins each
}

void RefuseDirect(UniqueFd fd, const Status& why) { SendErrorReply(fd.get(), why, /*blocking=*/false); }

}  // namespace pmlmig::transport
