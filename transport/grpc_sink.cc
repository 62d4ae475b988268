// GrpcMigrationSink: the sender of protocol version 2 (proto/migration.proto).
// This file is the orchestration: Begin (connect, Hello, Setup, open the
// data streams), SendPages (one sender thread per data stream for a round,
// watched for stalls), Finish (close the streams, Final), Commit and Abort,
// and the sink's phase. The parts, each owning its state and its lock:
//   - SinkCalls (sink_calls.h): every call's context, cancelled together,
//     and the first informative error (FailureLatch, failure_latch.h). A
//     failure anywhere goes through SinkCalls::Fail: it is recorded, every
//     call is cancelled, and the sink is unusable from then on;
//   - ControlClient (control_client.h): the Control call, synchronous API,
//     with its reader thread and reply queue;
//   - DataStream (data_stream.h): one Pages call each, driven through its
//     own completion queue by its sender thread, with its BufferPool
//     (buffer_pool.h) and the shared TokenBucket (token_bucket.h);
//   - StallWatch (stall_watch.h): the round's stall watch;
//   - CommitAndResolve (commit_resolve.h) and ConnectionRefused
//     (connection_probe.h): the switch-over and the raw-socket probe.
// gRPC models: Control uses the synchronous API, each Pages call a
// completion queue; control_client.h and data_stream.h say why.
//
// Threads: the controlling thread (the engine's) runs Begin, SendPages,
// Finish and Commit; Abort may run on any thread: it writes Abort on the
// control stream (best effort, bounded by abort_grace) and cancels every
// call, which makes every blocked gRPC read or write return. mu_ below
// guards the phase and the totals only; no other lock is taken under it.
#include "pmlmig/transport/grpc_sink.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <mutex>
#include <thread>

#include "batch_codec.h"
#include "commit_resolve.h"
#include "connection_probe.h"
#include "control_client.h"
#include "data_stream.h"
#include "direct_stream.h"
#include "postcopy_client.h"
#include "grpc_status.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/watchdog.h"
#include "sink_calls.h"
#include "stall_watch.h"
#include "token_bucket.h"

namespace pmlmig::transport {

namespace {

std::shared_ptr<grpc::ChannelCredentials> Credentials(const TransportSecurity& sec) {
  if (!sec.tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = sec.tls_ca_pem;
  ssl.pem_private_key = sec.tls_key_pem;
  ssl.pem_cert_chain = sec.tls_cert_pem;
  return grpc::SslCredentials(ssl);
}

}  // namespace

// Each channel gets its own subchannel pool and a distinct argument, so
// every data stream has its own TCP connection (and its own HTTP/2 flow
// control and transport thread work) instead of sharing one.
std::shared_ptr<grpc::Channel> MakeChannel(const GrpcSinkOptions& o, int index) {
  grpc::ChannelArguments a;
  a.SetMaxSendMessageSize(kMaxMessageBytes);
  a.SetMaxReceiveMessageSize(kMaxMessageBytes);
  a.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(o.keepalive_time.count()));
  a.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(o.keepalive_timeout.count()));
  a.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  a.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Retries would buffer every sent message until the call commits.
  a.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  a.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  a.SetInt("pmlmig.connection", index);
  SetBulkTransferArgs([&](const char* k, int v) { a.SetInt(k, v); });
  if (!o.security.tls_server_name.empty()) a.SetSslTargetNameOverride(o.security.tls_server_name);
  return grpc::CreateCustomChannel(o.target, Credentials(o.security), a);
}

class GrpcMigrationSink::Impl {
 public:
  explicit Impl(GrpcSinkOptions o)
      : options_(std::move(o)), calls_(options_.security), control_(calls_, options_.target) {
    if (options_.max_bandwidth > 0) bucket_ = std::make_unique<TokenBucket>(options_.max_bandwidth);
    calls_.AddWaker([this] {
      if (bucket_) bucket_->Wake();
      control_.Wake();
    });
  }
  ~Impl();

