#include "receiver.h"

#include <grpc/grpc.h>

#include "grpc_status.h"
#include "direct_receiver.h"
#include "populate_ahead.h"
#include "uffd_fill.h"
#include "pmlmig/base/units.h"

namespace pmlmig::transport {
namespace {

// Compares secrets without an early exit (no timing hint of where they differ).
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

}  // namespace

void CancelCall(grpc::ServerContextBase* ctx, const Status& why) {
  const grpc::Status st = ToGrpc(why.ok() ? Aborted("the receiver ended the call") : why);
  grpc_call_cancel_with_status(ctx->c_call(), static_cast<grpc_status_code>(st.error_code()),
                               st.error_message().c_str(), nullptr);
}

Receiver::Receiver(MigrationServer::TargetFactory factory, MigrationServerOptions options)
    : factory_(std::move(factory)),
      options_(std::move(options)),
      limits_{options_.max_memory_bytes, options_.max_vcpus, options_.max_streams} {}

bool Receiver::MarkFailedLocked(Session& session, const Status& why, const DataCall* self) {
  if (session.state != SessionState::kWaitSetup && session.state != SessionState::kReceiving &&
      session.state != SessionState::kPrepared && session.state != SessionState::kPostcopy) {
    return false;
  }
  session.state = SessionState::kFailing;
  session.failure = why;
  EndStreams(session, why, self);
  CancelCall(session.control_ctx, why);
  cv_.notify_all();
  return true;
}

bool Receiver::PausePostcopyLocked(Session& session, uint32_t link, const Status& why) {
  if (session.state != SessionState::kPostcopy || session.postcopy_paused || session.postcopy_link != link) {
    return false;
  }
  if (options_.postcopy_recovery_timeout.count() == 0) return MarkFailedLocked(session, why, nullptr);
  session.postcopy_paused = true;
  session.paused_at = Clock::now();
  session.pause_reason = why;
  session.requests.clear();  // asked again on the resumed link (PostcopyMemory::Waiting)
  const Status reason(why.code() == Code::kOk ? Code::kUnavailable : why.code(),
                      "the receiver ended the post-copy link, waiting for the source to resume: " + why.message());
  for (grpc::ServerContextBase* ctx : session.postcopy_calls) CancelCall(ctx, reason);
  CancelCall(session.control_ctx, reason);
  cv_.notify_all();
  return true;
}

Status Receiver::FirstCause(const Session& session, const Status& consequence) {
  if (session.refused_call.ok()) return consequence;
  return Status(session.refused_call.code(), session.refused_call.message() + "; then " + consequence.message());
}

Status Receiver::CheckDeadline(const Session& session, Clock::time_point now) const {
  switch (session.state) {
    case SessionState::kWaitSetup:
      if (now - session.opened > options_.handshake_timeout) {
        return Unavailable("no valid Setup within " + Ms(options_.handshake_timeout) + " of connecting");
      }
      break;
    case SessionState::kReceiving:
      if (options_.idle_timeout.count() > 0 && now - session.last_activity > options_.idle_timeout) {
        return Unavailable("no page batch and no control message for " + Ms(options_.idle_timeout) +
                           " while receiving (the source stalled)");
      }
      break;
    case SessionState::kPrepared:
      if (now - session.prepared_at > options_.commit_timeout) {
        return Unavailable("no Commit within " + Ms(options_.commit_timeout) +
                           " of the prepared reply; the VM was never resumed here");
      }
      break;
    default: break;
  }
  if (options_.max_duration.count() > 0 && now - session.opened > options_.max_duration &&
      (session.state == SessionState::kWaitSetup || session.state == SessionState::kReceiving)) {
    return Unavailable("the migration took longer than " + Ms(options_.max_duration));
  }
  return Status::Ok();
}

Status Receiver::Authorize(const grpc::ServerContextBase& ctx) const {
  if (options_.security.token.empty()) return Status::Ok();
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return PermissionDenied("this receiver requires a token; the sender sent none");
  const std::string_view got(it->second.data(), it->second.size());
  const std::string want = "Bearer " + options_.security.token;
  if (!ConstantTimeEquals(got, want)) return PermissionDenied("the sender's token does not match this receiver's");
  return Status::Ok();
}

void Receiver::EndSession(const std::shared_ptr<Session>& session, engine::Outcome status, const Status& error,
                          engine::FinalReply reply) {
  std::unique_ptr<engine::MigrationTarget> target;
  std::shared_ptr<DirectStreams> direct;
  std::shared_ptr<PopulateAhead> populate;
  std::shared_ptr<UffdFill> fill;
  ReceivedMigration out;
  {
    std::unique_lock lock(mu_);
    if (session->state == SessionState::kEnded) return;
    session->state = SessionState::kEnded;  // no batch is admitted from here on
    EndStreams(*session, status == engine::Outcome::kCompleted ? Aborted("the migration is over") : error, nullptr);
    cv_.wait(lock, [&] { return session->applying == 0; });
    direct = std::move(session->direct);  // joined below, outside the lock its threads take
    out.direct_data = direct != nullptr;
    populate = std::move(session->populate);
    fill = std::move(session->fill);
    session->postcopy = nullptr;  // the target owns it and goes below
    target = std::move(session->target);
    out.totals = session->totals;
    if (session->fill_counts) {
      out.uffd_filled_bytes = session->fill_counts->placed_bytes();
      out.uffd_zero_faults = session->fill_counts->zero_faults();
    }
    out.in_place_bytes = session->in_place_bytes;
    out.rounds = session->rounds;
    out.postcopy = session->postcopy_used;
    out.postcopy_recoveries = session->postcopy_recoveries;
  }
  if (direct) direct->Close();
  if (populate) populate->Stop();  // before the target (whose memory it populates) goes
  if (fill) fill->Stop();          // likewise (it has the memory registered)
  out.outcome = status;
  out.error = error;
  out.session_id = session->id;
  out.reply = std::move(reply);
  if (status == engine::Outcome::kCompleted) {
    out.vm = target->TakeVm();
    out.target = std::move(target);
  } else if (target) {
    target->OnAbort(error.message());
    target.reset();
  }
  std::lock_guard lock(mu_);
  if (current_ == session) current_.reset();
  ended_[session->id] = Ended{status == engine::Outcome::kCompleted, error};
  outcomes_.push_back(std::move(out));
  cv_.notify_all();
}

void Receiver::AdoptDirect(UniqueFd fd, const direct::Hello& hello) {
  std::shared_ptr<DirectStreams> streams;
  {
    std::lock_guard lock(mu_);
    if (current_ && current_->id == hello.session_id) streams = current_->direct;
  }
  if (!streams) {
    return RefuseDirect(std::move(fd), InvalidArgument("direct stream: session " + FormatHex(hello.session_id) +
                                                       " is not a migration in progress here that asked for "
                                                       "direct streams"));
  }
  streams->Adopt(std::move(fd), hello);
}

void Receiver::EndStreams(Session& session, const Status& why, const DataCall* self) {
  const Status reason(why.code() == Code::kOk ? Code::kAborted : why.code(),
                      "the receiver ended the migration: " + why.message());
  for (StreamState& ss : session.per_stream) {
    if (ss.call != nullptr && ss.call != self) ss.call->Abandon(reason);
  }
  for (grpc::ServerContextBase* ctx : session.postcopy_calls) CancelCall(ctx, reason);
}

Result<ReceivedMigration> Receiver::WaitForMigration(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  cv_.wait_until(lock, deadline, [&] { return !outcomes_.empty() || shutting_down_; });
  if (!outcomes_.empty()) {
    ReceivedMigration o = std::move(outcomes_.front());
    outcomes_.pop_front();
    return o;
  }
  if (shutting_down_) return Unavailable("the receiver shut down before a migration ended");
  return Aborted("no migration ended before the deadline");
}

void Receiver::RefuseNewMigrations(std::string why) {
  std::lock_guard lock(mu_);
  refuse_new_ = why.empty() ? "it refuses new migrations" : std::move(why);
}

grpc::Status Receiver::Resolve(uint64_t id, proto::ResolveReply* reply) {
  std::unique_lock lock(mu_);
  if (current_ && current_->id == id) {
    Session& s = *current_;
    // Not yet decided: decide "discarded" now, before any Commit can run.
    if (MarkFailedLocked(s, Aborted("the source resolved the switch-over as not committed"), nullptr)) {
      reply->set_outcome(proto::ResolveReply::DISCARDED);
      reply->set_detail("session " + FormatHex(id) + " was not committed; it is discarded and will never run here");
      return grpc::Status::OK;
    }
    // Restoring the state or committing right now: wait for the end.
    cv_.wait_for(lock, options_.final_drain_timeout + options_.commit_timeout,
                 [&] { return ended_.count(id) != 0 || shutting_down_; });
  }
  auto it = ended_.find(id);
  if (it == ended_.end()) {
    if (current_ && current_->id == id) {
      return ToGrpc(Unavailable("session " + FormatHex(id) + " is still being decided"));
    }
    reply->set_outcome(proto::ResolveReply::UNKNOWN);
    reply->set_detail("this receiver has no session " + FormatHex(id));
    return grpc::Status::OK;
  }
  reply->set_outcome(it->second.committed ? proto::ResolveReply::COMMITTED : proto::ResolveReply::DISCARDED);
  reply->set_detail(it->second.committed ? "session " + FormatHex(id) + " was committed: the VM runs here"
                               : "session " + FormatHex(id) + " failed here; the VM never ran here");
  return grpc::Status::OK;
}

bool Receiver::BeginShutdown() {
  std::lock_guard lock(mu_);
  if (shutting_down_) return false;
  shutting_down_ = true;
  if (current_) {
    EndStreams(*current_, Unavailable("the receiver is shutting down"), nullptr);
    CancelCall(current_->control_ctx, Unavailable("the receiver is shutting down"));
  }
  cv_.notify_all();
  return true;
}

void Receiver::NotifyAll() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

}  // namespace pmlmig::transport
