// MigrationServer: the receiver of protocol version 1 (proto/migration.proto,
// whose header describes the state machine, the limits and the rejections).
//
// Threads:
//   - the Control call is served by gRPC's synchronous API (one thread per
//     call); that thread runs the state machine and is the only one that
//     calls the target (factory, OnSetup, OnFinal, OnAbort) and ends a
//     session;
//   - each Pages call is a callback-API reactor over raw ByteBuffers, so a
//     batch's payload is read straight out of the received slices into
//     guest memory (no protobuf parse copy). Its OnReadDone checks and
//     applies the batch and queues the ack (one write in flight at a time).
//     When one refuses a batch it marks the session failed and cancels the
//     control call, whose thread then discards the target.
// Guest memory is written only while the session is RECEIVING, and only
// between `applying` being raised and lowered under mu_; a session leaves
// RECEIVING (for Final or a failure) under mu_ and then waits for applying
// to drop to zero before the target is finalised or discarded. So no batch
// is ever written into a VM that is being torn down.
#include "pmlmig/transport/grpc_server.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>

#include "batch_codec.h"
#include "receiver_checks.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/units.h"

namespace pmlmig::transport {
namespace {

using Clock = std::chrono::steady_clock;

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

grpc::Status ToGrpc(const Status& s) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (s.code()) {
    case Code::kOk: return grpc::Status::OK;
    case Code::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case Code::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case Code::kPermissionDenied: code = grpc::StatusCode::PERMISSION_DENIED; break;
    case Code::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case Code::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case Code::kAborted: code = grpc::StatusCode::ABORTED; break;
    case Code::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    case Code::kInternal: code = grpc::StatusCode::INTERNAL; break;
  }
  return grpc::Status(code, s.message());
}

const char* RequestName(const proto::ControlRequest& r) {
  switch (r.msg_case()) {
    case proto::ControlRequest::kHello: return "Hello";
    case proto::ControlRequest::kSetup: return "Setup";
    case proto::ControlRequest::kFinal: return "Final";
    case proto::ControlRequest::kAbort: return "Abort";
    case proto::ControlRequest::MSG_NOT_SET: break;
  }
  return "an empty message";
}

// Calls `fire` once after `timeout` unless disarmed first.
class Alarm {
 public:
  Alarm(std::chrono::milliseconds timeout, std::function<void()> fire)
      : thread_([this, timeout, fire = std::move(fire)] {
          std::unique_lock lock(mu_);
          if (!cv_.wait_for(lock, timeout, [&] { return disarmed_; })) {
            fired_ = true;
            lock.unlock();
            fire();
          }
        }) {}
  ~Alarm() {
    Disarm();
    thread_.join();
  }
  void Disarm() {
    std::lock_guard lock(mu_);
    disarmed_ = true;
    cv_.notify_all();
  }
  bool fired() {
    std::lock_guard lock(mu_);
    return fired_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;  // guarded by mu_
  bool fired_ = false;     // guarded by mu_
  std::thread thread_;     // last: starts after the fields above exist
};

uint64_t HostMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(size) : 0;
}

}  // namespace

std::string_view MigrationStatusName(MigrationStatus s) {
  switch (s) {
    case MigrationStatus::kCompleted: return "completed";
    case MigrationStatus::kFailed: return "failed";
    case MigrationStatus::kAborted: return "aborted";
  }
  return "unknown";
}

class MigrationServer::Impl final : public proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service> {
 public:
  using Base = proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service>;
  using Base::Pages;  // the synchronous overload stays disabled
  Impl(TargetFactory factory, MigrationServerOptions options)
      : factory_(std::move(factory)), options_(std::move(options)) {
    if (options_.max_memory_bytes == 0) options_.max_memory_bytes = HostMemoryBytes();
    limits_ = {options_.max_memory_bytes, options_.max_vcpus, options_.max_streams};
  }

  grpc::Status Control(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<proto::ControlReply, proto::ControlRequest>* stream) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Pages(grpc::CallbackServerContext* ctx) override;

  Result<MigrationOutcome> WaitForMigration(Clock::time_point deadline);
  void Shutdown();

  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

