#include "pages_reactor.h"

#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/units.h"

namespace pmlmig::transport {
namespace {

// The refusal of a batch that came after its session failed: the session's cause.
Status EndedBefore(const std::string& stream, const Status& why) {
  return Status(why.code() == Code::kOk ? Code::kAborted : why.code(),
                stream + ": the migration had already ended: " + why.message());
}

}  // namespace

using Clock = Session::Clock;

PagesReactor::PagesReactor(Receiver& receiver, const Status& denied) : r_(receiver) {
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
    Close(Refuse(ack.status()));
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

void PagesReactor::OnDone() {
  PagesDone();
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

Status PagesReactor::Admit(const std::shared_ptr<Session>& session, uint32_t index, const proto::PageBatch& b) const {
  if (session->state != SessionState::kReceiving) {
    return InvalidArgument("stream " + std::to_string(index) + ": batch " + std::to_string(b.sequence()) +
                           ": the migration is not receiving pages (before Setup, or after Final or a failure)");
  }
  if (session->switch_prepared) {
    return InvalidArgument("stream " + std::to_string(index) + ": batch " + std::to_string(b.sequence()) +
                           " after PostcopyPrepare (the pages it names may be holes now)");
  }
  const StreamState& ss = session->per_stream[index];
  return AdmitBatch(session->id, index, StreamCursor{ss.next_sequence, ss.last_round}, b);
}

Result<proto::BatchAck> PagesReactor::HandleBatch(Chunks wire) {
  PagesState& st = state_;
  proto::PageBatch& batch = st.header;
  {
    Status s = DecodeBatch(wire, &batch, &st.payload);
    if (!s.ok()) {
      s = s.WithContext(st.attached ? "stream " + std::to_string(st.index) : "Pages");
      if (!st.session) {
        // Recorded before the refusal reaches the sender, so before anything
        // it does about it.
        std::lock_guard lock(r_.mu_);
        if (r_.current_ && r_.current_->refused_call.ok() &&
            (r_.current_->state == SessionState::kWaitSetup || r_.current_->state == SessionState::kReceiving)) {
          r_.current_->refused_call = s;
        }
      }
      return s;
    }
  }
  const engine::SlotTable* memory = nullptr;
  engine::PageDigestTable* digests = nullptr;  // verifying: updated after each write
  {
    std::lock_guard lock(r_.mu_);
    if (!st.session) {
      // The first batch attaches this call to the current session.
      const std::string name = "stream " + std::to_string(batch.stream());
      if (!r_.current_ || r_.current_->id != batch.session_id()) {
        // A stream's first batch can arrive just after another stream's
        // refusal ended the session: name that cause, not this symptom.
        if (auto it = r_.ended_.find(batch.session_id()); it != r_.ended_.end() && !it->second.committed) {
          return EndedBefore(name, it->second.error);
        }
        return InvalidArgument(name + ": batch names session " + FormatHex(batch.session_id()) +
                               ", which is not the migration in progress");
      }
      st.session = r_.current_;
    }
    Session& session = *st.session;
    if (!st.attached) {
      const std::string name = "stream " + std::to_string(batch.stream());
      if (session.state != SessionState::kReceiving) {
        if (!session.failure.ok()) return EndedBefore(name, session.failure);
        return InvalidArgument(name + ": batch before the migration is set up (or after it ended)");
      }
      if (batch.stream() >= session.streams) {
        return InvalidArgument(name + ": stream index outside 0.." + std::to_string(session.streams - 1));
      }
      if (session.per_stream[batch.stream()].attached) {
        return InvalidArgument(name + ": already attached to another call");
      }
      st.index = batch.stream();
      st.attached = true;
      // Through the file only when this is the one stream writing (see SlotFiles).
      st.files = SlotFiles::Of(*session.target, /*write_through=*/session.streams == 1);
      st.applier.set_checksum(session.checksum);
      session.per_stream[st.index].attached = true;
      session.per_stream[st.index].reactor = this;
    }
    PMLMIG_RETURN_IF_ERROR(Admit(st.session, st.index, batch));
    ++session.applying;
    memory = &session.target->memory();
    digests = session.target->digests();
  }

  Result<ApplyResult> applied = st.applier.Apply(batch, st.payload, *memory, digests, &st.files);
  uint64_t wire_bytes = 0;
  for (const auto& c : wire) wire_bytes += c.size();
  {
    std::lock_guard lock(r_.mu_);
    Session& session = *st.session;
    --session.applying;
    if (applied.ok()) {
      StreamState& ss = session.per_stream[st.index];
      const uint64_t pages = applied->normal_pages + applied->zero_pages;
      ++ss.next_sequence;
      ss.last_round = batch.round();
      ss.pages += pages;
      session.totals.pages += pages;
      session.totals.normal_pages += applied->normal_pages;
      session.totals.zero_pages += applied->zero_pages;
      session.totals.payload_bytes += applied->normal_pages << engine::kPageShift;
      session.totals.wire_bytes += wire_bytes;
      ++session.totals.batches;
      session.last_activity = Clock::now();
      session.rounds = std::max(session.rounds, batch.round() + 1);
    }
    r_.cv_.notify_all();
  }
  if (!applied.ok()) return applied.status().WithContext("stream " + std::to_string(st.index));
  FailPoint("receiver.batch");
  proto::BatchAck ack;
  ack.set_sequence(batch.sequence());
  ack.set_pages(static_cast<uint32_t>(applied->normal_pages + applied->zero_pages));
  return ack;
}

// Detaching the call and failing the session happen under one hold of
// Receiver::mu_, so the control thread never sees the stream gone and the
// session not yet failed (it would report the control stream instead of the stream).
grpc::Status PagesReactor::Refuse(const Status& s) {
  PagesState& st = state_;
  std::lock_guard lock(r_.mu_);
  if (st.attached && st.session->per_stream[st.index].reactor == this) {
    st.session->per_stream[st.index].reactor = nullptr;
  }
  st.attached = false;
  if (st.session) r_.MarkFailedLocked(*st.session, s, this);
  return ToGrpc(s);
}

void PagesReactor::PagesCancelled() {
  PagesState& st = state_;
  std::lock_guard lock(r_.mu_);
  if (!st.attached || st.session->per_stream[st.index].reactor != this) return;
  st.session->per_stream[st.index].reactor = nullptr;
  // A data stream of a migration in progress broke: the migration cannot
  // complete (MarkFailedLocked does nothing once it is finalizing or over).
  // gRPC does not say why; a message over its size limit ends the call the
  // same way (the sender reads "larger than max").
  const Status broke = Unavailable("stream " + std::to_string(st.index) +
                                   " broke (cancelled by the source, connection lost, or a message over the " +
                                   FormatBytes(kMaxMessageBytes) + " limit)");
  r_.MarkFailedLocked(*st.session, r_.FirstCause(*st.session, broke), this);
  r_.cv_.notify_all();
}

void PagesReactor::PagesDone() {
  PagesState& st = state_;
  std::lock_guard lock(r_.mu_);
  if (st.attached && st.session->per_stream[st.index].reactor == this) {
    st.session->per_stream[st.index].reactor = nullptr;
    r_.cv_.notify_all();  // the control thread may wait for the streams to report
  }
}

}  // namespace pmlmig::transport
