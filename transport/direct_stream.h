// DirectStream: one data stream of the sender on a direct TCP connection
// (direct_wire.h), used when the receiver offers it at Setup. The same
// batches as a Pages call (BatchBuilder into a buffer of its own), written
// with one sendmsg of the frame prefix, the header and the payload; acks are
// read between writes, whenever the socket has them. No gRPC: no HTTP/2
// framing, no completion queue, no callback thread.
//
// Thread-safety: as PageStream. Everything blocks in poll() slices of at
// most 50 ms and gives up once the sink stops (SinkCalls::stop()), so a
// failure or an Abort elsewhere ends a stream within one slice.
#pragma once

#include <deque>
#include <memory>
#include <string>

#include "batch_codec.h"
#include "direct_wire.h"
#include "page_stream.h"
#include "sink_calls.h"
#include "token_bucket.h"

namespace pmlmig::transport {

class DirectStream final : public PageStream {
 public:
  DirectStream(uint32_t index, const GrpcSinkOptions& o, SinkCalls& calls, TokenBucket* bucket);
  ~DirectStream() override = default;
  DirectStream(const DirectStream&) = delete;
  DirectStream& operator=(const DirectStream&) = delete;

  // The batch checksum agreed in Hello (before the first Run).
  void set_checksum(Checksum c) { builder_.set_checksum(c); }
  // Connects to host:port (within the sink's connect timeout) and presents
  // the hello of stream index() of `session_id` with `key`.
  Status Open(const std::string& host, uint16_t port, uint64_t session_id, const direct::Key& key);

  uint32_t index() const override { return index_; }
  void Run(const engine::SlotTable& source, uint64_t session_id, uint32_t round, engine::PageList& pages) override;
  // Sends the end and waits for the receiver's end reply.
  Status Close() override;
  void Teardown() override { fd_ = UniqueFd(); }
  StreamProgress& progress() override { return progress_; }
  const engine::TransferStats& round_stats() const override { return ledger_.round_stats(); }
  uint64_t batches_sent() const override { return ledger_.next_sequence(); }
  uint64_t pages_sent() const override { return ledger_.pages_sent(); }

 private:
  // Writes the frame (prefix and header in head_, then `len` bytes of
  // payload), reading replies whenever the socket has some. False: the
  // stream is over (the failure is recorded).
  bool Send(const uint8_t* payload, size_t len);
  // Handles the replies that have arrived; with `wait`, waits (one 50 ms
  // slice) when none has. False: the stream is over (recorded).
  bool Replies(bool wait);
  bool HandleReply(const direct::Reply& r, std::string_view message);
  // Records `s` (weak: a better reason may come from elsewhere); false.
  bool Fail(const Status& s, bool weak = false);

  const uint32_t index_;
  const GrpcSinkOptions& options_;
  SinkCalls& calls_;
  TokenBucket* const bucket_;
  const std::string name_;  // "stream <i> to <target>"
  UniqueFd fd_;
  BatchBuilder builder_;
  proto::PageBatch header_;           // the batch being built, but its payload
  std::unique_ptr<uint8_t[]> payload_;  // kMaxBatchPayload bytes
  std::string head_;                  // frame prefix + serialized header
  std::string rx_;                    // reply bytes not yet handled
  bool over_ = false;                 // the stream failed or was closed
  bool ended_ = false;                // the receiver's end reply came
  SendLedger ledger_;
  StreamProgress progress_;
};

}  // namespace pmlmig::transport