  Status Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory);
  Result<engine::TransferStats> SendPages(uint32_t round, engine::PageList& pages);
  Result<engine::FinalReply> Finish(const engine::FinalState& state);
  engine::CommitResult Commit();
  void Abort(const std::string& why);
  Result<engine::PostcopyResult> Postcopy(engine::PostcopyBacklog& backlog);
  Status PreparePostcopy(std::span<const engine::PageRun> stale);
  bool can_postcopy() const { return can_postcopy_; }

  engine::TransferStats totals() const {
    std::lock_guard lock(mu_);
    return totals_;
  }
  const GrpcSinkOptions options_;

 private:
  // kPostcopy: committed, owed pages still to serve (Postcopy()).
  enum class Phase { kNew, kReady, kSending, kPrepared, kCommitting, kPostcopy, kDone, kBroken };

  Status DoBegin(const engine::MigrationSetup& setup);
  Status DoFinishStreams();
  // Fails the sink with `s` and leaves it broken; returns the failure.
  Status Break(const Status& s);

  const engine::SlotTable* source_ = nullptr;  // set by Begin
  uint64_t session_id_ = 0;                    // set by Begin
  Checksum checksum_ = Checksum::kXxh64;       // set by Begin
  bool can_postcopy_ = false;                  // set by Begin: the receiver said so
  bool can_recover_ = false;                   // set by Begin: the receiver waits for a PostcopyResume
  bool can_push_acks_ = false;                 // set by Begin: the receiver acknowledges push batches
  bool can_prepare_ = false;                   // set by Begin: the receiver takes a PostcopyPrepare
  bool postcopy_ = false;                      // Finish sent a post-copy Final
  std::unique_ptr<TokenBucket> bucket_;        // null: no bandwidth limit
  // Declared before the calls: its contexts outlive them.
  SinkCalls calls_;
  std::shared_ptr<grpc::Channel> control_channel_;
  ControlClient control_;
  std::vector<std::unique_ptr<PageStream>> streams_;  // fixed after Begin
  bool direct_ = false;                                // set by Begin: the streams are direct

  mutable std::mutex mu_;
  Phase phase_ = Phase::kNew;     // guarded by mu_
  bool aborted_ = false;          // guarded by mu_
  int64_t last_round_ = -1;       // guarded by mu_
  engine::TransferStats totals_;  // guarded by mu_
};

GrpcMigrationSink::Impl::~Impl() {
  bool done;
  {
    std::lock_guard lock(mu_);
    done = phase_ == Phase::kDone || phase_ == Phase::kNew;
  }
  if (!done) Abort("the sending side is shutting down");
  calls_.Fail(Aborted("sink destroyed"), true);  // cancels whatever is left
  control_.Join();
  for (auto& ds : streams_) ds->Teardown();
}

Status GrpcMigrationSink::Impl::Break(const Status& s) {
  calls_.Fail(s);
  Status f = calls_.failure();  // the first informative error, perhaps not `s`
  std::lock_guard lock(mu_);
  phase_ = Phase::kBroken;
  return f;
}

// ------------------------------------------------------------- Begin

Status GrpcMigrationSink::Impl::Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory) {
  if (Status f = calls_.failure(); !f.ok()) return f;
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kNew) return InvalidArgument("GrpcMigrationSink::Begin: called twice");
    phase_ = Phase::kSending;  // Abort may now run concurrently
  }
  source_ = &source_memory;
  if (Status s = DoBegin(setup); !s.ok()) calls_.Fail(s);
  const Status f = calls_.failure();
  std::lock_guard lock(mu_);
  phase_ = f.ok() ? Phase::kReady : Phase::kBroken;
  return f;
}