 private:
  enum class State { kWaitSetup, kReceiving, kFinalizing, kFailing, kEnded };
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
    Status failure;  // why a Pages thread failed the session
    std::unique_ptr<engine::MigrationTarget> target;
    uint32_t streams = 0;
    std::vector<StreamState> per_stream;
    int applying = 0;  // Pages threads writing into target memory right now
    engine::TransferStats totals;
    uint32_t rounds = 0;
  };

  // Pages thread: the session is failed; end its other Pages calls with
  // `why` and cancel the control call, whose thread then ends the session.
  // Only while it is still waiting for Setup or receiving.
  void MarkFailed(const std::shared_ptr<Session>& session, const Status& why, const PagesReactor* self);
  // Control thread: ends the session (once): stops and waits for the Pages
  // threads, discards the target unless completed, records the outcome, and
  // frees the receiver for the next migration.
  void EndSession(const std::shared_ptr<Session>& session, MigrationStatus status, const Status& error,
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
  std::deque<MigrationOutcome> outcomes_; // guarded by mu_
  bool shutting_down_ = false;            // guarded by mu_
};

// ------------------------------------------------------------- sessions

void MigrationServer::Impl::MarkFailed(const std::shared_ptr<Session>& session, const Status& why,
                                       const PagesReactor* self) {
  std::lock_guard lock(mu_);
  if (session->state != State::kWaitSetup && session->state != State::kReceiving) return;
  session->state = State::kFailing;
  session->failure = why;
  EndStreams(*session, why, self);
  session->control_ctx->TryCancel();
  cv_.notify_all();
}

void MigrationServer::Impl::EndSession(const std::shared_ptr<Session>& session, MigrationStatus status,
                                       const Status& error, engine::FinalReply reply) {
  std::unique_ptr<engine::MigrationTarget> target;
  MigrationOutcome out;
  {
    std::unique_lock lock(mu_);
    if (session->state == State::kEnded) return;
    session->state = State::kEnded;  // no batch is admitted from here on
    EndStreams(*session, status == MigrationStatus::kCompleted ? Aborted("the migration is over") : error, nullptr);
    cv_.wait(lock, [&] { return session->applying == 0; });
    target = std::move(session->target);
    out.totals = session->totals;
    out.rounds = session->rounds;
  }
  out.status = status;
  out.error = error;
  out.session_id = session->id;
  out.reply = std::move(reply);
  if (status == MigrationStatus::kCompleted) {
    out.target = std::move(target);
  } else if (target) {
    target->OnAbort(error.message());
    target.reset();
  }
  std::lock_guard lock(mu_);
  if (current_ == session) current_.reset();
  outcomes_.push_back(std::move(out));
  cv_.notify_all();
}

// ------------------------------------------------------------- Control

