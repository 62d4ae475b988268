#include "receiver_session.h"

#include <unistd.h>

#include <algorithm>

#include "batch_codec.h"
#include "direct_receiver.h"
#include "populate_ahead.h"
#include "uffd_fill.h"
#include "grpc_status.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/postcopy.h"

namespace pmlmig::transport {
namespace {

using Clock = Session::Clock;

const char* RequestName(const proto::ControlRequest& r) {
  switch (r.msg_case()) {
    case proto::ControlRequest::kHello: return "Hello";
    case proto::ControlRequest::kSetup: return "Setup";
    case proto::ControlRequest::kFinal: return "Final";
    case proto::ControlRequest::kAbort: return "Abort";
    case proto::ControlRequest::kCommit: return "Commit";
    case proto::ControlRequest::kResume: return "PostcopyResume";
    case proto::ControlRequest::kPrepare: return "PostcopyPrepare";
    case proto::ControlRequest::MSG_NOT_SET: break;
  }
  return "an empty message";
}

// How long the control thread, finding the control stream gone while pages
// are being received, waits for the attached Pages calls to report first. A
// source that loses a data stream drops its control call, and the receiver
// may notice that before the broken stream's callback runs; waiting lets
// the report name the stream (the cause) rather than the control call (the
// consequence). Calls that are cancelled report within milliseconds; only a
// source that keeps its data streams open after leaving waits this long.
constexpr std::chrono::milliseconds kStreamReportGrace{1000};

// Memory the host can give a new VM now: MemAvailable, else physical memory.
uint64_t HostAvailableBytes() {
  if (const uint64_t available = HostAvailableMemory(); available != 0) return available;
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long size = sysconf(_SC_PAGESIZE);
  return pages > 0 && size > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(size) : 0;
}

}  // namespace

Result<bool> ControlStream::Read(proto::ControlRequest* req) {
  grpc::ByteBuffer buf;
  if (!call_->Read(&buf)) return false;
  const size_t bytes = buf.Length();
  if (!grpc::SerializationTraits<proto::ControlRequest>::Deserialize(&buf, req).ok()) {
    return InvalidArgument("malformed ControlRequest: " + std::to_string(bytes) +
                           " bytes that are not a valid protobuf message");
  }
  return true;
}

bool ControlStream::Write(const proto::ControlReply& reply) {
  grpc::ByteBuffer buf;
  bool own = false;
  if (!grpc::SerializationTraits<proto::ControlReply>::Serialize(reply, &buf, &own).ok()) return false;
  return call_->Write(buf);
}

ReceiverSession::ReceiverSession(Receiver& receiver, grpc::ServerContext* ctx, ControlStream* stream)
    : r_(receiver), ctx_(ctx), stream_(stream) {}

// ------------------------------------------------------------- the loop

grpc::Status ReceiverSession::Run() {
  if (Status a = r_.Authorize(*ctx_); !a.ok()) return ToGrpc(a);
  // Every phase has a deadline. Before Hello there is no session yet: the
  // handshake deadline counts from the call's start.
  watchdog_.emplace(std::chrono::milliseconds(100), [this] { return CheckDeadlines(); });
  proto::ControlRequest req;
  for (;;) {
    Result<bool> more = stream_->Read(&req);
    if (!more.ok()) return Fail(more.status());
    if (!*more) return EndOfCall();
    if (done_) return ToGrpc(InvalidArgument(std::string(RequestName(req)) + " after Commit: the migration is over"));
    if (session_) {
      std::lock_guard lock(r_.mu_);
      session_->last_activity = Clock::now();
    }
    if (Next end = Dispatch(req)) return *end;
  }
}

ReceiverSession::Next ReceiverSession::Dispatch(const proto::ControlRequest& req) {
  if (req.has_abort()) return Abort(req.abort());
  if (!session_) return req.has_resume() ? Resume(req) : Hello(req);
  SessionState state;
  {
    std::lock_guard lock(r_.mu_);
    state = session_->state;
  }
  switch (state) {
    case SessionState::kWaitSetup: return Setup(req);
    case SessionState::kReceiving: return req.has_prepare() ? Prepare(req.prepare()) : Final(req);
    case SessionState::kPrepared: return Commit(req);
    default: return EndOfCall();  // kFailing (another thread failed the session) or later
  }
}

bool ReceiverSession::CheckDeadlines() {
  std::shared_ptr<Session> w;
  {
    std::lock_guard lock(watch_mu_);
    w = watched_;
    if (!w) {
      if (Clock::now() - call_start_ <= r_.options_.handshake_timeout) return false;
      handshake_expired_ = true;
      CancelCall(ctx_, Unavailable("no Hello within " + Ms(r_.options_.handshake_timeout) + " of connecting"));
      return true;
    }
  }
  std::lock_guard lock(r_.mu_);
  Status late = r_.CheckDeadline(*w, Clock::now());
  return !late.ok() && r_.MarkFailedLocked(*w, late, nullptr);
}

grpc::Status ReceiverSession::Fail(const Status& s) {
  if (session_) r_.EndSession(session_, engine::Outcome::kFailed, s);
  return ToGrpc(s);
}

// ------------------------------------------------------------- the messages

ReceiverSession::Next ReceiverSession::Abort(const proto::Abort& abort) {
  const Status why = Aborted("source aborted the migration: " + abort.reason());
  if (session_) r_.EndSession(session_, engine::Outcome::kCancelled, why);
  return ToGrpc(why);
}

ReceiverSession::Next ReceiverSession::Hello(const proto::ControlRequest& req) {
  if (!req.has_hello()) return ToGrpc(InvalidArgument(std::string("expected Hello first, got ") + RequestName(req)));
  if (req.hello().version() != kProtocolVersion) {
    return ToGrpc(InvalidArgument("Hello: protocol version " + std::to_string(req.hello().version()) +
                                  " is not supported (this receiver speaks version " +
                                  std::to_string(kProtocolVersion) + ")"));
  }
  {
    std::lock_guard lock(r_.mu_);
    if (r_.shutting_down_) return ToGrpc(Unavailable("receiver is shutting down"));
    if (!r_.refuse_new_.empty()) {
      return ToGrpc(Unavailable("this receiver takes no more migrations: " + r_.refuse_new_));
    }
    if (r_.current_) {
      return ToGrpc(ResourceExhausted("another migration (session " + FormatHex(r_.current_->id) +
                                      ") is in progress; this receiver serves one at a time"));
    }
    session_ = std::make_shared<Session>();
    do {
      session_->id = r_.rng_();
    } while (session_->id == 0 || r_.ended_.count(session_->id) != 0);
    session_->control_ctx = ctx_;
    session_->opened = call_start_;
    r_.current_ = session_;
  }
  {
    std::lock_guard lock(watch_mu_);
    watched_ = session_;
  }
  FailPoint("receiver.hello");
  reply_.Clear();
  proto::HelloReply* h = reply_.mutable_hello();
  h->set_version(kProtocolVersion);
  h->set_session_id(session_->id);
  h->set_receiver(r_.options_.receiver_name);
  h->set_max_batch_pages(kMaxBatchPages);
  h->set_max_streams(std::min(r_.options_.max_streams, kMaxStreams));
  h->add_checksums(proto::BATCH_CHECKSUM_XXH3);
  h->set_postcopy(engine::PostcopyMemory::Available().ok());
  h->set_postcopy_recovery(r_.options_.postcopy_recovery_timeout.count() > 0);
  h->set_postcopy_push_acks(true);
  h->set_postcopy_prepare(true);
  if (!stream_->Write(reply_)) return EndOfCall();
  return std::nullopt;
}

ReceiverSession::Next ReceiverSession::Resume(const proto::ControlRequest& req) {
  const proto::PostcopyResume& pr = req.resume();
  if (pr.version() != kProtocolVersion) {
    return ToGrpc(InvalidArgument("PostcopyResume: protocol version " + std::to_string(pr.version()) +
                                  " is not supported (this receiver speaks version " +
                                  std::to_string(kProtocolVersion) + ")"));
  }
  const uint64_t id = pr.session_id();
  engine::PostcopyMemory* postcopy = nullptr;
  std::vector<engine::PageRun> missing;
  bool completed = false;
  {
    std::unique_lock lock(r_.mu_);
    // Completing right now (every page is here; PostcopyDone is on its way
    // out on the old link): wait for the end, then say how it ended.
    r_.cv_.wait_for(lock, std::chrono::seconds(10), [&] {
      return !r_.current_ || r_.current_->id != id || r_.current_->state != SessionState::kPostcopy ||
             r_.current_->postcopy != nullptr;
    });
    const std::shared_ptr<Session>& cur = r_.current_;
    if (r_.options_.postcopy_recovery_timeout.count() == 0) {
      return ToGrpc(InvalidArgument("PostcopyResume: this receiver does not resume post-copy (its recovery window "
                                    "is 0)"));
    }
    if (!cur || cur->id != id || cur->state != SessionState::kPostcopy || cur->postcopy == nullptr) {
      std::string why = "no session " + FormatHex(id) + " here";
      if (auto it = r_.ended_.find(id); it != r_.ended_.end() && it->second.committed) {
        completed = true;  // every page arrived, but the PostcopyDone was lost with the link
      } else if (it != r_.ended_.end()) {
        why = "session " + FormatHex(id) + " failed here: " + it->second.error.message();
      } else if (cur && cur->id == id) {
        why = "session " + FormatHex(id) + " is not in post-copy";
      }
      if (!completed) return ToGrpc(InvalidArgument("PostcopyResume: " + why + "; nothing to resume"));
    }
  }
  if (completed) {  // written without mu_ held, as every reply
    reply_.Clear();
    reply_.mutable_resumed()->set_completed(true);
    (void)stream_->Write(reply_);
    return ToGrpc(Status::Ok());
  }
  {
    std::lock_guard lock(r_.mu_);
    const std::shared_ptr<Session>& cur = r_.current_;
    if (!cur || cur->id != id || cur->state != SessionState::kPostcopy || cur->postcopy == nullptr) {
      return ToGrpc(InvalidArgument("PostcopyResume: session " + FormatHex(id) + " ended meanwhile"));
    }
    // A resume while the old link still looks alive here: the source has
    // given it up, so it is ended first.
    (void)r_.PausePostcopyLocked(*cur, cur->postcopy_link, Unavailable("the source resumed on a new link"));
    session_ = cur;
    ++session_->postcopy_link;
    session_->postcopy_paused = false;
    ++session_->postcopy_recoveries;
    session_->control_ctx = ctx_;
    session_->requests_attached = false;
    session_->push_attached = false;
    session_->last_activity = Clock::now();
    postcopy = session_->postcopy;
    prepared_ = session_->prepared;
    // What vCPUs wait for is asked again on the new requests call.
    const std::vector<uint64_t> waiting = postcopy->Waiting();
    session_->requests.assign(waiting.begin(), waiting.end());
    missing = postcopy->Missing();
  }
  {
    std::lock_guard lock(watch_mu_);
    watched_ = session_;
  }
  // The missing pages, in messages of at most kResumeRuns runs.
  constexpr size_t kResumeRuns = 262144;
  size_t next = 0;
  do {
    reply_.Clear();
    proto::PostcopyResumed* m = reply_.mutable_resumed();
    const size_t end = std::min(missing.size(), next + kResumeRuns);
    for (; next < end; ++next) {
      proto::PageRun* pr2 = m->add_missing();
      pr2->set_gpa(missing[next].gpa);
      pr2->set_pages(static_cast<uint32_t>(missing[next].pages));
    }
    m->set_more(next < missing.size());
    if (!stream_->Write(reply_)) break;  // this link broke too: AwaitPostcopy sees it and waits again
  } while (next < missing.size());
  return AwaitPostcopy(*postcopy);
}

ReceiverSession::Next ReceiverSession::Setup(const proto::ControlRequest& req) {
  if (!req.has_setup()) return Fail(InvalidArgument(std::string("expected Setup, got ") + RequestName(req)));
  const proto::Setup& ps = req.setup();
  ReceiverLimits limits = r_.limits_;
  if (limits.max_memory_bytes == 0) limits.max_memory_bytes = HostAvailableBytes();
  if (Status v = ValidateSetup(ps, limits); !v.ok()) return Fail(v);
  FailPoint("receiver.setup");
  engine::MigrationSetup setup;
  setup.vm_description = ps.vm_description();
  for (const proto::MemoryRange& r : ps.memory()) setup.memory.push_back({r.slot(), r.gpa(), r.size()});
  setup.vcpus = ps.vcpus();
  setup.verify = ps.verify();
  setup.verify_order = ps.verify_order() == proto::VERIFY_AFTER_COMMIT ? engine::VerifyOrder::kAfterCommit
                                                                      : engine::VerifyOrder::kBeforeCommit;
  std::unique_ptr<engine::MigrationTarget> target = r_.factory_ ? r_.factory_() : nullptr;
  if (!target) return Fail(Internal("receiver could not create a migration target"));
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
    return Fail(s.WithContext("target refused the setup"));
  }
  // Round 0's populate-ahead workers, over the memory the target built:
  // for one stream only (with several, their own page faults already
  // overlap: docs/BENCHMARKS.md measured no gain with 2 and a loss with 4).
  std::shared_ptr<PopulateAhead> populate;
  if (r_.options_.populate_threads > 0 && ps.streams() == 1) {
    populate = std::make_shared<PopulateAhead>(target->memory(), std::min(r_.options_.populate_threads, 64u),
                                               r_.options_.populate_lookahead_bytes);
  }
  // With several streams, round 0 fills fresh memory through userfaultfd
  // instead (uffd_fill.h); where that cannot be had, pages are copied.
  std::shared_ptr<UffdFill> fill;
  if (r_.options_.uffd_fill && ps.streams() > 1) {
    const SlotFiles files = SlotFiles::Of(*target, /*write_through=*/false);
    if (Result<std::shared_ptr<UffdFill>> f = UffdFill::Start(target->memory(), files.entries()); f.ok()) {
      fill = std::move(*f);
    }
  }
  // Direct data streams, when asked for and the port takes them (never
  // under TLS). Without a key the sender is left to the Pages calls.
  std::shared_ptr<DirectStreams> direct;
  if (ps.direct_data() && r_.direct_port_) {
    if (Result<direct::Key> key = direct::NewKey(); key.ok()) {
      direct = std::make_shared<DirectStreams>(r_, session_->id, ps.streams(), *key);
    }
  }
  std::string failed_meanwhile;  // the session failed during OnSetup (a Pages call, a deadline)
  {
    std::lock_guard lock(r_.mu_);
    if (session_->state == SessionState::kWaitSetup) {
      session_->direct = direct;
      session_->populate = populate;
      session_->fill = fill;
      session_->fill_counts = fill;
      session_->target = std::move(target);
      session_->streams = ps.streams();
      session_->checksum = ps.checksum() == proto::BATCH_CHECKSUM_XXH3 ? Checksum::kXxh3 : Checksum::kXxh64;
      session_->per_stream.assign(ps.streams(), StreamState{});
      session_->state = SessionState::kReceiving;
      session_->last_activity = Clock::now();
    } else {
      failed_meanwhile = session_->failure.message();
    }
  }
  if (target) {
    if (populate) populate->Stop();
    if (fill) fill->Stop();
    target->OnAbort(failed_meanwhile);
    return EndOfCall();  // ends the session with the recorded failure
  }
  reply_.Clear();
  uint64_t bytes = 0;
  for (const proto::MemoryRange& r : ps.memory()) bytes += r.size();
  reply_.mutable_setup()->set_memory_bytes(bytes);
  if (direct) {
    reply_.mutable_setup()->set_direct(true);
    reply_.mutable_setup()->set_direct_key(direct->key().data(), direct->key().size());
  }
  if (!stream_->Write(reply_)) return EndOfCall();
  return std::nullopt;
}