Status WaitConnected(const GrpcSinkOptions& o, grpc::Channel& ch, const std::string& which, bool* refused,
                     const std::atomic<bool>* stop) {
  // gRPC retries a refused port (with backoff) until the deadline; once it
  // reports a failed attempt, ask whether the port refuses connections and
  // say so at once. Anything else (no answer, a TLS handshake that fails)
  // waits for connect_timeout.
  if (refused != nullptr) *refused = false;
  const auto deadline = std::chrono::system_clock::now() + o.connect_timeout;
  for (grpc_connectivity_state st = ch.GetState(true);; st = ch.GetState(true)) {
    if (st == GRPC_CHANNEL_READY) return Status::Ok();
    if (st == GRPC_CHANNEL_TRANSIENT_FAILURE && ConnectionRefused(o.target)) {
      if (refused != nullptr) *refused = true;
      return Unavailable("connection refused to " + o.target + " (" + which + "): nothing listens on that port");
    }
    // In slices, so that an abort (a cancelled migration) ends the wait.
    const auto slice = std::min(deadline, std::chrono::system_clock::now() + std::chrono::milliseconds(50));
    if (!ch.WaitForStateChange(st, slice)) {
      if (stop != nullptr && stop->load()) return Aborted("connect to " + o.target + " (" + which + "): stopped");
      if (std::chrono::system_clock::now() >= deadline) break;
    }
  }
  return Unavailable("connect to " + o.target + " (" + which + "): no connection within " +
                     SecondsText(o.connect_timeout) +
                     (o.security.tls()
                          ? " (with TLS: is the receiver using TLS, is its certificate signed by this side's TLS CA and "
                            "issued for the host you connect to, and does it accept this side's certificate?)"
                          : " (is a receiver listening there? One that demands TLS looks like this to a sender "
                            "without TLS)"));
}

