// MigrationServer: the receiver of protocol version 2 (proto/migration.proto,
// whose header describes the state machine, the limits and the rejections).
//
// Threads:
//   - the Control call is served by gRPC's synchronous API (one thread per
//     call), over raw bytes that ControlStream parses (so a message that is
//     not a ControlRequest is refused by name rather than taken for the end
//     of the stream); that thread runs the state machine and is the only one
//     that calls the target (factory, OnSetup, OnFinal, OnCommit, OnAbort)
//     and ends a session; a watchdog thread per call enforces the deadline
//     of the phase the session is in (by cancelling the call with the
//     reason, which is what the source then reads);
//   - Resolve (synchronous, any thread) decides a PREPARED session as
//     discarded under mu_, so it and a late Commit never both win;
//   - each Pages call is a callback-API reactor over raw ByteBuffers, so a
//     batch's payload is read straight out of the received slices into
//     guest memory (no protobuf parse copy). Its OnReadDone checks and
//     applies the batch and queues the ack (one write in flight at a time).
//     When one refuses a batch it marks the session failed and cancels the
//     control call with the same reason, whose thread then discards the
//     target.
// Guest memory is written only while the session is RECEIVING, and only
// between `applying` being raised and lowered under mu_; a session leaves
// RECEIVING (for Final or a failure) under mu_ and then waits for applying
// to drop to zero before the target is finalised or discarded. So no batch
// is ever written into a VM that is being torn down.
#include "pmlmig/transport/grpc_server.h"

#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "batch_codec.h"
#include "receiver_checks.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "pmlmig/base/watchdog.h"
#include "grpc_status.h"

namespace pmlmig::transport {
namespace {

using Clock = std::chrono::steady_clock;

const char* RequestName(const proto::ControlRequest& r) {
  switch (r.msg_case()) {
    case proto::ControlRequest::kHello: return "Hello";
    case proto::ControlRequest::kSetup: return "Setup";
    case proto::ControlRequest::kFinal: return "Final";
    case proto::ControlRequest::kAbort: return "Abort";
    case proto::ControlRequest::kCommit: return "Commit";
    case proto::ControlRequest::MSG_NOT_SET: break;
  }
  return "an empty message";
}

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

std::string Ms(std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; }

// How long the control thread, finding the control stream gone while pages
// are being received, waits for the attached Pages calls to report first. A
// source that loses a data stream drops its control call, and the receiver
// may notice that before the broken stream's callback runs; waiting lets
// the report name the stream (the cause) rather than the control call (the
// consequence). Calls that are cancelled report within milliseconds; only a
// source that keeps its data streams open after leaving waits this long.
constexpr std::chrono::milliseconds kStreamReportGrace{1000};

// Ends a call now with `why` as the status its peer reads. TryCancel would
// send only CANCELLED "Cancelled on the server side", and once a call is
// cancelled the handler's own status is never sent. Thread-safe, as
// TryCancel is.
void CancelCall(grpc::ServerContextBase* ctx, const Status& why) {
  const grpc::Status st = ToGrpc(why.ok() ? Aborted("the receiver ended the call") : why);
  grpc_call_cancel_with_status(ctx->c_call(), static_cast<grpc_status_code>(st.error_code()),
                               st.error_message().c_str(), nullptr);
}

// The receiver's side of the Control call, over raw bytes: gRPC's typed
// reader returns false both at the end of the stream and for bytes that do
// not parse, and the second must be refused by name (as the Pages streams
// do), not taken for a source that left.
class ControlStream {
 public:
  explicit ControlStream(grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* call) : call_(call) {}

  // The next request (true), the end of the stream (false: the source
  // half-closed or left, or the call was cancelled), or why the message
  // that arrived is not a ControlRequest.
  Result<bool> Read(proto::ControlRequest* req) {
    grpc::ByteBuffer buf;
    if (!call_->Read(&buf)) return false;
    const size_t bytes = buf.Length();
    if (!grpc::SerializationTraits<proto::ControlRequest>::Deserialize(&buf, req).ok()) {
      return InvalidArgument("malformed ControlRequest: " + std::to_string(bytes) +
                             " bytes that are not a valid protobuf message");
    }
    return true;
  }
  bool Write(const proto::ControlReply& reply) {
    grpc::ByteBuffer buf;
    bool own = false;
    if (!grpc::SerializationTraits<proto::ControlReply>::Serialize(reply, &buf, &own).ok()) return false;
    return call_->Write(buf);
  }