ReceiverSession::Next ReceiverSession::Final(const proto::ControlRequest& req) {
  if (!req.has_final()) return Fail(InvalidArgument(std::string("expected Final, got ") + RequestName(req)));
  const proto::Final& f = req.final();
  if (Status v = ValidateFinalShape(f, session_->streams); !v.ok()) return Fail(v);
  FailPoint("receiver.final");
  engine::MigrationTarget* target = nullptr;
  {
    std::unique_lock lock(r_.mu_);
    // Every batch the source declares must have been applied; wait a
    // bounded time for those still in flight.
    std::string mismatch;
    auto settled = [&] {
      if (session_->state != SessionState::kReceiving) return true;
      if (session_->applying != 0) return false;
      mismatch.clear();
      for (int i = 0; i < f.streams_size(); ++i) {
        const proto::StreamTotals& t = f.streams(i);
        const StreamState& ss = session_->per_stream[i];
        if (t.batches() != ss.next_sequence || t.pages() != ss.pages) {
          mismatch = "stream " + std::to_string(i) + ": source declares " + std::to_string(t.batches()) +
                     " batches (" + std::to_string(t.pages()) + " pages) for stream " + std::to_string(t.stream()) +
                     ", receiver applied " + std::to_string(ss.next_sequence) + " (" + std::to_string(ss.pages) +
                     " pages)";
          return false;
        }
      }
      return true;
    };
    const bool ok = r_.cv_.wait_for(lock, r_.options_.final_drain_timeout, settled);
    if (session_->state != SessionState::kReceiving) {
      lock.unlock();
      return EndOfCall();  // failed meanwhile
    }
    if (!ok) {
      if (mismatch.empty()) mismatch = "batches still being applied";
      const Status s = DataLoss("Final: " + mismatch);
      lock.unlock();
      return Fail(s);
    }
    session_->state = SessionState::kFinalizing;  // from here no batch is admitted
    target = session_->target.get();
    if (session_->switch_prepared && !f.postcopy()) {
      lock.unlock();
      return Fail(InvalidArgument("Final without post-copy after PostcopyPrepare (the prepared pages are holes)"));
    }
  }
  StopPopulating();  // before post-copy registers the memory, and before the state is restored
  engine::FinalState fs;
  if (f.postcopy()) {
    // The owed pages become missing before the state is restored; the VM
    // runs at Commit and faults on them.
    if (f.postcopy_pages_size() > kMaxPostcopyRuns) {
      return Fail(InvalidArgument("Final: " + std::to_string(f.postcopy_pages_size()) +
                                  " post-copy runs, more than " + std::to_string(kMaxPostcopyRuns)));
    }
    fs.postcopy = true;
    for (const proto::PageRun& r : f.postcopy_pages()) {
      if (r.pages() == 0) return Fail(InvalidArgument("Final: a post-copy run of 0 pages"));
      fs.postcopy_pages.push_back({r.gpa(), r.pages()});
    }
    Result<engine::PostcopyMemory*> armed = target->ArmPostcopy(fs.postcopy_pages);
    if (!armed.ok()) return Fail(armed.status().WithContext("target cannot take post-copy"));
    std::lock_guard lock(r_.mu_);
    session_->postcopy = *armed;
    session_->postcopy_used = true;
  }
  fs.vm_state.assign(f.vm_state().begin(), f.vm_state().end());
  fs.has_digest = f.has_digest();
  fs.memory_digest = f.memory_digest();
  fs.chunk_digests.assign(f.chunk_digests().begin(), f.chunk_digests().end());
  fs.chunk_bytes = f.chunk_bytes();
  fs.source_paused_ms = f.source_paused_ms();
  Result<engine::FinalReply> r = target->OnFinal(fs);
  if (!r.ok()) return Fail(r.status().WithContext("target refused the final state"));
  prepared_ = std::move(r).value();
  {
    std::lock_guard lock(r_.mu_);
    session_->state = SessionState::kPrepared;
    session_->prepared_at = Clock::now();
  }
  reply_.Clear();
  proto::FinalReply* fr = reply_.mutable_final();
  fr->set_prepared(true);
  fr->set_verified(prepared_.verified);
  fr->set_verify_detail(prepared_.verify_detail);
  fr->set_target_restore_ms(prepared_.target_restore_ms);
  fr->set_source_paused_ms(prepared_.source_paused_ms);
  *fr->mutable_chunk_digests() = {prepared_.chunk_digests.begin(), prepared_.chunk_digests.end()};
  fr->set_chunk_bytes(prepared_.chunk_bytes);
  if (!stream_->Write(reply_)) return EndOfCall();  // the source never learns: it resumes its VM; we discard
  FailPoint("receiver.prepared");
  return std::nullopt;
}