Status GrpcMigrationSink::Impl::DoBegin(const engine::MigrationSetup& setup) {
  const std::string where = "migration to " + options_.target;
  // Connect everything first: control on connection 0, stream i on i + 1
  // (direct streams only once Setup has named their port).
  const bool want_direct = options_.direct_data && !options_.security.tls();
  std::vector<std::unique_ptr<DataStream>> calls;
  auto connect_calls = [&]() -> Status {
    for (uint32_t i = 0; i < options_.streams; ++i) {
      calls.push_back(std::make_unique<DataStream>(i, options_, calls_, bucket_.get()));
    }
    for (auto& ds : calls) {
      PMLMIG_RETURN_IF_ERROR(
          WaitConnected(options_, ds->channel(), "stream " + std::to_string(ds->index()), nullptr, &calls_.stop()));
    }
    return Status::Ok();
  };
  control_channel_ = MakeChannel(options_, 0);
  PMLMIG_RETURN_IF_ERROR(WaitConnected(options_, *control_channel_, "control", nullptr, &calls_.stop()));
  if (!want_direct) PMLMIG_RETURN_IF_ERROR(connect_calls());
  control_.Start(control_channel_);

  // Hello.
  proto::ControlRequest req;
  req.mutable_hello()->set_version(kProtocolVersion);
  req.mutable_hello()->set_sender(options_.sender_name);
  if (!control_.Write(req)) return control_.End(options_.connect_timeout, "Hello").WithContext(where);
  PMLMIG_ASSIGN_OR_RETURN(proto::ControlReply hello,
                          control_.WaitReply(options_.setup_timeout, "waiting for HelloReply"));
  if (!hello.has_hello()) return InvalidArgument(where + ": receiver answered Hello with something else");
  if (hello.hello().version() != kProtocolVersion) {
    return InvalidArgument(where + ": receiver speaks protocol version " + std::to_string(hello.hello().version()) +
                           ", this sender " + std::to_string(kProtocolVersion));
  }
  if (hello.hello().max_batch_pages() < options_.batch_pages) {
    return InvalidArgument(where + ": receiver takes at most " + std::to_string(hello.hello().max_batch_pages()) +
                           " pages per batch, asked for " + std::to_string(options_.batch_pages));
  }
  if (hello.hello().max_streams() < options_.streams) {
    return InvalidArgument(where + ": receiver takes at most " + std::to_string(hello.hello().max_streams()) +
                           " streams, asked for " + std::to_string(options_.streams));
  }
  session_id_ = hello.hello().session_id();
  can_postcopy_ = hello.hello().postcopy();
  can_recover_ = hello.hello().postcopy_recovery();
  can_push_acks_ = hello.hello().postcopy_push_acks();
  can_prepare_ = hello.hello().postcopy_prepare();
  // XXH3 when the receiver takes it (0.4+), else the XXH64 every receiver takes.
  Checksum checksum = Checksum::kXxh64;
  for (int c : hello.hello().checksums()) {
    if (c == proto::BATCH_CHECKSUM_XXH3) checksum = Checksum::kXxh3;
  }
  checksum_ = checksum;

  // Setup.
  req.Clear();
  proto::Setup* ps = req.mutable_setup();
  ps->set_vm_description(setup.vm_description);
  for (const engine::MemoryRange& r : setup.memory) {
    proto::MemoryRange* m = ps->add_memory();
    m->set_slot(r.slot);
    m->set_gpa(r.gpa);
    m->set_size(r.size);
  }
  ps->set_vcpus(setup.vcpus);
  ps->set_verify(setup.verify);
  ps->set_verify_order(setup.verify_order == engine::VerifyOrder::kAfterCommit ? proto::VERIFY_AFTER_COMMIT
                                                                               : proto::VERIFY_BEFORE_COMMIT);
  ps->set_streams(options_.streams);
  ps->set_checksum(checksum == Checksum::kXxh3 ? proto::BATCH_CHECKSUM_XXH3 : proto::BATCH_CHECKSUM_XXH64);
  ps->set_direct_data(want_direct);
  if (!control_.Write(req)) return control_.End(options_.connect_timeout, "Setup").WithContext(where);
  PMLMIG_ASSIGN_OR_RETURN(proto::ControlReply sr,
                          control_.WaitReply(options_.setup_timeout, "waiting for the VM to be built"));
  if (!sr.has_setup()) return InvalidArgument(where + ": receiver answered Setup with something else");

  // The data streams. Direct: each connection's hello attaches it.
  const proto::SetupReply& reply = sr.setup();
  if (want_direct && reply.direct() && reply.direct_key().size() == direct::kKeyBytes) {
    PMLMIG_ASSIGN_OR_RETURN(HostPort host, ParseHostPort(options_.target));
    direct::Key key;
    std::copy(reply.direct_key().begin(), reply.direct_key().end(), key.begin());
    for (uint32_t i = 0; i < options_.streams; ++i) {
      auto ds = std::make_unique<DirectStream>(i, options_, calls_, bucket_.get());
      ds->set_checksum(checksum);
      PMLMIG_RETURN_IF_ERROR(
          ds->Open(host.host, host.port, session_id_, key).WithContext(where));
      streams_.push_back(std::move(ds));
    }
    direct_ = true;
    return Status::Ok();
  }
  // Pages calls (TLS, direct data off, or a receiver that does not offer
  // them); the receiver attaches each at its first batch.
  if (want_direct) PMLMIG_RETURN_IF_ERROR(connect_calls());
  for (auto& ds : calls) {
    ds->set_checksum(checksum);
    PMLMIG_RETURN_IF_ERROR(ds->Open());
    streams_.push_back(std::move(ds));
  }
  return Status::Ok();
}

// ------------------------------------------------------------- SendPages

Result<engine::TransferStats> GrpcMigrationSink::Impl::SendPages(uint32_t round, engine::PageList& pages) {
  if (Status f = calls_.failure(); !f.ok()) return f;
  std::vector<const StreamProgress*> progress;
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kReady) return InvalidArgument("GrpcMigrationSink::SendPages: not between Begin and Finish");
    if (static_cast<int64_t>(round) < last_round_) {
      return InvalidArgument("GrpcMigrationSink::SendPages: round " + std::to_string(round) + " after round " +
                             std::to_string(last_round_));
    }
    last_round_ = round;
    phase_ = Phase::kSending;
  }
  for (auto& ds : streams_) {
    ds->progress().Begin();
    progress.push_back(&ds->progress());
  }
  StallWatch watch(std::move(progress), options_.stall_timeout);
  std::vector<std::thread> threads;
  threads.reserve(streams_.size());
  for (auto& ds : streams_) {
    threads.emplace_back([this, d = ds.get(), round, &pages, &watch] {
      d->Run(*source_, session_id_, round, pages);
      watch.StreamDone();
    });
  }
  // A stalled stream fails the migration; cancelling its call unblocks it.
  watch.Watch(calls_.stop(), [&](const StallWatch::Stall& s) {
    calls_.Fail(Unavailable("stream " + std::to_string(streams_[s.stream]->index()) + " to " + options_.target +
                            ": no progress for " +
                            SecondsText(std::chrono::duration_cast<std::chrono::milliseconds>(s.idle)) +
                            " (receiver stalled or unreachable)"));
  });
  for (std::thread& t : threads) t.join();

  engine::TransferStats round_stats;
  for (auto& ds : streams_) round_stats += ds->round_stats();
  const Status f = calls_.failure();
  std::lock_guard lock(mu_);
  totals_ += round_stats;  // a failed round's part too: totals() says what went out
  if (!f.ok()) {
    phase_ = Phase::kBroken;
    return f;
  }
  phase_ = Phase::kReady;
  return round_stats;
}