grpc::Status MigrationServer::Impl::Control(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<proto::ControlReply, proto::ControlRequest>* stream) {
  // A peer gets handshake_timeout to reach a valid Setup.
  Alarm handshake(options_.handshake_timeout, [ctx] { ctx->TryCancel(); });
  std::shared_ptr<Session> session;
  bool done = false;
  proto::ControlRequest req;
  proto::ControlReply reply;

  // Ends the session as failed (discarding the target) and the call with
  // the same error.
  auto fail = [&](const Status& s) -> grpc::Status {
    if (session) EndSession(session, MigrationStatus::kFailed, s);
    return ToGrpc(s);
  };

  while (stream->Read(&req)) {
    if (done) return ToGrpc(InvalidArgument(std::string(RequestName(req)) + " after Final: the migration is over"));

    if (req.has_abort()) {
      const Status why = Aborted("source aborted the migration: " + req.abort().reason());
      if (session) EndSession(session, MigrationStatus::kAborted, why);
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
        if (current_) {
          return ToGrpc(ResourceExhausted("another migration (session " + Hex(current_->id) +
                                          ") is in progress; this receiver serves one at a time"));
        }
        session = std::make_shared<Session>();
        do {
          session->id = rng_();
        } while (session->id == 0);
        session->control_ctx = ctx;
        current_ = session;
      }
      reply.Clear();
      proto::HelloReply* h = reply.mutable_hello();
      h->set_version(kProtocolVersion);
      h->set_session_id(session->id);
      h->set_receiver(options_.receiver_name);
      h->set_max_batch_pages(kMaxBatchPages);
      h->set_max_streams(std::min(options_.max_streams, kMaxStreams));
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
      handshake.Disarm();
      const proto::Setup& ps = req.setup();
      if (Status v = ValidateSetup(ps, limits_); !v.ok()) return fail(v);
      engine::MigrationSetup setup;
      setup.vm_description = ps.vm_description();
      for (const proto::MemoryRange& r : ps.memory()) setup.memory.push_back({r.slot(), r.gpa(), r.size()});
      setup.vcpus = ps.vcpus();
      setup.verify = ps.verify();
      std::unique_ptr<engine::MigrationTarget> target = factory_ ? factory_() : nullptr;
      if (!target) return fail(Internal("receiver could not create a migration target"));
      Status s = target->OnSetup(setup);
      if (s.ok()) {
        // Every range the source will send must be writable in the target.
        for (const engine::MemoryRange& r : setup.memory) {
          if (target->memory().HostAddress(r.gpa, r.size) == nullptr) {
            s = Internal("target built no memory for gpa " + Hex(r.gpa) + " (" + FormatBytes(r.size) + ")");
            break;
          }
        }
      }
      if (!s.ok()) {
        target->OnAbort(s.message());
        return fail(s.WithContext("target refused the setup"));
      }
      std::string failed_meanwhile;  // a Pages call failed the session during OnSetup
      {
        std::lock_guard lock(mu_);
        if (session->state == State::kWaitSetup) {
          session->target = std::move(target);
          session->streams = ps.streams();
          session->per_stream.assign(ps.streams(), StreamState{});
          session->state = State::kReceiving;
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
            if (t.stream() != static_cast<uint32_t>(i) || t.batches() != ss.next_sequence || t.pages() != ss.pages) {
              mismatch = "stream " + std::to_string(i) + ": source declares " + std::to_string(t.batches()) +
                         " batches (" + std::to_string(t.pages()) + " pages) for stream " +
                         std::to_string(t.stream()) + ", receiver applied " + std::to_string(ss.next_sequence) +
                         " (" + std::to_string(ss.pages) + " pages)";
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
      fs.source_paused_ms = f.source_paused_ms();
      Result<engine::FinalReply> r = target->OnFinal(fs);
      if (!r.ok()) return fail(r.status().WithContext("target refused the final state"));
      reply.Clear();
      proto::FinalReply* fr = reply.mutable_final();
      fr->set_resumed(r->resumed);
      fr->set_verified(r->verified);
      fr->set_verify_detail(r->verify_detail);
      fr->set_target_restore_ms(r->target_restore_ms);
      fr->set_source_paused_ms(r->source_paused_ms);
      const bool sent = stream->Write(reply);
      // The target has decided (and its VM may run): this is an outcome the
      // caller must see even if the reply could not be delivered.
      Status note = sent ? Status::Ok()
                         : Unavailable("the final reply could not be delivered to the source (connection lost)");
      EndSession(session, MigrationStatus::kCompleted, note, std::move(r).value());
      done = true;
      continue;
    }
    // kFailing (a Pages thread failed the session) or later.
    break;
  }

  // The call ended: a clean half-close after Final, or the source went away,
  // or we were cancelled (a Pages thread failed the session, the handshake
  // took too long, or the server is shutting down).
  if (!session || done) return grpc::Status::OK;
  Status why;
  {
    std::lock_guard lock(mu_);
    if (session->state == State::kFailing) {
      why = session->failure;
    } else if (shutting_down_) {
      why = Aborted("the receiver is shutting down");
    }
  }
  if (why.ok()) {
    why = handshake.fired() ? Unavailable("no valid Setup within " + std::to_string(options_.handshake_timeout.count()) +
                                          " ms of connecting")
                            : Unavailable("the control stream closed before Final (source gone or connection lost)");
  }
  EndSession(session, MigrationStatus::kFailed, why);
  return ToGrpc(why);
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
    if (!s.ok()) return s.WithContext(st.attached ? "stream " + std::to_string(st.index) : "Pages");
  }
  const engine::SlotTable* memory = nullptr;
  {
    std::lock_guard lock(mu_);
    if (!st.session) {
      // The first batch attaches this call to the current session.
      const std::string name = "stream " + std::to_string(batch.stream());
      if (!current_ || current_->id != batch.session_id()) {
        return InvalidArgument(name + ": batch names session " + Hex(batch.session_id()) +
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
      session.per_stream[st.index].attached = true;
      session.per_stream[st.index].reactor = self;
    }
    PMLMIG_RETURN_IF_ERROR(Admit(st.session, st.index, batch));
    ++session.applying;
    memory = &session.target->memory();
  }

  Result<ApplyResult> applied = st.applier.Apply(batch, st.payload, *memory);
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
      session.rounds = std::max(session.rounds, batch.round() + 1);
    }
    cv_.notify_all();
  }
  if (!applied.ok()) return applied.status().WithContext("stream " + std::to_string(st.index));
  proto::BatchAck ack;
  ack.set_sequence(batch.sequence());
  ack.set_pages(static_cast<uint32_t>(applied->normal_pages + applied->zero_pages));
  return ack;
}

grpc::Status MigrationServer::Impl::Refuse(PagesState& st, const Status& s, PagesReactor* self) {
  std::shared_ptr<Session> session;
  {
    std::lock_guard lock(mu_);
    session = st.session;
    if (st.attached && st.session->per_stream[st.index].reactor == self) {
      st.session->per_stream[st.index].reactor = nullptr;
    }
    st.attached = false;
  }
  if (session) MarkFailed(session, s, self);
  return ToGrpc(s);
}

void MigrationServer::Impl::PagesCancelled(PagesState& st, PagesReactor* self) {
  std::shared_ptr<Session> session;
  uint32_t index = 0;
  {
    std::lock_guard lock(mu_);
    if (!st.attached || st.session->per_stream[st.index].reactor != self) return;
    st.session->per_stream[st.index].reactor = nullptr;
    session = st.session;
    index = st.index;
  }
  // A data stream of a migration in progress broke: the migration cannot
  // complete (MarkFailed does nothing once it is finalizing or over).
  MarkFailed(session, Unavailable("stream " + std::to_string(index) + " broke (cancelled or connection lost)"),
             self);
}

void MigrationServer::Impl::PagesDone(PagesState& st, PagesReactor* self) {
  std::lock_guard lock(mu_);
  if (st.attached && st.session->per_stream[st.index].reactor == self) {
    st.session->per_stream[st.index].reactor = nullptr;
  }
}

// One Pages call: reads a batch, applies it (in OnReadDone), queues its ack,
// reads the next. At most one ack write in flight; Finish waits for it.
class MigrationServer::Impl::PagesReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit PagesReactor(Impl* impl) : impl_(impl) { StartRead(&in_); }

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
    grpc::CallbackServerContext* /*ctx*/) {
  return new PagesReactor(this);
}