void ReceiverSession::StopPopulating() {
  std::shared_ptr<PopulateAhead> populate;
  std::shared_ptr<UffdFill> fill;
  {
    std::lock_guard lock(r_.mu_);
    populate = std::move(session_->populate);
    fill = std::move(session_->fill);
  }
  if (populate) populate->Stop();
  if (fill) fill->Stop();
}

ReceiverSession::Next ReceiverSession::Prepare(const proto::PostcopyPrepare& p) {
  if (p.stale_size() > kMaxPostcopyRuns) {
    return Fail(InvalidArgument("PostcopyPrepare: " + std::to_string(p.stale_size()) + " runs, more than " +
                                std::to_string(kMaxPostcopyRuns)));
  }
  std::vector<engine::PageRun> stale;
  stale.reserve(static_cast<size_t>(p.stale_size()));
  for (const proto::PageRun& r : p.stale()) {
    if (r.pages() == 0) return Fail(InvalidArgument("PostcopyPrepare: a run of 0 pages"));
    stale.push_back({r.gpa(), r.pages()});
  }
  engine::MigrationTarget* target = nullptr;
  {
    // From here no batch is taken; one being applied finishes first.
    std::unique_lock lock(r_.mu_);
    if (session_->state != SessionState::kReceiving) return EndOfCall();
    session_->switch_prepared = true;
    // A sender asks only once every batch is acknowledged; one still being
    // read (a stream stalled mid-payload) must not hold the switch, or the
    // session, for ever: bounded as Final's drain.
    const bool drained = r_.cv_.wait_for(lock, r_.options_.final_drain_timeout, [&] {
      return session_->state != SessionState::kReceiving || session_->applying == 0;
    });
    if (session_->state != SessionState::kReceiving) return EndOfCall();
    if (!drained) {
      lock.unlock();
      return Fail(DataLoss("PostcopyPrepare: a batch was still being received " +
                           Ms(r_.options_.final_drain_timeout) + " after the source asked to switch"));
    }
    target = session_->target.get();
  }
  StopPopulating();  // no populate may be in flight where holes are punched and registered
  if (Status s = target->PreparePostcopy(stale); !s.ok()) return Fail(s.WithContext("PostcopyPrepare"));
  reply_.Clear();
  reply_.mutable_prepared();
  if (!stream_->Write(reply_)) return EndOfCall();
  return std::nullopt;
}

