// PageStream: one data stream of the sender, whatever carries it: a gRPC
// Pages call (DataStream, data_stream.h) or a direct TCP connection
// (DirectStream, direct_stream.h). The sink (grpc_sink.cc) runs each on a
// sender thread per round and closes them before Final; both take their
// batches from the round's shared PageList (GatherBatch), build them with a
// BatchBuilder, keep at most max_inflight_bytes unacknowledged and report
// failures through SinkCalls.
//
// Thread-safety: between rounds only the controlling thread touches a
// stream; during Run only its sender thread does, except progress(), which
// the stall watch reads.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/slot_table.h"
#include "stall_watch.h"
#include "token_bucket.h"

namespace pmlmig::transport {

class PageStream {
 public:
  virtual ~PageStream() = default;
  virtual uint32_t index() const = 0;
  // Sender thread: sends batches of `pages` (shared with the other streams)
  // for `round` until the list is exhausted and every batch acknowledged,
  // or the sink stops; failures go to SinkCalls::Fail.
  virtual void Run(const engine::SlotTable& source, uint64_t session_id, uint32_t round, engine::PageList& pages) = 0;
  // Ends the stream and waits for the receiver's word that it applied and
  // acknowledged every batch on it.
  virtual Status Close() = 0;
  // Ends it if it is not over (every call was cancelled by now). Idempotent.
  virtual void Teardown() = 0;
  virtual StreamProgress& progress() = 0;
  // What the last Run sent; reset by the next.
  virtual const engine::TransferStats& round_stats() const = 0;
  virtual uint64_t batches_sent() const = 0;
  virtual uint64_t pages_sent() const = 0;
};

// What one stream has sent: the batches the receiver has not acknowledged
// yet (acknowledgements come in order), the sequence of the next, and the
// counts of the stream and of its current round. The stream's sender
// thread's alone.
class SendLedger {
 public:
  // Whether a batch of `bytes` may go out: at most `max_inflight_bytes`
  // unacknowledged, but always one batch.
  bool Fits(uint64_t bytes, uint64_t max_inflight_bytes) const {
    return inflight_.empty() || inflight_bytes_ + bytes <= max_inflight_bytes;
  }
  // Batch next_sequence() went out: `pages` pages, `data_bytes` of them with
  // data, `wire_bytes` on the wire.
  void Sent(uint32_t pages, uint64_t data_bytes, uint64_t wire_bytes);
  // The receiver acknowledged batch `sequence` of `pages` pages: the oldest
  // in flight (callers check empty() first), or kDataLoss naming both,
  // "<stream>: receiver acknowledged batch ...".
  Status Acknowledge(uint64_t sequence, uint32_t pages, const std::string& stream);
  void StartRound() { round_stats_ = {}; }

  bool empty() const { return inflight_.empty(); }
  size_t in_flight() const { return inflight_.size(); }
  uint64_t next_sequence() const { return next_sequence_; }
  uint64_t pages_sent() const { return pages_sent_; }
  const engine::TransferStats& round_stats() const { return round_stats_; }

 private:
  struct Batch {
    uint64_t sequence;
    uint64_t bytes;
    uint32_t pages;
  };
  std::deque<Batch> inflight_;
  uint64_t inflight_bytes_ = 0;
  uint64_t next_sequence_ = 0;
  uint64_t pages_sent_ = 0;
  engine::TransferStats round_stats_;
};

// Takes runs from `pages` until `batch_pages` pages are gathered or the
// list is exhausted (scattered dirty pages would otherwise travel one or two
// pages per message); returns the pages gathered (0: exhausted).
uint64_t GatherBatch(engine::PageList& pages, uint32_t batch_pages, std::vector<engine::PageRun>* gathered);
// Waits for `bytes` of the token bucket (when there is one), marked as
// throttled meanwhile so the stall watch does not count it; false if the
// sink stopped.
bool PaceWrite(TokenBucket* bucket, uint64_t bytes, StreamProgress& progress, const std::atomic<bool>& stop);
// Counts one batch sent: `pages` in all, `data_bytes` of them with data,
// `wire_bytes` on the wire.
void CountBatch(engine::TransferStats* s, uint64_t pages, uint64_t data_bytes, uint64_t wire_bytes);

}  // namespace pmlmig::transport