 private:
  grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* const call_;
};

// Memory the host can give a new VM now: MemAvailable, else physical memory.
uint64_t HostAvailableBytes() {
  if (const uint64_t available = HostAvailableMemory(); available != 0) return available;
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(size) : 0;
}

}  // namespace


class MigrationServer::Impl final : public proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service> {
 public:
  using Base = proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service>;
  using Base::Pages;    // the synchronous overload stays disabled
  using Base::Control;  // never called: method 0 (Control) gets the raw handler below
  Impl(TargetFactory factory, MigrationServerOptions options)
      : factory_(std::move(factory)), options_(std::move(options)) {
    limits_ = {options_.max_memory_bytes, options_.max_vcpus, options_.max_streams};
    // Control as a synchronous call of ByteBuffers: the handler the
    // generated code would install, but without its protobuf parse.
    using RawStream = grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;
    MarkMethodStreamed(0, new grpc::internal::TemplatedBidiStreamingHandler<RawStream, false>(
                              [this](grpc::ServerContext* ctx, RawStream* raw) {
                                ControlStream stream(raw);
                                return Control(ctx, &stream);
                              }));
  }

  grpc::Status Control(grpc::ServerContext* ctx, ControlStream* stream);
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Pages(grpc::CallbackServerContext* ctx) override;
  grpc::Status Resolve(grpc::ServerContext* ctx, const proto::ResolveRequest* req, proto::ResolveReply* reply) override;

  Result<ReceivedMigration> WaitForMigration(Clock::time_point deadline);
  void RefuseNewMigrations(std::string why);
  void Shutdown();

  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

 private:
  enum class State { kWaitSetup, kReceiving, kFinalizing, kPrepared, kCommitting, kFailing, kEnded };
  class PagesReactor;

  struct StreamState {
    bool attached = false;
    PagesReactor* reactor = nullptr;  // the call attached to it, while it is open
    uint64_t next_sequence = 0;
    uint32_t last_round = 0;
    uint64_t pages = 0;
  };

  struct Session {
    uint64_t id = 0;
    grpc::ServerContextBase* control_ctx = nullptr;
    // Everything below is guarded by Impl::mu_.
    State state = State::kWaitSetup;
    Status failure;  // why another thread failed the session (Pages, Resolve, watchdog)
    // The first Pages call refused, while this session was current, at a
    // first message that did not decode (so it never named a session, and
    // could be anyone's): not a failure by itself, but the cause to report
    // if the source then leaves.
    Status refused_call;
    Clock::time_point opened = Clock::now();
    Clock::time_point last_activity = Clock::now();  // last batch applied or control message
    Clock::time_point prepared_at{};
    std::unique_ptr<engine::MigrationTarget> target;
    uint32_t streams = 0;
    Checksum checksum = Checksum::kXxh64;  // of every batch, from Setup
    std::vector<StreamState> per_stream;
    int applying = 0;  // Pages threads writing into target memory right now
    engine::TransferStats totals;
    uint32_t rounds = 0;
  };

  // Under mu_, another thread than Control's (a Pages call, Resolve, the
  // watchdog) fails the session: ends its Pages calls but `self` with `why`
  // and cancels the control call with `why` (what the source reads), whose
  // thread then ends the session. Only while it waits for Setup, receives,
  // or is prepared (never once Final is being restored or Commit is
  // running); returns whether it did.
  bool MarkFailedLocked(Session& session, const Status& why, const PagesReactor* self);
  // The deadline of the phase `session` is in, if it has passed: why.
  Status CheckDeadline(const Session& session, Clock::time_point now) const;
  // Under mu_: what to report when the session fails by `consequence` (its
  // source left or a call broke): the refused call before it, if any.
  static Status FirstCause(const Session& session, const Status& consequence);
  // A call's credentials (the shared secret, when one is configured).
  Status Authorize(const grpc::ServerContextBase& ctx) const;
  // Control thread: ends the session (once): stops and waits for the Pages
  // threads, discards the target unless completed, records the outcome, and
  // frees the receiver for the next migration.
  void EndSession(const std::shared_ptr<Session>& session, engine::Outcome status, const Status& error,
                  engine::FinalReply reply = {});
  // Pages thread, under mu_: may this batch be applied now?
  Status Admit(const std::shared_ptr<Session>& session, uint32_t index, const proto::PageBatch& b) const;

  // What one Pages call knows. Written only by its reactor's OnReadDone,
  // under mu_ where other threads read it.
  struct PagesState {
    std::shared_ptr<Session> session;  // set by the first batch naming the current session
    uint32_t index = 0;
    bool attached = false;             // per_stream[index].reactor is this call
    proto::PageBatch header;           // reused
    ChunkList payload;
    BatchApplier applier;
    SlotFiles files;  // of the session's target memory, once attached
  };
  // Decodes, checks and applies one received batch; returns its ack.
  Result<proto::BatchAck> HandleBatch(PagesState& st, Chunks wire, PagesReactor* self);
  // Refuses a batch: the call leaves the session (so the session's teardown
  // does not cancel it and it ends with `s`), and the migration fails.
  grpc::Status Refuse(PagesState& st, const Status& s, PagesReactor* self);
  // The Pages call was cancelled or broke (OnCancel), or is over (OnDone).
  void PagesCancelled(PagesState& st, PagesReactor* self);
  void PagesDone(PagesState& st, PagesReactor* self);
  // Under mu_: ends every open Pages call of the session but `self` with
  // `why` (the sender learns the receiver's reason, not just "cancelled").
  void EndStreams(Session& session, const Status& why, const PagesReactor* self);