// ------------------------------------------------------------- Finish

Status GrpcMigrationSink::Impl::DoFinishStreams() {
  // Closing the data streams first: a stream's OK status means the receiver
  // saw its end after applying (and acknowledging) every batch on it.
  Watchdog watch(std::chrono::steady_clock::now() + options_.stall_timeout, [this] {
    calls_.Fail(Unavailable("closing the data streams to " + options_.target + ": no answer within " +
                            SecondsText(options_.stall_timeout)));
  });
  Status result;
  for (auto& ds : streams_) {
    Status s = ds->Close();
    if (result.ok()) result = std::move(s);
  }
  watch.Disarm();
  return result;
}

Status GrpcMigrationSink::Impl::PreparePostcopy(std::span<const engine::PageRun> stale) {
  if (Status f = calls_.failure(); !f.ok()) return f;
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kReady) return InvalidArgument("GrpcMigrationSink::PreparePostcopy: not between rounds");
  }
  // An older receiver arms everything at Final; so does one given more
  // runs than a message may name.
  if (!can_prepare_ || stale.empty() || stale.size() > static_cast<size_t>(kMaxPostcopyRuns)) return Status::Ok();
  proto::ControlRequest req;
  for (const engine::PageRun& r : stale) {
    proto::PageRun* pr = req.mutable_prepare()->add_stale();
    pr->set_gpa(r.gpa);
    pr->set_pages(static_cast<uint32_t>(r.pages));
  }
  if (!control_.Write(req)) return Break(control_.End(options_.connect_timeout, "PostcopyPrepare"));
  Result<proto::ControlReply> reply =
      control_.WaitReply(options_.final_timeout, "waiting for the target to prepare post-copy");
  if (!reply.ok()) return Break(reply.status());
  if (!reply->has_prepared()) return Break(InvalidArgument("receiver answered PostcopyPrepare with something else"));
  return Status::Ok();
}

