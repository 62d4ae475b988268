#include "pages_reactor.h"

#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/units.h"

namespace pmlmig::transport {

PagesReactor::PagesReactor(Receiver& receiver, const Status& denied) : intake_(receiver, this) {
  if (!denied.ok()) {
    Close(ToGrpc(denied));
    return;
  }
  StartRead(&in_);
}

void PagesReactor::OnReadDone(bool ok) {
  if (!ok) {  // the source half-closed the stream (before Final), or it broke
    Close(grpc::Status::OK);
    return;
  }
  Result<proto::BatchAck> ack = Internal("unreadable message");
  std::vector<grpc::Slice> slices;
  if (in_.Dump(&slices).ok()) {
    chunks_.clear();
    for (const grpc::Slice& sl : slices) chunks_.emplace_back(sl.begin(), sl.size());
    ack = HandleBatch(chunks_);
  }
  chunks_.clear();
  slices.clear();
  in_.Clear();
  if (!ack.ok()) {
    Close(ToGrpc(intake_.Refuse(ack.status())));
    return;
  }
  // Under mu_, so that an Abandon from another thread either comes first
  // (and we start nothing after its Finish) or after (and sees our ops).
  std::lock_guard lock(mu_);
  if (closing_) return;
  acks_.push_back(std::move(ack).value());
  if (!writing_) WriteNextLocked();
  StartRead(&in_);
}

void PagesReactor::OnWriteDone(bool ok) {
  std::lock_guard lock(mu_);
  writing_ = false;
  if (ok && !acks_.empty()) {
    WriteNextLocked();
    return;
  }
  if (!ok) acks_.clear();
  if (finish_pending_) {
    finish_pending_ = false;
    Finish(finish_status_);
  }
}

void PagesReactor::OnCancel() {
  // gRPC does not say why; a message over its size limit ends the call the
  // same way (the sender reads "larger than max").
  intake_.Broke(Unavailable("stream " + std::to_string(intake_.index()) +
                            " broke (cancelled by the source, connection lost, or a message over the " +
                            FormatBytes(kMaxMessageBytes) + " limit)"));
}

void PagesReactor::OnDone() {
  intake_.Done();
  delete this;
}

void PagesReactor::Close(const grpc::Status& st) {
  std::lock_guard lock(mu_);
  if (closing_) return;
  closing_ = true;
  if (!st.ok()) acks_.clear();
  if (writing_) {  // Finish after the ack being written
    finish_pending_ = true;
    finish_status_ = st;
  } else {
    Finish(st);
  }
}

void PagesReactor::WriteNextLocked() {
  bool own = false;
  out_.Clear();
  (void)grpc::SerializationTraits<proto::BatchAck>::Serialize(acks_.front(), &out_, &own);
  acks_.pop_front();
  writing_ = true;
  StartWrite(&out_);
}

Result<proto::BatchAck> PagesReactor::HandleBatch(Chunks wire) {
  if (Status s = DecodeBatch(wire, &header_, &payload_); !s.ok()) {
    s = s.WithContext(intake_.attached() ? "stream " + std::to_string(intake_.index()) : "Pages");
    intake_.NoteUndecodable(s);
    return s;
  }
  uint64_t wire_bytes = 0;
  for (const auto& c : wire) wire_bytes += c.size();
  return intake_.Handle(header_, payload_, wire_bytes);
}

}  // namespace pmlmig::transport