void MigrationServer::Impl::EndStreams(Session& session, const Status& why, const PagesReactor* self) {
  const Status reason(why.code() == Code::kOk ? Code::kAborted : why.code(),
                      "the receiver ended the migration: " + why.message());
  for (StreamState& ss : session.per_stream) {
    if (ss.reactor != nullptr && ss.reactor != self) ss.reactor->Abandon(reason);
  }
}

// ------------------------------------------------------------- lifecycle

Result<MigrationOutcome> MigrationServer::Impl::WaitForMigration(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  cv_.wait_until(lock, deadline, [&] { return !outcomes_.empty() || shutting_down_; });
  if (!outcomes_.empty()) {
    MigrationOutcome o = std::move(outcomes_.front());
    outcomes_.pop_front();
    return o;
  }
  if (shutting_down_) return Aborted("the receiver shut down before a migration ended");
  return Aborted("no migration ended before the deadline");
}

void MigrationServer::Impl::Shutdown() {
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    if (current_) {
      EndStreams(*current_, Unavailable("the receiver is shutting down"), nullptr);
      current_->control_ctx->TryCancel();
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
  if (!factory) return InvalidArgument("MigrationServer: no target factory");
  if (options.max_streams == 0) return InvalidArgument("MigrationServer: max_streams must be >= 1");
  TuneMallocForTransfer();
  auto impl = std::make_unique<Impl>(std::move(factory), options);
  grpc::ServerBuilder b;
  b.AddListeningPort(listen, grpc::InsecureServerCredentials(), &impl->port_);
  b.RegisterService(impl.get());
  b.SetMaxReceiveMessageSize(kMaxMessageBytes);
  b.SetMaxSendMessageSize(kMaxMessageBytes);
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_time.count()));
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(options.keepalive_timeout.count()));
  b.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  b.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
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
Result<MigrationOutcome> MigrationServer::WaitForMigration(std::chrono::steady_clock::time_point deadline) {
  return impl_->WaitForMigration(deadline);
}
void MigrationServer::Shutdown() { impl_->Shutdown(); }

}  // namespace pmlmig::transport
