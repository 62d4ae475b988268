#include "stream_intake.h"

#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/units.h"
#include "populate_ahead.h"
#include "uffd_fill.h"

namespace pmlmig::transport {
namespace {

// The refusal of a batch that came after its session failed: the session's cause.
Status EndedBefore(const std::string& stream, const Status& why) {
  return Status(why.code() == Code::kOk ? Code::kAborted : why.code(),
                stream + ": the migration had already ended: " + why.message());
}

// The guest-physical end of the last run with page contents.
uint64_t DataEnd(const proto::PageBatch& batch) {
  uint64_t end = 0;
  for (const proto::PageRun& r : batch.runs()) {
    if (r.flags() == proto::PAGE_RUN_DATA) end = std::max(end, r.gpa() + (uint64_t{r.pages()} << engine::kPageShift));
  }
  return end;
}

}  // namespace

using Clock = Session::Clock;

Status StreamIntake::Attach(uint64_t session_id, uint32_t index) {
  std::lock_guard lock(r_.mu_);
  return AttachLocked(session_id, index);
}

Status StreamIntake::AttachLocked(uint64_t session_id, uint32_t index) {
  const std::string name = "stream " + std::to_string(index);
  if (!session_) {
    if (!r_.current_ || r_.current_->id != session_id) {
      // A stream's first batch can arrive just after another stream's
      // refusal ended the session: name that cause, not this symptom.
      if (auto it = r_.ended_.find(session_id); it != r_.ended_.end() && !it->second.committed) {
        return EndedBefore(name, it->second.error);
      }
      return InvalidArgument(name + ": batch names session " + FormatHex(session_id) +
                             ", which is not the migration in progress");
    }
    session_ = r_.current_;
  }
  Session& session = *session_;
  if (session.state != SessionState::kReceiving) {
    if (!session.failure.ok()) return EndedBefore(name, session.failure);
    return InvalidArgument(name + ": batch before the migration is set up (or after it ended)");
  }
  if (index >= session.streams) {
    return InvalidArgument(name + ": stream index outside 0.." + std::to_string(session.streams - 1));
  }
  if (session.per_stream[index].attached) return InvalidArgument(name + ": already attached to another call");
  index_ = index;
  attached_ = true;
  // Through the file only when this is the one stream writing (see SlotFiles).
  files_ = SlotFiles::Of(*session.target, /*write_through=*/session.streams == 1);
  files_.set_fill(session.fill);
  applier_.set_checksum(session.checksum);
  session.per_stream[index_].attached = true;
  session.per_stream[index_].call = self_;
  return Status::Ok();
}

void StreamIntake::NoteUndecodable(const Status& s) {
  if (session_) return;
  // Recorded before the refusal reaches the sender, so before anything it
  // does about it.
  std::lock_guard lock(r_.mu_);
  if (r_.current_ && r_.current_->refused_call.ok() &&
      (r_.current_->state == SessionState::kWaitSetup || r_.current_->state == SessionState::kReceiving)) {
    r_.current_->refused_call = s;
  }
}

Status StreamIntake::Admit(const proto::PageBatch& batch) {
  admitted_ = Admitted{};
  std::shared_ptr<PopulateAhead> done_populating;  // a later round: stopped here
  std::shared_ptr<UffdFill> done_filling;          // likewise
  {
    std::lock_guard lock(r_.mu_);
    if (!attached_) PMLMIG_RETURN_IF_ERROR(AttachLocked(batch.session_id(), batch.stream()));
    Session& session = *session_;
    if (session.state != SessionState::kReceiving) {
      return InvalidArgument("stream " + std::to_string(index_) + ": batch " + std::to_string(batch.sequence()) +
                             ": the migration is not receiving pages (before Setup, or after Final or a failure)");
    }
    if (session.switch_prepared) {
      return InvalidArgument("stream " + std::to_string(index_) + ": batch " + std::to_string(batch.sequence()) +
                             " after PostcopyPrepare (the pages it names may be holes now)");
    }
    const StreamState& ss = session.per_stream[index_];
    PMLMIG_RETURN_IF_ERROR(AdmitBatch(session.id, index_, StreamCursor{ss.next_sequence, ss.last_round}, batch));
    ++session.applying;
    admitted_.memory = &session.target->memory();
    admitted_.digests = session.target->digests();
    if (batch.round() == 0) {
      admitted_.populate = session.populate;
    } else {
      done_populating = std::move(session.populate);
      done_filling = std::move(session.fill);
    }
  }
  if (done_populating) done_populating->Stop();
  if (done_filling) done_filling->Stop();
  return Status::Ok();
}

Result<proto::BatchAck> StreamIntake::Settle(const proto::PageBatch& batch, const Result<ApplyResult>& applied,
                                             uint64_t wire_bytes) {
  // Inside the applying window, so the target (and its memory) still exists.
  if (admitted_.populate && applied.ok() && applied->normal_pages > 0) {
    admitted_.populate->Ahead(DataEnd(batch), applied->normal_pages << engine::kPageShift);
  }
  {
    std::lock_guard lock(r_.mu_);
    Session& session = *session_;
    --session.applying;
    if (applied.ok()) {
      if (admitted_.in_place) session.in_place_bytes += applied->normal_pages << engine::kPageShift;
      StreamState& ss = session.per_stream[index_];
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
  admitted_ = Admitted{};
  if (!applied.ok()) return applied.status().WithContext("stream " + std::to_string(index_));
  FailPoint("receiver.batch");
  proto::BatchAck ack;
  ack.set_sequence(batch.sequence());
  ack.set_pages(static_cast<uint32_t>(applied->normal_pages + applied->zero_pages));
  return ack;
}

Result<proto::BatchAck> StreamIntake::Handle(const proto::PageBatch& batch, Chunks payload, uint64_t wire_bytes) {
  PMLMIG_RETURN_IF_ERROR(Admit(batch));
  return Settle(batch, applier_.Apply(batch, payload, *admitted_.memory, admitted_.digests, &files_), wire_bytes);
}

Result<bool> StreamIntake::BeginInPlace(const proto::PageBatch& batch, uint64_t payload_len) {
  PMLMIG_RETURN_IF_ERROR(Admit(batch));
  if (r_.options().read_in_place && applier_.PlanInPlace(batch, payload_len, *admitted_.memory, &files_, &in_place_dest_)) {
    in_place_hash_.emplace(applier_.checksum());
    admitted_.in_place = true;
    return true;
  }
  AbandonInPlace();  // read into a buffer and Handle it, which admits it again
  return false;
}

Result<proto::BatchAck> StreamIntake::FinishInPlace(const proto::PageBatch& batch, uint64_t wire_bytes) {
  return Settle(batch, applier_.FinishInPlace(batch, *in_place_hash_, *admitted_.memory, admitted_.digests, &files_),
                wire_bytes);
}

void StreamIntake::AbandonInPlace() {
  admitted_ = Admitted{};
  std::lock_guard lock(r_.mu_);
  --session_->applying;
  r_.cv_.notify_all();
}

// Detaching the stream and failing the session happen under one hold of
// Receiver::mu_, so the control thread never sees the stream gone and the
// session not yet failed (it would report the control stream instead of the stream).
Status StreamIntake::Refuse(const Status& s) {
  std::lock_guard lock(r_.mu_);
  if (attached_ && session_->per_stream[index_].call == self_) session_->per_stream[index_].call = nullptr;
  attached_ = false;
  if (session_) r_.MarkFailedLocked(*session_, s, self_);
  return s;
}

void StreamIntake::Broke(const Status& broke) {
  std::lock_guard lock(r_.mu_);
  if (!attached_ || session_->per_stream[index_].call != self_) return;
  session_->per_stream[index_].call = nullptr;
  // A data stream of a migration in progress broke: the migration cannot
  // complete (MarkFailedLocked does nothing once it is finalizing or over).
  r_.MarkFailedLocked(*session_, r_.FirstCause(*session_, broke), self_);
  r_.cv_.notify_all();
}

void StreamIntake::Done() {
  std::lock_guard lock(r_.mu_);
  if (attached_ && session_->per_stream[index_].call == self_) {
    session_->per_stream[index_].call = nullptr;
    r_.cv_.notify_all();  // the control thread may wait for the streams to report
  }
}

}  // namespace pmlmig::transport
