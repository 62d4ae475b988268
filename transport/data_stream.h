// DataStream: one Pages call of the sender (proto/migration.proto), on its
// own channel and TCP connection, driven through its own completion queue.
// Each batch's payload is built straight into a pooled buffer (BufferPool)
// that the message references (no serialization copy), and the next batch
// is built while the previous one is being written. At most
// max_inflight_bytes are unacknowledged (backpressure), but always at least
// one batch however large; the TokenBucket, when there is one, paces writes.
//
// Why a completion queue rather than the synchronous API: a stream keeps a
// read posted for acks while it writes, and builds the next batch while the
// last one is on the wire; the synchronous API would need a second thread
// per stream and a lock between them. Why not the callback API: the sender
// thread is where the batch is built (compression, checksums, copying), and
// the pump keeps that work on it rather than on gRPC's callback threads.
//
// Thread-safety: between rounds only the controlling thread touches a
// DataStream; during Run only its own sender thread does, except
// progress(), which the stall watch reads. Failures go through SinkCalls.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <deque>
#include <memory>
#include <span>
#include <string>

#include "batch_codec.h"
#include "buffer_pool.h"
#include "migration.grpc.pb.h"
#include "page_stream.h"
#include "sink_calls.h"
#include "stall_watch.h"
#include "token_bucket.h"

namespace pmlmig::transport {

class DataStream final : public PageStream {
 public:
  // Stream `index` (0-based) of a sink with options `o`; connects on its
  // own channel (connection index + 1). `bucket` may be null (no limit).
  DataStream(uint32_t index, const GrpcSinkOptions& o, SinkCalls& calls, TokenBucket* bucket);
  // Tears down (see Teardown).
  ~DataStream() override;
  DataStream(const DataStream&) = delete;
  DataStream& operator=(const DataStream&) = delete;

  uint32_t index() const override { return index_; }
  // The batch checksum agreed in Hello (before the first Run).
  void set_checksum(Checksum c) { builder_.set_checksum(c); }
  grpc::Channel& channel() { return *channel_; }
  // Starts the Pages call (on a connected channel) and posts the first read
  // for acks, which stays posted from here on.
  Status Open();
  // Sender thread: sends batches of `pages` (shared with the other streams)
  // for `round` until the list is exhausted and every batch acknowledged,
  // or the sink stops; failures go to SinkCalls::Fail.
  void Run(const engine::SlotTable& source, uint64_t session_id, uint32_t round, engine::PageList& pages) override;
  // Finish: half-closes the call and waits for its status (OK: the receiver
  // saw the end after applying and acknowledging every batch).
  Status Close() override;
  // Ends the call if it is not over (every call was cancelled by now), then
  // shuts the completion queue down and drains it. Idempotent.
  void Teardown() override;

  StreamProgress& progress() override { return progress_; }
  // What the last Run sent; reset by the next.
  const engine::TransferStats& round_stats() const override { return ledger_.round_stats(); }
  uint64_t batches_sent() const override { return ledger_.next_sequence(); }
  uint64_t pages_sent() const override { return ledger_.pages_sent(); }

 private:

  // Builds the batch of `runs` into next_; returns its size on the wire.
  Result<uint64_t> BuildNext(const engine::SlotTable& source, const BatchHeader& h,
                             std::span<const engine::PageRun> runs);
  // Waits for one operation of the call to complete and handles it. False
  // when the call is over (an operation failed, or a bad ack).
  bool Pump();
  // Ends the call (Finish) and waits until nothing is in flight; returns
  // the call's status.
  grpc::Status Settle();
  // The call broke during Run: fails the sink with the best reason known.
  void Broke();

  const uint32_t index_;
  const GrpcSinkOptions& options_;
  SinkCalls& calls_;
  TokenBucket* const bucket_;
  const std::string name_;  // "stream <i>"
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::TemplatedGenericStub<grpc::ByteBuffer, proto::BatchAck>> stub_;
  grpc::ClientContext* ctx_ = nullptr;  // owned by SinkCalls
  grpc::CompletionQueue cq_;            // declared before `call_`: outlives it
  std::unique_ptr<grpc::ClientAsyncReaderWriter<grpc::ByteBuffer, proto::BatchAck>> call_;
  // Operations in flight on `call_` (at most one read and one write).
  bool read_pending_ = false;
  bool write_pending_ = false;
  bool writes_done_pending_ = false;
  bool finish_requested_ = false;
  bool finished_ = false;   // the Finish op completed: `final_status_` is set
  bool broken_ = false;     // an operation failed: the call is over
  bool stray_ack_ = false;  // an ack arrived with nothing in flight
  bool cq_down_ = false;    // cq_ has been shut down and drained
  grpc::Status final_status_;
  proto::BatchAck ack_;       // target of the pending read
  grpc::ByteBuffer writing_;  // the message being written
  grpc::ByteBuffer next_;     // the next message, built ahead
  BatchBuilder builder_;
  proto::PageBatch header_;  // the next message's fields but the payload
  std::shared_ptr<BufferPool> pool_;
  SendLedger ledger_;
  StreamProgress progress_;
};

}  // namespace pmlmig::transport