  const TargetFactory factory_;
  MigrationServerOptions options_;
  ReceiverLimits limits_;
  std::mt19937_64 rng_{std::random_device{}()};  // guarded by mu_

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Session> current_;      // guarded by mu_: the one migration in progress
  std::deque<ReceivedMigration> outcomes_; // guarded by mu_
  std::map<uint64_t, bool> ended_;        // guarded by mu_: session id -> committed, for Resolve
  std::string refuse_new_;                // guarded by mu_: why new migrations are refused, if they are
  bool shutting_down_ = false;            // guarded by mu_
};

// ------------------------------------------------------------- sessions

bool MigrationServer::Impl::MarkFailedLocked(Session& session, const Status& why, const PagesReactor* self) {
  if (session.state != State::kWaitSetup && session.state != State::kReceiving && session.state != State::kPrepared) {
    return false;
  }
  session.state = State::kFailing;
  session.failure = why;
  EndStreams(session, why, self);
  CancelCall(session.control_ctx, why);
  cv_.notify_all();
  return true;
}

Status MigrationServer::Impl::FirstCause(const Session& session, const Status& consequence) {
  if (session.refused_call.ok()) return consequence;
  return Status(session.refused_call.code(), session.refused_call.message() + "; then " + consequence.message());
}

Status MigrationServer::Impl::CheckDeadline(const Session& session, Clock::time_point now) const {
  switch (session.state) {
    case State::kWaitSetup:
      if (now - session.opened > options_.handshake_timeout) {
        return Unavailable("no valid Setup within " + Ms(options_.handshake_timeout) + " of connecting");
      }
      break;
    case State::kReceiving:
      if (options_.idle_timeout.count() > 0 && now - session.last_activity > options_.idle_timeout) {
        return Unavailable("no page batch and no control message for " + Ms(options_.idle_timeout) +
                           " while receiving (the source stalled)");
      }
      break;
    case State::kPrepared:
      if (now - session.prepared_at > options_.commit_timeout) {
        return Unavailable("no Commit within " + Ms(options_.commit_timeout) +
                           " of the prepared reply; the VM was never resumed here");
      }
      break;
    default: break;
  }
  if (options_.max_duration.count() > 0 && now - session.opened > options_.max_duration &&
      (session.state == State::kWaitSetup || session.state == State::kReceiving)) {
    return Unavailable("the migration took longer than " + Ms(options_.max_duration));
  }
  return Status::Ok();
}

Status MigrationServer::Impl::Authorize(const grpc::ServerContextBase& ctx) const {
  if (options_.security.token.empty()) return Status::Ok();
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return PermissionDenied("this receiver requires a token; the sender sent none");
  const std::string_view got(it->second.data(), it->second.size());
  const std::string want = "Bearer " + options_.security.token;
  if (!ConstantTimeEquals(got, want)) return PermissionDenied("the sender's token does not match this receiver's");
  return Status::Ok();
}

void MigrationServer::Impl::EndSession(const std::shared_ptr<Session>& session, engine::Outcome status,
                                       const Status& error, engine::FinalReply reply) {
  std::unique_ptr<engine::MigrationTarget> target;
  ReceivedMigration out;
  {
    std::unique_lock lock(mu_);
    if (session->state == State::kEnded) return;
    session->state = State::kEnded;  // no batch is admitted from here on
    EndStreams(*session, status == engine::Outcome::kCompleted ? Aborted("the migration is over") : error, nullptr);
    cv_.wait(lock, [&] { return session->applying == 0; });
    target = std::move(session->target);
    out.totals = session->totals;
    out.rounds = session->rounds;
  }
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
  ended_[session->id] = status == engine::Outcome::kCompleted;
  outcomes_.push_back(std::move(out));
  cv_.notify_all();
}

// ------------------------------------------------------------- Control

grpc::Status MigrationServer::Impl::Control(grpc::ServerContext* ctx, ControlStream* stream) {
  if (Status a = Authorize(*ctx); !a.ok()) return ToGrpc(a);
  std::shared_ptr<Session> session;
  bool done = false;
  proto::ControlRequest req;
  proto::ControlReply reply;
  engine::FinalReply prepared;  // what OnFinal answered, completed by the commit

  // Every phase has a deadline. Before Hello there is no session yet: the
  // handshake deadline counts from the call's start.
  const Clock::time_point call_start = Clock::now();
  std::mutex session_mu;  // guards `watched`, the session the watchdog checks
  std::shared_ptr<Session> watched;
  bool handshake_expired = false;  // guarded by session_mu
  Watchdog watchdog(std::chrono::milliseconds(100), [&]() -> bool {
    std::shared_ptr<Session> w;
    {
      std::lock_guard lock(session_mu);
      w = watched;
      if (!w) {
        if (Clock::now() - call_start <= options_.handshake_timeout) return false;
        handshake_expired = true;
        CancelCall(ctx, Unavailable("no Hello within " + Ms(options_.handshake_timeout) + " of connecting"));
        return true;
      }
    }
    std::lock_guard lock(mu_);
    Status late = CheckDeadline(*w, Clock::now());
    return !late.ok() && MarkFailedLocked(*w, late, nullptr);
  });

  // Ends the session as failed (discarding the target) and the call with
  // the same error.
  auto fail = [&](const Status& s) -> grpc::Status {
    if (session) EndSession(session, engine::Outcome::kFailed, s);
    return ToGrpc(s);
  };

  for (;;) {
    Result<bool> more = stream->Read(&req);
    if (!more.ok()) return fail(more.status());
    if (!*more) break;
    if (done) return ToGrpc(InvalidArgument(std::string(RequestName(req)) + " after Commit: the migration is over"));
    if (session) {
      std::lock_guard lock(mu_);
      session->last_activity = Clock::now();
    }

    if (req.has_abort()) {
      const Status why = Aborted("source aborted the migration: " + req.abort().reason());
      if (session) EndSession(session, engine::Outcome::kCancelled, why);
      return ToGrpc(why);
    }

    if (!session) {  // WAIT_HELLO
      if (!req.has_hello()) return ToGrpc(InvalidArgument(std::string("expected Hello first, got ") + RequestName(req)));
      if (req.hello().version() != kProtocolVersion) {
        return ToGrpc(InvalidArgument("Hello: protocol version " + std::to_string(req.hello().version()) +
                                      " is not supported (this receiver speaks version " +
                                      std::to_string(kProtocolVersion) + ")"));
      }
      {
        std::lock_guard lock(mu_);
        if (shutting_down_) return ToGrpc(Unavailable("receiver is shutting down"));
        if (!refuse_new_.empty()) return ToGrpc(Unavailable("this receiver takes no more migrations: " + refuse_new_));
        if (current_) {
          return ToGrpc(ResourceExhausted("another migration (session " + FormatHex(current_->id) +
                                          ") is in progress; this receiver serves one at a time"));
        }
        session = std::make_shared<Session>();
        do {
          session->id = rng_();
        } while (session->id == 0 || ended_.count(session->id) != 0);
        session->control_ctx = ctx;
        session->opened = call_start;
        current_ = session;
      }
      {
        std::lock_guard lock(session_mu);
        watched = session;
      }
      FailPoint("receiver.hello");
      reply.Clear();
      proto::HelloReply* h = reply.mutable_hello();
      h->set_version(kProtocolVersion);
      h->set_session_id(session->id);
      h->set_receiver(options_.receiver_name);
      h->set_max_batch_pages(kMaxBatchPages);
      h->set_max_streams(std::min(options_.max_streams, kMaxStreams));
      h->add_checksums(proto::BATCH_CHECKSUM_XXH3);
      if (!stream->Write(reply)) break;
      continue;
    }

    State state;
    {
      std::lock_guard lock(mu_);
      state = session->state;
    }
    if (state == State::kWaitSetup) {
      if (!req.has_setup()) return fail(InvalidArgument(std::string("expected Setup, got ") + RequestName(req)));
      const proto::Setup& ps = req.setup();
      ReceiverLimits limits = limits_;
      if (limits.max_memory_bytes == 0) limits.max_memory_bytes = HostAvailableBytes();
      if (Status v = ValidateSetup(ps, limits); !v.ok()) return fail(v);
      FailPoint("receiver.setup");
      engine::MigrationSetup setup;
      setup.vm_description = ps.vm_description();
      for (const proto::MemoryRange& r : ps.memory()) setup.memory.push_back({r.slot(), r.gpa(), r.size()});
      setup.vcpus = ps.vcpus();
      setup.verify = ps.verify();
      setup.verify_order = ps.verify_order() == proto::VERIFY_AFTER_COMMIT ? engine::VerifyOrder::kAfterCommit
                                                                          : engine::VerifyOrder::kBeforeCommit;
      std::unique_ptr<engine::MigrationTarget> target = factory_ ? factory_() : nullptr;
      if (!target) return fail(Internal("receiver could not create a migration target"));
      Status s = target->OnSetup(setup);
      if (s.ok()) {
        // Every range the source will send must be writable in the target.
        for (const engine::MemoryRange& r : setup.memory) {
          if (target->memory().HostAddress(r.gpa, r.size) == nullptr) {
            s = Internal("target built no memory for gpa " + FormatHex(r.gpa) + " (" + FormatBytes(r.size) + ")");
            break;
          }
        }
      }
      if (!s.ok()) {
        target->OnAbort(s.message());
        return fail(s.WithContext("target refused the setup"));
      }
      std::string failed_meanwhile;  // the session failed during OnSetup (a Pages call, a deadline)
      {
        std::lock_guard lock(mu_);
        if (session->state == State::kWaitSetup) {
          session->target = std::move(target);
          session->streams = ps.streams();
          session->checksum = ps.checksum() == proto::BATCH_CHECKSUM_XXH3 ? Checksum::kXxh3 : Checksum::kXxh64;
          session->per_stream.assign(ps.streams(), StreamState{});
          session->state = State::kReceiving;
          session->last_activity = Clock::now();
        } else {
          failed_meanwhile = session->failure.message();
        }
      }
      if (target) {
        target->OnAbort(failed_meanwhile);
        break;  // ends the session below with the recorded failure
      }
      reply.Clear();
      uint64_t bytes = 0;
      for (const proto::MemoryRange& r : ps.memory()) bytes += r.size();
      reply.mutable_setup()->set_memory_bytes(bytes);
      if (!stream->Write(reply)) break;
      continue;
    }

    if (state == State::kReceiving) {
      if (!req.has_final()) return fail(InvalidArgument(std::string("expected Final, got ") + RequestName(req)));
      const proto::Final& f = req.final();
      if (Status v = ValidateFinalShape(f, session->streams); !v.ok()) return fail(v);
      FailPoint("receiver.final");
      engine::MigrationTarget* target = nullptr;
      {
        std::unique_lock lock(mu_);
        // Every batch the source declares must have been applied; wait a
        // bounded time for those still in flight.
        std::string mismatch;
        auto settled = [&] {
          if (session->state != State::kReceiving) return true;
          if (session->applying != 0) return false;
          mismatch.clear();
          for (int i = 0; i < f.streams_size(); ++i) {
            const proto::StreamTotals& t = f.streams(i);
            const StreamState& ss = session->per_stream[i];
            if (t.batches() != ss.next_sequence || t.pages() != ss.pages) {
              mismatch = "stream " + std::to_string(i) + ": source declares " + std::to_string(t.batches()) +
                         " batches (" + std::to_string(t.pages()) + " pages) for stream " +
                         std::to_string(t.stream()) + ", receiver applied " +
                         std::to_string(ss.next_sequence) + " (" + std::to_string(ss.pages) + " pages)";
              return false;
            }
          }
          return true;
        };
        const bool ok = cv_.wait_for(lock, options_.final_drain_timeout, settled);
        if (session->state != State::kReceiving) break;  // failed meanwhile: handled below
        if (!ok) {
          if (mismatch.empty()) mismatch = "batches still being applied";
          const Status s = DataLoss("Final: " + mismatch);
          lock.unlock();
          return fail(s);
        }
        session->state = State::kFinalizing;  // from here no batch is admitted
        target = session->target.get();
      }
      engine::FinalState fs;
      fs.vm_state.assign(f.vm_state().begin(), f.vm_state().end());
      fs.has_digest = f.has_digest();
      fs.memory_digest = f.memory_digest();
      fs.chunk_digests.assign(f.chunk_digests().begin(), f.chunk_digests().end());
      fs.chunk_bytes = f.chunk_bytes();
      fs.source_paused_ms = f.source_paused_ms();
      Result<engine::FinalReply> r = target->OnFinal(fs);
      if (!r.ok()) return fail(r.status().WithContext("target refused the final state"));
      prepared = std::move(r).value();
      {
        std::lock_guard lock(mu_);
        session->state = State::kPrepared;
        session->prepared_at = Clock::now();
      }
      reply.Clear();
      proto::FinalReply* fr = reply.mutable_final();
      fr->set_prepared(true);
      fr->set_verified(prepared.verified);
      fr->set_verify_detail(prepared.verify_detail);
      fr->set_target_restore_ms(prepared.target_restore_ms);
      fr->set_source_paused_ms(prepared.source_paused_ms);
      *fr->mutable_chunk_digests() = {prepared.chunk_digests.begin(), prepared.chunk_digests.end()};
      fr->set_chunk_bytes(prepared.chunk_bytes);
      if (!stream->Write(reply)) break;  // the source never learns: it resumes its VM; we discard below
      FailPoint("receiver.prepared");
      continue;
    }

    if (state == State::kPrepared) {
      if (!req.has_commit()) return fail(InvalidArgument(std::string("expected Commit, got ") + RequestName(req)));
      FailPoint("receiver.commit");
      engine::MigrationTarget* target = nullptr;
      {
        std::lock_guard lock(mu_);
        // Resolve or a deadline may have decided first: then it is discarded.
        if (session->state != State::kPrepared) break;
        session->state = State::kCommitting;
        target = session->target.get();
      }
      Result<double> resumed = target->OnCommit();
      if (!resumed.ok()) return fail(resumed.status().WithContext("target could not resume the VM"));
      FailPoint("receiver.resumed");
      prepared.target_resume_ms = *resumed;
      reply.Clear();
      reply.mutable_commit()->set_target_resume_ms(*resumed);
      const bool sent = stream->Write(reply);
      // The VM runs here: this is an outcome the caller must see even if the
      // reply was lost (the source then learns it through Resolve).
      Status note = sent ? Status::Ok()
                         : Unavailable("the commit reply could not be delivered to the source (connection lost); "
                                       "it learns the outcome through Resolve");
      EndSession(session, engine::Outcome::kCompleted, note, prepared);
      FailPoint("receiver.committed");
      done = true;
      continue;
    }
    // kFailing (another thread failed the session) or later.
    break;
  }

  // The call ended: a clean half-close after Commit, or the source went
  // away, or we were cancelled (the session failed elsewhere, a deadline
  // passed, or the server is shutting down).
  if (!session || done) {
    std::lock_guard lock(session_mu);
    if (!session && handshake_expired) {
      return ToGrpc(Unavailable("no Hello within " + Ms(options_.handshake_timeout) + " of connecting"));
    }
    return grpc::Status::OK;
  }
  Status why;
  {
    std::unique_lock lock(mu_);
    if (session->state == State::kReceiving && !shutting_down_) {
      // Did a data stream break first? (See kStreamReportGrace.)
      cv_.wait_for(lock, kStreamReportGrace, [&] {
        if (session->state != State::kReceiving || shutting_down_) return true;
        return std::none_of(session->per_stream.begin(), session->per_stream.end(),
                            [](const StreamState& ss) { return ss.reactor != nullptr; });
      });
    }
    if (session->state == State::kFailing) {
      why = session->failure;
    } else if (shutting_down_) {
      why = Aborted("the receiver is shutting down");
    } else if (session->state == State::kPrepared) {
      why = Unavailable("the control stream closed after the prepared reply, before Commit (source gone or "
                        "connection lost); the VM never ran here");
    }
  }
  if (why.ok()) {
    std::lock_guard lock(mu_);
    why = FirstCause(*session,
                     Unavailable("the control stream closed before Final (source gone or connection lost)"));
  }
  EndSession(session, engine::Outcome::kFailed, why);
  return ToGrpc(why);
}

grpc::Status MigrationServer::Impl::Resolve(grpc::ServerContext* ctx, const proto::ResolveRequest* req,
                                            proto::ResolveReply* reply) {
  if (Status a = Authorize(*ctx); !a.ok()) return ToGrpc(a);
  std::unique_lock lock(mu_);
  const uint64_t id = req->session_id();
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
    if (current_ && current_->id == id) return ToGrpc(Unavailable("session " + FormatHex(id) + " is still being decided"));
    reply->set_outcome(proto::ResolveReply::UNKNOWN);
    reply->set_detail("this receiver has no session " + FormatHex(id));
    return grpc::Status::OK;
  }
  reply->set_outcome(it->second ? proto::ResolveReply::COMMITTED : proto::ResolveReply::DISCARDED);
  reply->set_detail(it->second ? "session " + FormatHex(id) + " was committed: the VM runs here"
                               : "session " + FormatHex(id) + " failed here; the VM never ran here");
  return grpc::Status::OK;
}

