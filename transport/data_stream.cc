#include "data_stream.h"

#include <grpc/slice.h>

#include <cstring>

namespace pmlmig::transport {
namespace {

// Completion-queue tags of a data stream's operations.
char kStartTag, kReadTag, kWriteTag, kWritesDoneTag, kFinishTag;

constexpr const char* kPagesMethod = "/pmlmig.proto.Migration/Pages";

}  // namespace

DataStream::DataStream(uint32_t index, const GrpcSinkOptions& o, SinkCalls& calls, TokenBucket* bucket)
    : index_(index),
      options_(o),
      calls_(calls),
      bucket_(bucket),
      name_("stream " + std::to_string(index)),
      channel_(MakeChannel(o, static_cast<int>(index) + 1)),
      builder_(o.compress, o.zstd_level),
      pool_(BufferPool::Create(uint64_t{o.batch_pages} << engine::kPageShift)) {}

DataStream::~DataStream() { Teardown(); }

Status DataStream::Open() {
  stub_ = std::make_unique<grpc::TemplatedGenericStub<grpc::ByteBuffer, proto::BatchAck>>(channel_);
  ctx_ = calls_.NewContext();
  call_ = stub_->PrepareCall(ctx_, kPagesMethod, &cq_);
  if (!call_) return Internal(name_ + ": cannot create the call");
  call_->StartCall(&kStartTag);
  void* tag;
  bool ok;
  if (!cq_.Next(&tag, &ok) || tag != &kStartTag || !ok) {
    broken_ = true;
    return Unavailable(name_ + " to " + options_.target + ": cannot start the call");
  }
  call_->Read(&ack_, &kReadTag);
  read_pending_ = true;
  return Status::Ok();
}

Result<uint64_t> DataStream::BuildNext(const engine::SlotTable& source, const BatchHeader& h,
                                       std::span<const engine::PageRun> runs) {
  uint8_t* buf = pool_->Get();
  size_t len = 0;
  if (Status s = builder_.Build(source, runs, h, &header_, buf, &len); !s.ok()) {
    pool_->Put(buf);
    return s;
  }
  // [fields but the payload][payload tag and length] in one small slice,
  // then the payload itself: a valid PageBatch, the payload not copied.
  const size_t hlen = header_.ByteSizeLong();
  uint8_t prefix[16];
  const size_t plen = len > 0 ? EncodePayloadPrefix(len, prefix) : 0;
  grpc_slice head = grpc_slice_malloc(hlen + plen);
  header_.SerializeWithCachedSizesToArray(GRPC_SLICE_START_PTR(head));
  std::memcpy(GRPC_SLICE_START_PTR(head) + hlen, prefix, plen);
  grpc::Slice slices[2] = {grpc::Slice(head, grpc::Slice::STEAL_REF), grpc::Slice()};
  if (len > 0) {
    const BufferPool::Loan loan = pool_->Lend(buf);
    slices[1] = grpc::Slice(buf, len, loan.release, loan.arg);
  } else {
    pool_->Put(buf);
  }
  next_ = grpc::ByteBuffer(slices, len > 0 ? 2 : 1);
  return hlen + plen + len;
}

bool DataStream::Pump() {
  void* tag;
  bool ok;
  if (!cq_.Next(&tag, &ok)) {
    cq_down_ = true;
    broken_ = true;
    return false;
  }
  if (tag == &kReadTag) {
    read_pending_ = false;
    if (!ok) {
      broken_ = true;  // the receiver ended the call, or it was cancelled
      return false;
    }
    progress_.Touch();
    if (ledger_.empty()) {
      stray_ack_ = true;
      return false;
    }
    if (Status s = ledger_.Acknowledge(ack_.sequence(), ack_.pages(), name_); !s.ok()) {
      calls_.Fail(s);
      return false;
    }
    call_->Read(&ack_, &kReadTag);
    read_pending_ = true;
    return true;
  }
  if (tag == &kWriteTag) {
    write_pending_ = false;
    writing_.Clear();
    if (!ok) {
      broken_ = true;
      return false;
    }
    progress_.Touch();
    return true;
  }
  if (tag == &kWritesDoneTag) {
    writes_done_pending_ = false;
    if (!ok) broken_ = true;
    return ok;
  }
  if (tag == &kFinishTag) {
    finished_ = true;
    return true;
  }
  return true;
}

grpc::Status DataStream::Settle() {
  if (!call_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the call was never started");
  if (!finish_requested_) {
    call_->Finish(&final_status_, &kFinishTag);
    finish_requested_ = true;
  }
  // Finish completes once the receiver has ended the call (or it is
  // cancelled); a pending read then fails, and a write completes either way.
  while (!finished_ || read_pending_ || write_pending_ || writes_done_pending_) {
    (void)Pump();
    if (cq_down_) break;
  }
  return final_status_;
}

void DataStream::Teardown() {
  if (call_ && !finished_) (void)Settle();  // every call was cancelled by now
  if (cq_down_) return;
  cq_.Shutdown();
  void* tag;
  bool ok;
  while (cq_.Next(&tag, &ok)) {
  }
  cq_down_ = true;
}

void DataStream::Run(const engine::SlotTable& source, uint64_t session_id, uint32_t round,
                     engine::PageList& pages) {
  ledger_.StartRound();
  bool exhausted = false;  // the PageList has nothing more for us
  bool have_next = false;  // next_ holds a built batch
  uint64_t next_bytes = 0;
  uint32_t next_pages = 0;
  uint64_t next_data = 0;
  bool broken = false;
  std::vector<engine::PageRun> gathered;
  gathered.reserve(options_.batch_pages);
  const std::atomic<bool>& stop = calls_.stop();
  while (!stop.load(std::memory_order_relaxed)) {
    if (!have_next && !exhausted) {
      const uint64_t gathered_pages = GatherBatch(pages, options_.batch_pages, &gathered);
      if (gathered_pages == 0) {
        exhausted = true;
      } else {
        Result<uint64_t> bytes = BuildNext(source, BatchHeader{session_id, index_, round, ledger_.next_sequence()}, gathered);
        if (!bytes.ok()) {
          calls_.Fail(bytes.status().WithContext(name_));
          break;
        }
        have_next = true;
        next_bytes = *bytes;
        next_pages = static_cast<uint32_t>(gathered_pages);
        next_data = header_.uncompressed_length();
      }
    }
    // Write the next batch when the previous write is done and the acks
    // allow it: at most max_inflight_bytes unacknowledged (backpressure),
    // but always at least one batch however large.
    if (have_next && !write_pending_ &&
        ledger_.Fits(next_bytes, options_.max_inflight_bytes)) {
      if (!PaceWrite(bucket_, next_bytes, progress_, stop)) break;
      writing_.Swap(&next_);
      next_.Clear();
      call_->Write(writing_, &kWriteTag);
      write_pending_ = true;
      have_next = false;
      ledger_.Sent(next_pages, next_data, next_bytes);
      continue;
    }
    if (!have_next && exhausted && ledger_.empty() && !write_pending_) break;  // round done
    if (!Pump()) {
      broken = true;
      break;
    }
  }
  next_.Clear();
  if (broken) Broke();
  progress_.running.store(false, std::memory_order_relaxed);
}

void DataStream::Broke() {
  // The call is over (the receiver refused a batch, the connection died,
  // or we cancelled it), or the receiver misbehaved: make sure it is over,
  // then its status says why, e.g. "batch 17: run 0: gpa ... outside guest
  // memory".
  const std::string name = name_ + " to " + options_.target;
  if (stray_ack_) calls_.Fail(DataLoss(name + ": acknowledgement for a batch never sent"));
  if (!broken_) calls_.Fail(Internal(name + ": call ended"), true);
  const grpc::Status st = Settle();
  if (st.ok()) {
    calls_.Fail(Internal(name + ": receiver closed the stream early"), true);
  } else {
    calls_.Fail(FromGrpc(st, name), st.error_code() == grpc::StatusCode::CANCELLED);
  }
}

Status DataStream::Close() {
  if (finished_) return Status::Ok();
  if (!broken_) {
    call_->WritesDone(&kWritesDoneTag);
    writes_done_pending_ = true;
  }
  const grpc::Status st = Settle();
  if (!st.ok()) return FromGrpc(st, name_);
  if (stray_ack_) return DataLoss(name_ + ": acknowledgement for a batch never sent");
  return Status::Ok();
}

uint64_t GatherBatch(engine::PageList& pages, uint32_t batch_pages, std::vector<engine::PageRun>* gathered) {
  gathered->clear();
  uint64_t n = 0;
  engine::PageRun chunk;
  while (n < batch_pages && pages.Next(batch_pages - n, &chunk)) {
    gathered->push_back(chunk);
    n += chunk.pages;
  }
  return n;
}

bool PaceWrite(TokenBucket* bucket, uint64_t bytes, StreamProgress& progress, const std::atomic<bool>& stop) {
  if (bucket == nullptr) return true;
  progress.throttled.store(true, std::memory_order_relaxed);
  const bool ok = bucket->Acquire(bytes, stop);
  progress.throttled.store(false, std::memory_order_relaxed);
  progress.Touch();
  return ok;
}

void SendLedger::Sent(uint32_t pages, uint64_t data_bytes, uint64_t wire_bytes) {
  inflight_.push_back({next_sequence_, wire_bytes, pages});
  inflight_bytes_ += wire_bytes;
  ++next_sequence_;
  pages_sent_ += pages;
  CountBatch(&round_stats_, pages, data_bytes, wire_bytes);
}

Status SendLedger::Acknowledge(uint64_t sequence, uint32_t pages, const std::string& stream) {
  if (inflight_.empty()) return Internal(stream + ": acknowledgement with no batch in flight");
  const Batch& f = inflight_.front();
  if (sequence != f.sequence || pages != f.pages) {
    return DataLoss(stream + ": receiver acknowledged batch " + std::to_string(sequence) + " (" +
                    std::to_string(pages) + " pages), expected batch " + std::to_string(f.sequence) + " (" +
                    std::to_string(f.pages) + " pages)");
  }
  inflight_bytes_ -= f.bytes;
  inflight_.pop_front();
  return Status::Ok();
}

void CountBatch(engine::TransferStats* s, uint64_t pages, uint64_t data_bytes, uint64_t wire_bytes) {
  const uint64_t data_pages = data_bytes >> engine::kPageShift;
  s->pages += pages;
  s->normal_pages += data_pages;
  s->zero_pages += pages - data_pages;
  s->payload_bytes += data_bytes;
  s->wire_bytes += wire_bytes;
  ++s->batches;
}

}  // namespace pmlmig::transport