Result<engine::FinalReply> GrpcMigrationSink::Impl::Finish(const engine::FinalState& state) {
  if (Status f = calls_.failure(); !f.ok()) return f;
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kReady) return InvalidArgument("GrpcMigrationSink::Finish: not after Begin");
    phase_ = Phase::kSending;
  }
  if (state.vm_state.size() > kMaxVmStateBytes) {
    return Break(InvalidArgument("final state of " + std::to_string(state.vm_state.size()) + " bytes exceeds " +
                                 std::to_string(kMaxVmStateBytes)));
  }
  if (Status s = DoFinishStreams(); !s.ok()) return Break(s);
  if (Status s = calls_.failure(); !s.ok()) return Break(s);

  proto::ControlRequest req;
  proto::Final* f = req.mutable_final();
  f->set_vm_state(state.vm_state.data(), state.vm_state.size());
  f->set_has_digest(state.has_digest);
  f->set_memory_digest(state.memory_digest);
  f->set_source_paused_ms(state.source_paused_ms);
  *f->mutable_chunk_digests() = {state.chunk_digests.begin(), state.chunk_digests.end()};
  f->set_chunk_bytes(state.chunk_bytes);
  if (state.postcopy) {
    if (!can_postcopy_) return Break(InvalidArgument("post-copy: the receiver cannot take it (pmlmig before 0.6, or "
                                                     "no userfaultfd there)"));
    f->set_postcopy(true);
    for (const engine::PageRun& r : state.postcopy_pages) {
      proto::PageRun* pr = f->add_postcopy_pages();
      pr->set_gpa(r.gpa);
      pr->set_pages(static_cast<uint32_t>(r.pages));
    }
    postcopy_ = true;
  }
  for (auto& ds : streams_) {
    proto::StreamTotals* t = f->add_streams();
    t->set_stream(ds->index());
    t->set_batches(ds->batches_sent());
    t->set_pages(ds->pages_sent());
  }
  if (!control_.Write(req)) return Break(control_.End(options_.connect_timeout, "Final"));
  auto reply = control_.WaitReply(options_.final_timeout, "waiting for the target to restore the VM");
  if (!reply.ok()) return Break(reply.status());
  if (!reply->has_final()) return Break(InvalidArgument("receiver answered Final with something else"));
  if (!reply->final().prepared()) return Break(Internal("receiver answered Final without preparing the VM"));

  engine::FinalReply out;
  out.prepared = true;
  out.verified = reply->final().verified();
  out.verify_detail = reply->final().verify_detail();
  out.target_restore_ms = reply->final().target_restore_ms();
  out.source_paused_ms = reply->final().source_paused_ms();
  out.chunk_digests.assign(reply->final().chunk_digests().begin(), reply->final().chunk_digests().end());
  out.chunk_bytes = reply->final().chunk_bytes();
  if (Status s = calls_.failure(); !s.ok()) return s;
  std::lock_guard lock(mu_);
  phase_ = Phase::kPrepared;
  return out;
}

// ------------------------------------------------------------- Commit

engine::CommitResult GrpcMigrationSink::Impl::Commit() {
  const Status f = calls_.failure();
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kPrepared || !f.ok()) {
      // Nothing was sent: the receiver cannot run the VM.
      engine::CommitResult result;
      result.state = engine::CommitState::kNotCommitted;
      result.detail = !f.ok() ? f : InvalidArgument("GrpcMigrationSink::Commit: not after a successful Finish");
      return result;
    }
    phase_ = Phase::kCommitting;  // from here Abort does nothing
  }
  engine::CommitResult result = CommitAndResolve(control_, calls_, options_, session_id_, postcopy_);
  std::lock_guard lock(mu_);
  phase_ = result.state != engine::CommitState::kCommitted ? Phase::kBroken
           : postcopy_ && !result.resolved             ? Phase::kPostcopy
                                                       : Phase::kDone;
  return result;
}

// ------------------------------------------------------------- Postcopy

Result<engine::PostcopyResult> GrpcMigrationSink::Impl::Postcopy(engine::PostcopyBacklog& backlog) {
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kPostcopy) {
      return InvalidArgument("GrpcMigrationSink::Postcopy: not after a committed post-copy Finish (or the "
                             "commit's reply was lost, and with it the control call post-copy needs)");
    }
  }
  // Runs of more than 2^32 - 1 pages cannot be named in a batch; the
  // backlog's runs are at most batch_pages long.
  PostcopyCallOptions p;
  p.session_id = session_id_;
  p.round = static_cast<uint32_t>(std::max<int64_t>(last_round_ + 1, 0));
  p.checksum = checksum_;
  p.bucket = bucket_.get();
  p.recover = can_recover_;
  p.push_acks = can_push_acks_;
  engine::PostcopyResult result;
  const Status served = ServePostcopy(options_, calls_, control_, *source_, p, backlog, result);
  if (!served.ok()) calls_.Fail(served);
  std::lock_guard lock(mu_);
  totals_ += result.pushed;  // what went out, a failed post-copy's part too
  totals_ += result.answered;
  phase_ = served.ok() ? Phase::kDone : Phase::kBroken;
  if (!served.ok()) return served;
  return result;
}

// ------------------------------------------------------------- Abort