ReceiverSession::Next ReceiverSession::Commit(const proto::ControlRequest& req) {
  if (!req.has_commit()) return Fail(InvalidArgument(std::string("expected Commit, got ") + RequestName(req)));
  FailPoint("receiver.commit");
  engine::MigrationTarget* target = nullptr;
  {
    std::lock_guard lock(r_.mu_);
    // Resolve or a deadline may have decided first: then it is discarded.
    if (session_->state == SessionState::kPrepared) {
      session_->state = SessionState::kCommitting;
      target = session_->target.get();
    }
  }
  if (target == nullptr) return EndOfCall();
  engine::PostcopyMemory* postcopy = nullptr;
  {
    std::lock_guard lock(r_.mu_);
    postcopy = session_->postcopy;
  }
  if (postcopy != nullptr) {
    // Before the VM runs: each missing page a vCPU touches becomes a request
    // that the "requests" call writes to the source. Not bound to this call
    // (a resume may serve the session on another one): the receiver
    // outlives every session's target, and with it the fault thread.
    std::weak_ptr<Session> weak = session_;
    Receiver* r = &r_;
    postcopy->Start([r, weak](uint64_t gpa) {
      std::shared_ptr<Session> s = weak.lock();
      if (!s) return;
      std::lock_guard lock(r->mu_);
      s->requests.push_back(gpa);
      r->cv_.notify_all();
    });
  }
  Result<double> resumed = target->OnCommit();
  if (!resumed.ok()) return Fail(resumed.status().WithContext("target could not resume the VM"));
  FailPoint("receiver.resumed");
  prepared_.target_resume_ms = *resumed;
  if (postcopy != nullptr) {
    {
      std::lock_guard lock(r_.mu_);
      if (session_->state == SessionState::kCommitting) session_->state = SessionState::kPostcopy;
      session_->prepared = prepared_;
    }
    reply_.Clear();
    reply_.mutable_commit()->set_target_resume_ms(*resumed);
    if (!stream_->Write(reply_)) {
      return Fail(Unavailable("post-copy: the commit reply could not be delivered (connection lost); the VM "
                              "cannot get its missing pages and is discarded"));
    }
    return AwaitPostcopy(*postcopy);
  }
  reply_.Clear();
  reply_.mutable_commit()->set_target_resume_ms(*resumed);
  const bool sent = stream_->Write(reply_);
  // The VM runs here: this is an outcome the caller must see even if the
  // reply was lost (the source then learns it through Resolve).
  Status note = sent ? Status::Ok()
                     : Unavailable("the commit reply could not be delivered to the source (connection lost); "
                                   "it learns the outcome through Resolve");
  r_.EndSession(session_, engine::Outcome::kCompleted, note, prepared_);
  FailPoint("receiver.committed");
  done_ = true;
  return std::nullopt;
}