// ------------------------------------------------------------- Pages

Status MigrationServer::Impl::Admit(const std::shared_ptr<Session>& session, uint32_t index,
                                    const proto::PageBatch& b) const {
  if (session->state != State::kReceiving) {
    return InvalidArgument("stream " + std::to_string(index) + ": batch " + std::to_string(b.sequence()) +
                           ": the migration is not receiving pages (before Setup, or after Final or a failure)");
  }
  const StreamState& ss = session->per_stream[index];
  return AdmitBatch(session->id, index, StreamCursor{ss.next_sequence, ss.last_round}, b);
}

Result<proto::BatchAck> MigrationServer::Impl::HandleBatch(PagesState& st, Chunks wire, PagesReactor* self) {
  proto::PageBatch& batch = st.header;
  {
    Status s = DecodeBatch(wire, &batch, &st.payload);
    if (!s.ok()) {
      s = s.WithContext(st.attached ? "stream " + std::to_string(st.index) : "Pages");
      if (!st.session) {
        // Recorded before the refusal reaches the sender, so before anything
        // it does about it.
        std::lock_guard lock(mu_);
        if (current_ && current_->refused_call.ok() &&
            (current_->state == State::kWaitSetup || current_->state == State::kReceiving)) {
          current_->refused_call = s;
        }
      }
      return s;
    }
  }
  const engine::SlotTable* memory = nullptr;
  engine::PageDigestTable* digests = nullptr;  // verifying: updated after each write
  {
    std::lock_guard lock(mu_);
    if (!st.session) {
      // The first batch attaches this call to the current session.
      const std::string name = "stream " + std::to_string(batch.stream());
      if (!current_ || current_->id != batch.session_id()) {
        return InvalidArgument(name + ": batch names session " + FormatHex(batch.session_id()) +
                               ", which is not the migration in progress");
      }
      st.session = current_;
    }
    Session& session = *st.session;
    if (!st.attached) {
      const std::string name = "stream " + std::to_string(batch.stream());
      if (session.state != State::kReceiving) {
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
      st.files = SlotFiles::Of(*session.target);
      st.applier.set_checksum(session.checksum);
      session.per_stream[st.index].attached = true;
      session.per_stream[st.index].reactor = self;
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
    std::lock_guard lock(mu_);
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
    cv_.notify_all();
  }
  if (!applied.ok()) return applied.status().WithContext("stream " + std::to_string(st.index));
  FailPoint("receiver.batch");
  proto::BatchAck ack;
  ack.set_sequence(batch.sequence());
  ack.set_pages(static_cast<uint32_t>(applied->normal_pages + applied->zero_pages));
  return ack;
}

// Detaching the call and failing the session happen under one hold of mu_,
// so the control thread never sees the stream gone and the session not yet
// failed (it would report the control stream instead of the stream).
grpc::Status MigrationServer::Impl::Refuse(PagesState& st, const Status& s, PagesReactor* self) {
  std::lock_guard lock(mu_);
  if (st.attached && st.session->per_stream[st.index].reactor == self) {
    st.session->per_stream[st.index].reactor = nullptr;
  }
  st.attached = false;
  if (st.session) MarkFailedLocked(*st.session, s, self);
  return ToGrpc(s);
}

void MigrationServer::Impl::PagesCancelled(PagesState& st, PagesReactor* self) {
  std::lock_guard lock(mu_);
  if (!st.attached || st.session->per_stream[st.index].reactor != self) return;
  st.session->per_stream[st.index].reactor = nullptr;
  // A data stream of a migration in progress broke: the migration cannot
  // complete (MarkFailedLocked does nothing once it is finalizing or over).
  // gRPC does not say why; a message over its size limit ends the call the
  // same way (the sender reads "larger than max").
  const Status broke = Unavailable("stream " + std::to_string(st.index) +
                                   " broke (cancelled by the source, connection lost, or a message over the " +
                                   FormatBytes(kMaxMessageBytes) + " limit)");
  MarkFailedLocked(*st.session, FirstCause(*st.session, broke), self);
  cv_.notify_all();
}

void MigrationServer::Impl::PagesDone(PagesState& st, PagesReactor* self) {
  std::lock_guard lock(mu_);
  if (st.attached && st.session->per_stream[st.index].reactor == self) {
    st.session->per_stream[st.index].reactor = nullptr;
    cv_.notify_all();  // the control thread may wait for the streams to report
  }
}

// One Pages call: reads a batch, applies it (in OnReadDone), queues its ack,
// reads the next. At most one ack write in flight; Finish waits for it.
class MigrationServer::Impl::PagesReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // A call that failed authorization ends at once with `denied`.
  PagesReactor(Impl* impl, const Status& denied) : impl_(impl) {
    if (!denied.ok()) {
      Close(ToGrpc(denied));
      return;
    }
    StartRead(&in_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the source half-closed the stream (before Final), or it broke
      Close(grpc::Status::OK);
      return;
    }
    Result<proto::BatchAck> ack = Internal("unreadable message");
    std::vector<grpc::Slice> slices;
    if (in_.Dump(&slices).ok()) {
      chunks_.clear();
      for (const grpc::Slice& sl : slices) chunks_.emplace_back(sl.begin(), sl.size());
      ack = impl_->HandleBatch(state_, chunks_, this);
    }
    chunks_.clear();
    slices.clear();
    in_.Clear();
    if (!ack.ok()) {
      Close(impl_->Refuse(state_, ack.status(), this));
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

  void OnWriteDone(bool ok) override {
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

  void OnCancel() override { impl_->PagesCancelled(state_, this); }

  void OnDone() override {
    impl_->PagesDone(state_, this);
    delete this;
  }

  // Ends the call with `why` (from another thread, under Impl::mu_, while
  // the reactor is attached: it is not deleted before PagesDone detaches it).
  void Abandon(const Status& why) { Close(ToGrpc(why)); }

 private:
  // Finishes the call with `st` once the ack being written (and, for a
  // clean end, those queued) are out.
  void Close(const grpc::Status& st) {
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
  void WriteNextLocked() {
    bool own = false;
    out_.Clear();
    (void)grpc::SerializationTraits<proto::BatchAck>::Serialize(acks_.front(), &out_, &own);
    acks_.pop_front();
    writing_ = true;
    StartWrite(&out_);
  }

  Impl* const impl_;
  PagesState state_;
  grpc::ByteBuffer in_;
  ChunkList chunks_;
  std::mutex mu_;
  std::deque<proto::BatchAck> acks_;  // guarded by mu_
  grpc::ByteBuffer out_;              // guarded by mu_: the ack being written
  bool writing_ = false;              // guarded by mu_
  bool closing_ = false;              // guarded by mu_
  bool finish_pending_ = false;       // guarded by mu_
  grpc::Status finish_status_;        // guarded by mu_
};

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* MigrationServer::Impl::Pages(
    grpc::CallbackServerContext* ctx) {
  return new PagesReactor(this, Authorize(*ctx));
}

void MigrationServer::Impl::EndStreams(Session& session, const Status& why, const PagesReactor* self) {
  const Status reason(why.code() == Code::kOk ? Code::kAborted : why.code(),
                      "the receiver ended the migration: " + why.message());
  for (StreamState& ss : session.per_stream) {
    if (ss.reactor != nullptr && ss.reactor != self) ss.reactor->Abandon(reason);
  }
}

// ------------------------------------------------------------- lifecycle

Result<ReceivedMigration> MigrationServer::Impl::WaitForMigration(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  cv_.wait_until(lock, deadline, [&] { return !outcomes_.empty() || shutting_down_; });
  if (!outcomes_.empty()) {
    ReceivedMigration o = std::move(outcomes_.front());
    outcomes_.pop_front();
    return o;
  }
  if (shutting_down_) return Aborted("the receiver shut down before a migration ended");
  return Aborted("no migration ended before the deadline");
}

void MigrationServer::Impl::RefuseNewMigrations(std::string why) {
  std::lock_guard lock(mu_);
  refuse_new_ = why.empty() ? "it refuses new migrations" : std::move(why);
}

void MigrationServer::Impl::Shutdown() {
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    if (current_) {
      EndStreams(*current_, Unavailable("the receiver is shutting down"), nullptr);
      CancelCall(current_->control_ctx, Unavailable("the receiver is shutting down"));
    }
    cv_.notify_all();
  }
  // Handlers return promptly once cancelled; the deadline cancels whatever
  // else is still open (e.g. a Pages call not yet attached).
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  server_->Wait();
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

// ------------------------------------------------------------- public

Result<std::unique_ptr<MigrationServer>> MigrationServer::Start(const std::string& listen, TargetFactory factory,
                                                                MigrationServerOptions options) {
  if (Result<HostPort> address = ParseHostPort(listen); !address.ok()) {
    return InvalidArgument("listen address " + address.status().message());
  }
  if (!factory) return InvalidArgument("MigrationServer: no target factory");
  if (options.max_streams == 0) return InvalidArgument("MigrationServer: max_streams must be >= 1");
  if (options.max_vcpus == 0) return InvalidArgument("MigrationServer: max_vcpus must be >= 1");
  for (auto d : {options.handshake_timeout, options.commit_timeout, options.final_drain_timeout}) {
    if (d.count() <= 0) return InvalidArgument("MigrationServer: handshake, commit and drain timeouts must be positive");
  }
  PMLMIG_RETURN_IF_ERROR(ValidateTransportSecurity(options.security));
  if (!options.security.authenticated() && !options.allow_insecure && !IsLoopbackListenAddress(listen)) {
    return PermissionDenied("refusing to listen on " + listen +
                            " without authentication: anyone who reaches it could push a VM into this host. Configure "
                            "mutual TLS or a token, or allow an insecure listener on a network you trust");
  }
  TuneMallocForTransfer();
  auto impl = std::make_unique<Impl>(std::move(factory), options);
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (options.security.tls()) {
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_root_certs = options.security.tls_ca_pem;
    ssl.pem_key_cert_pairs.push_back({options.security.tls_key_pem, options.security.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder b;
  b.AddListeningPort(listen, creds, &impl->port_);
  b.RegisterService(impl.get());
  b.SetMaxReceiveMessageSize(kMaxMessageBytes);
  b.SetMaxSendMessageSize(kMaxMessageBytes);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_time.count()));
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(options.keepalive_timeout.count()));
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  SetBulkTransferArgs([&](const char* k, int v) { b.AddChannelArgument(k, v); });
  // Senders ping every few seconds (their keepalive): allow it.
  b.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  impl->server_ = b.BuildAndStart();
  if (!impl->server_ || impl->port_ == 0) {
    return Unavailable("migration receiver: cannot listen on " + listen);
  }
  return std::unique_ptr<MigrationServer>(new MigrationServer(std::move(impl)));
}

MigrationServer::MigrationServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MigrationServer::~MigrationServer() { Shutdown(); }
int MigrationServer::port() const { return impl_->port_; }
Result<ReceivedMigration> MigrationServer::WaitForMigration(std::chrono::steady_clock::time_point deadline) {
  return impl_->WaitForMigration(deadline);
}
void MigrationServer::RefuseNewMigrations(std::string why) { impl_->RefuseNewMigrations(std::move(why)); }
void MigrationServer::Shutdown() { impl_->Shutdown(); }

}  // namespace pmlmig::transport