void GrpcMigrationSink::Impl::Abort(const std::string& why) {
  {
    std::lock_guard lock(mu_);
    // Once committed (post-copy included) the VM runs on the target: nothing to abort.
    if (aborted_ || phase_ == Phase::kDone || phase_ == Phase::kCommitting || phase_ == Phase::kPostcopy) return;
    aborted_ = true;
  }
  const bool tell = control_.open() && !calls_.cancelled();
  // Recorded first, so a SendPages whose streams stop now reports the abort
  // rather than a partial round (and the token bucket lets go at once).
  calls_.Record(Aborted("migration aborted: " + why), false);
  if (tell) control_.TryAbort(why, options_.abort_grace);
  calls_.CancelAll();
}

// ------------------------------------------------------------- public

uint32_t DefaultStreams() {
  const unsigned cpus = std::thread::hardware_concurrency();
  return std::clamp<uint32_t>(cpus / 2, 2, 8);
}

Result<std::unique_ptr<GrpcMigrationSink>> GrpcMigrationSink::Create(GrpcSinkOptions o) {
  if (Result<HostPort> address = ParseHostPort(o.target); !address.ok()) {
    return InvalidArgument("migration target " + address.status().message());
  } else if (address->port == 0) {
    return InvalidArgument("migration target \"" + o.target + "\": port 0 (expected the receiver's port, 1..65535)");
  }
  if (o.streams == 0) o.streams = DefaultStreams();
  if (o.streams > kMaxStreams) {
    return InvalidArgument("streams: " + std::to_string(o.streams) + " is outside 1.." + std::to_string(kMaxStreams));
  }
  if (o.batch_pages == 0 || o.batch_pages > kMaxBatchPages) {
    return InvalidArgument("batch pages: " + std::to_string(o.batch_pages) + " is outside 1.." +
                           std::to_string(kMaxBatchPages));
  }
  if (o.max_inflight_bytes == 0) return InvalidArgument("max in-flight bytes: must be > 0");
  if (o.compress != Compression::kNone && o.compress != Compression::kLz4 && o.compress != Compression::kZstd) {
    return InvalidArgument("compression: unknown value");
  }
  PMLMIG_RETURN_IF_ERROR(ValidateTransportSecurity(o.security));
  for (auto d : {o.connect_timeout, o.setup_timeout, o.stall_timeout, o.final_timeout, o.commit_timeout,
                 o.resolve_timeout, o.keepalive_time, o.keepalive_timeout, o.abort_grace}) {
    if (d.count() <= 0) return InvalidArgument("sink timeouts must be positive");
  }
  if (o.postcopy_recovery.count() < 0) return InvalidArgument("post-copy recovery window: must be >= 0");
  TuneMallocForTransfer();
  return std::unique_ptr<GrpcMigrationSink>(new GrpcMigrationSink(std::make_unique<Impl>(std::move(o))));
}

GrpcMigrationSink::GrpcMigrationSink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GrpcMigrationSink::~GrpcMigrationSink() = default;

Status GrpcMigrationSink::Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory) {
  return impl_->Begin(setup, source_memory);
}
Result<engine::TransferStats> GrpcMigrationSink::SendPages(uint32_t round, engine::PageList& pages) {
  return impl_->SendPages(round, pages);
}
Result<engine::FinalReply> GrpcMigrationSink::Finish(const engine::FinalState& state) {
  return impl_->Finish(state);
}
engine::CommitResult GrpcMigrationSink::Commit() { return impl_->Commit(); }
void GrpcMigrationSink::Abort(const std::string& why) { impl_->Abort(why); }
bool GrpcMigrationSink::can_postcopy() const { return impl_->can_postcopy(); }
Status GrpcMigrationSink::PreparePostcopy(std::span<const engine::PageRun> stale) {
  return impl_->PreparePostcopy(stale);
}
Result<engine::PostcopyResult> GrpcMigrationSink::Postcopy(engine::PostcopyBacklog& backlog) {
  return impl_->Postcopy(backlog);
}
engine::TransferStats GrpcMigrationSink::totals() const { return impl_->totals(); }
const GrpcSinkOptions& GrpcMigrationSink::options() const { return impl_->options_; }

}  // namespace pmlmig::transport