ReceiverSession::Next ReceiverSession::AwaitPostcopy(engine::PostcopyMemory& postcopy) {
  // The VM runs; its missing pages arrive on the Postcopy calls. The source
  // (its control call) must stay until every page is here: without it the
  // VM cannot go on, and it is discarded.
  // A broken link (this call, or a Postcopy call) pauses the session: the
  // VM runs on, and the thread waits for a resume, which may come on
  // another call (that one then serves the session, and this call's part is
  // over).
  uint32_t link;
  {
    std::lock_guard lock(r_.mu_);
    link = session_->postcopy_link;
  }
  uint64_t last_remaining = postcopy.remaining();
  Clock::time_point last_progress = Clock::now();
  for (;;) {
    const bool complete = postcopy.WaitComplete(std::chrono::milliseconds(50));
    Status failed;
    {
      std::lock_guard lock(r_.mu_);
      if (session_->state == SessionState::kFailing) {
        failed = session_->failure;
      } else if (session_->postcopy_link != link) {
        done_ = true;  // a newer link serves the session
        return ToGrpc(Aborted("post-copy goes on on a newer control call (the source resumed)"));
      } else if (r_.shutting_down_) {
        failed = Unavailable("the receiver is shutting down");
      } else if (!session_->postcopy_paused && ctx_->IsCancelled()) {
        (void)r_.PausePostcopyLocked(*session_, link,
                                     Unavailable("the control stream closed (source gone or connection lost)"));
        if (session_->state == SessionState::kFailing) failed = session_->failure;  // recovery is off
      }
      if (failed.ok() && session_->postcopy_paused) {
        if (Clock::now() - session_->paused_at > r_.options_.postcopy_recovery_timeout) {
          failed = Unavailable("the link to the source broke (" + session_->pause_reason.message() +
                               ") and the source did not resume within " +
                               Ms(r_.options_.postcopy_recovery_timeout));
        } else {
          last_progress = Clock::now();  // the idle deadline counts on a live link only
          continue;
        }
      }
    }
    if (failed.ok()) {
      if (complete) break;
      // A source that stays connected but sends nothing: the idle deadline.
      if (const uint64_t now_remaining = postcopy.remaining(); now_remaining != last_remaining) {
        last_remaining = now_remaining;
        last_progress = Clock::now();
      } else if (r_.options_.idle_timeout.count() > 0 && Clock::now() - last_progress > r_.options_.idle_timeout) {
        failed = Unavailable("no page arrived for " + Ms(r_.options_.idle_timeout) + " (the source stalled)");
      }
    }
    if (!failed.ok()) {
      return Fail(Status(failed.code(), "post-copy: " + failed.message() + " with " +
                                            std::to_string(postcopy.remaining()) + " of " +
                                            std::to_string(postcopy.stats().needed_pages) +
                                            " pages still missing; the VM cannot go on without them and is "
                                            "discarded"));
    }
  }
  const engine::PostcopyStats st = postcopy.stats();
  reply_.Clear();
  proto::PostcopyDone* d = reply_.mutable_postcopy_done();
  d->set_needed_pages(st.needed_pages);
  d->set_faults(st.faults);
  d->set_requested_pages(st.requested_pages);
  d->set_background_pages(st.background_pages);
  d->set_duplicate_pages(st.duplicate_pages);
  d->set_zero_faults(st.zero_faults);
  d->set_latency_p50_ms(st.latency_p50_ms);
  d->set_latency_p99_ms(st.latency_p99_ms);
  d->set_latency_max_ms(st.latency_max_ms);
  d->set_duration_ms(st.duration_ms);
  engine::MigrationTarget* target = nullptr;
  {
    // From here the Postcopy calls place nothing more (and a call ending is
    // no failure); wait for a placement in progress.
    std::unique_lock lock(r_.mu_);
    target = session_->target.get();
    session_->postcopy = nullptr;
    r_.cv_.wait(lock, [&] { return session_->applying == 0; });
  }
  if (engine::PageDigestTable* digests = target->digests(); digests != nullptr) {
    const std::vector<uint64_t> snap = digests->Snapshot();
    *d->mutable_chunk_digests() = {snap.begin(), snap.end()};
    d->set_chunk_bytes(digests->layout().chunk_bytes());
    prepared_.chunk_digests = snap;
    prepared_.chunk_bytes = digests->layout().chunk_bytes();
  }
  target->EndPostcopy();  // every page is here: the VM runs on its own memory
  const bool sent = stream_->Write(reply_);
  Status note = sent ? Status::Ok()
                     : Unavailable("post-copy completed here, but the source did not get the news (connection lost)");
  r_.EndSession(session_, engine::Outcome::kCompleted, note, prepared_);
  done_ = true;
  return std::nullopt;
}

// ------------------------------------------------------------- the end

grpc::Status ReceiverSession::EndOfCall() {
  if (!session_ || done_) {
    std::lock_guard lock(watch_mu_);
    if (!session_ && handshake_expired_) {
      return ToGrpc(Unavailable("no Hello within " + Ms(r_.options_.handshake_timeout) + " of connecting"));
    }
    return grpc::Status::OK;
  }
  Status why;
  {
    std::unique_lock lock(r_.mu_);
    if (session_->state == SessionState::kReceiving && !r_.shutting_down_) {
      // Did a data stream break first? (See kStreamReportGrace.)
      r_.cv_.wait_for(lock, kStreamReportGrace, [&] {
        if (session_->state != SessionState::kReceiving || r_.shutting_down_) return true;
        return std::none_of(session_->per_stream.begin(), session_->per_stream.end(),
                            [](const StreamState& ss) { return ss.call != nullptr; });
      });
    }
    if (session_->state == SessionState::kFailing) {
      why = session_->failure;
    } else if (r_.shutting_down_) {
      why = Aborted("the receiver is shutting down");
    } else if (session_->state == SessionState::kPrepared) {
      why = Unavailable("the control stream closed after the prepared reply, before Commit (source gone or "
                        "connection lost); the VM never ran here");
    }
  }
  if (why.ok()) {
    std::lock_guard lock(r_.mu_);
    why = Receiver::FirstCause(*session_,
                               Unavailable("the control stream closed before Final (source gone or connection lost)"));
  }
  r_.EndSession(session_, engine::Outcome::kFailed, why);
  return ToGrpc(why);
}

}  // namespace pmlmig::transport
