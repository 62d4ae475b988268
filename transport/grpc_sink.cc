// GrpcMigrationSink: the sender of protocol version 2 (proto/migration.proto).
//
// Threads and what they own:
//   - the controlling thread (the engine's) runs Begin, SendPages, Finish and
//     writes on the control stream;
//   - one control reader thread reads every ControlReply into replies_ and,
//     when the call ends, its final status; Begin and Finish wait on that
//     queue with a timeout, so no read ever needs a deadline of its own;
//   - during SendPages, one thread per data stream builds batches, writes
//     them and reads their acks (at most max_inflight_bytes unacknowledged),
//     while the controlling thread watches them for stalls. A data stream is
//     a generic (ByteBuffer) call driven through its own completion queue:
//     each batch's payload is built straight into a pooled buffer that the
//     message references (no serialization copy), and the next batch is
//     built while the previous one is being written;
//   - Abort may run on any thread: it writes Abort on the control stream
//     (best effort, bounded by abort_grace) and cancels every call, which
//     makes every blocked gRPC read or write return.
// A failure anywhere goes through Fail(): the first informative error wins,
// every call is cancelled, and the sink is unusable from then on.
#include "pmlmig/transport/grpc_sink.h"

#include <grpc/slice.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <algorithm>
#include <thread>

#include "batch_codec.h"
#include "grpc_status.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::transport {
namespace {

using Clock = std::chrono::steady_clock;

std::string Seconds(std::chrono::milliseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g s", static_cast<double>(d.count()) / 1000.0);
  return buf;
}

// A gRPC status as a pmlmig Status, "<what>: <the peer's message>".
Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  const Code code = CodeFromGrpc(s.error_code());
  std::string msg = s.error_message();
  if (msg.empty()) msg = "gRPC status " + std::to_string(static_cast<int>(s.error_code()));
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) msg = "receiver unreachable or gone (" + msg + ")";
  if (s.error_code() == grpc::StatusCode::CANCELLED && msg == "Cancelled on the server side") {
    msg = "the receiver cancelled the call (one of its deadlines or limits; its report names which)";
  }
  return Status(code, what + ": " + msg);
}

// Each channel gets its own subchannel pool and a distinct argument, so
// every data stream has its own TCP connection (and its own HTTP/2 flow
// control and transport thread work) instead of sharing one.
std::shared_ptr<grpc::ChannelCredentials> Credentials(const TransportSecurity& sec) {
  if (!sec.tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = sec.tls_ca_pem;
  ssl.pem_private_key = sec.tls_key_pem;
  ssl.pem_cert_chain = sec.tls_cert_pem;
  return grpc::SslCredentials(ssl);
}

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

// Bytes per second shared by all streams. A stream takes its batch's bytes
// and, if that puts the bucket in debt, sleeps until the debt is repaid; so
// the long-run rate is exact and a burst is at most `burst_` bytes.
class TokenBucket {
 public:
  explicit TokenBucket(uint64_t rate)
      : rate_(static_cast<double>(rate)),
        burst_(std::max(static_cast<double>(rate) / 20, 256.0 * 1024)),
        tokens_(burst_),
        last_(Clock::now()) {}

  // False if `stop` became true while waiting.
  bool Acquire(uint64_t bytes, const std::atomic<bool>& stop) {
    std::unique_lock lock(mu_);
    const Clock::time_point now = Clock::now();
    tokens_ = std::min(burst_, tokens_ + rate_ * std::chrono::duration<double>(now - last_).count());
    last_ = now;
    tokens_ -= static_cast<double>(bytes);
    if (tokens_ >= 0) return true;
    const auto wait = std::chrono::duration<double>(-tokens_ / rate_);
    return !cv_.wait_for(lock, wait, [&] { return stop.load(std::memory_order_relaxed); });
  }
  void Wake() {
    std::lock_guard lock(mu_);
    cv_.notify_all();
  }

 private:
  const double rate_;
  const double burst_;
  std::mutex mu_;
  std::condition_variable cv_;
  double tokens_;          // guarded by mu_
  Clock::time_point last_; // guarded by mu_
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Payload buffers of one size, reused. gRPC holds a buffer (through the
// slice that Wrap makes) until its bytes are on the socket, possibly after
// the write op completed and from any thread; the slice's destructor gives
// it back. Each outstanding slice keeps the pool alive.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  explicit BufferPool(size_t size) : size_(size) {}
  ~BufferPool() {
    for (uint8_t* b : free_) delete[] b;
  }
  size_t size() const { return size_; }
  uint8_t* Get() {
    {
      std::lock_guard lock(mu_);
      if (!free_.empty()) {
        uint8_t* b = free_.back();
        free_.pop_back();
        return b;
      }
    }
    return new uint8_t[size_];
  }
  void Put(uint8_t* b) {
    std::lock_guard lock(mu_);
    free_.push_back(b);
  }
  // A slice over buf[0, len) that returns buf to the pool when released.
  grpc::Slice Wrap(uint8_t* buf, size_t len) {
    auto* ref = new Ref{shared_from_this(), buf};
    return grpc::Slice(buf, len, &BufferPool::Release, ref);
  }

 private:
  struct Ref {
    std::shared_ptr<BufferPool> pool;
    uint8_t* buf;
  };
  static void Release(void* p) {
    Ref* ref = static_cast<Ref*>(p);
    ref->pool->Put(ref->buf);
    delete ref;
  }
  const size_t size_;
  std::mutex mu_;
  std::vector<uint8_t*> free_;  // guarded by mu_
};

// Completion-queue tags of a data stream's operations.
char kStartTag, kReadTag, kWriteTag, kWritesDoneTag, kFinishTag;

constexpr const char* kPagesMethod = "/pmlmig.proto.Migration/Pages";

// Whether nothing listens at `target` (defined below, beside Resolve).
bool ConnectionRefused(const std::string& target);

}  // namespace

class GrpcMigrationSink::Impl {
 public:
  explicit Impl(GrpcSinkOptions o) : options_(std::move(o)) {
    if (options_.max_bandwidth > 0) bucket_ = std::make_unique<TokenBucket>(options_.max_bandwidth);
  }
  ~Impl();

  Status Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory);
  Result<engine::TransferStats> SendPages(uint32_t round, engine::PageList& pages);
  Result<engine::FinalReply> Finish(const engine::FinalState& state);
  engine::CommitResult Commit();
  void Abort(const std::string& why);

  engine::TransferStats totals() const {
    std::lock_guard lock(mu_);
    return totals_;
  }
  const GrpcSinkOptions options_;

 private:
  enum class Phase { kNew, kReady, kSending, kPrepared, kCommitting, kDone, kBroken };

  struct Inflight {
    uint64_t sequence;
    uint64_t bytes;
    uint32_t pages;
  };

  // One Pages call. Between SendPages calls only the controlling thread
  // touches it; during SendPages only its own sender thread, except the
  // atomics the stall watch reads.
  struct DataStream {
    DataStream(uint32_t i, Compression c, int level, size_t buffer_bytes)
        : index(i), builder(c, level), pool(std::make_shared<BufferPool>(buffer_bytes)) {}
    const uint32_t index;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<grpc::TemplatedGenericStub<grpc::ByteBuffer, proto::BatchAck>> stub;
    grpc::ClientContext* ctx = nullptr;  // owned by contexts_
    grpc::CompletionQueue cq;            // declared before `call`: outlives it
    std::unique_ptr<grpc::ClientAsyncReaderWriter<grpc::ByteBuffer, proto::BatchAck>> call;
    // Operations in flight on `call` (at most one read and one write).
    bool read_pending = false;
    bool write_pending = false;
    bool writes_done_pending = false;
    bool finish_requested = false;
    bool finished = false;     // the Finish op completed: `final_status` is set
    bool broken = false;       // an operation failed: the call is over
    bool stray_ack = false;    // an ack arrived with nothing in flight
    bool cq_down = false;      // cq has been shut down and drained
    grpc::Status final_status;
    proto::BatchAck ack;       // target of the pending read
    grpc::ByteBuffer writing;  // the message being written
    grpc::ByteBuffer next;     // the next message, built ahead
    BatchBuilder builder;
    proto::PageBatch header;   // the next message's fields but the payload
    std::shared_ptr<BufferPool> pool;
    std::deque<Inflight> inflight;
    uint64_t inflight_bytes = 0;
    uint64_t next_sequence = 0;
    uint64_t pages_sent = 0;
    engine::TransferStats round_stats;
    // Written by the sender thread, read by the stall watch (relaxed: only a
    // timestamp and two flags; the watch tolerates a stale value for a tick).
    std::atomic<int64_t> last_progress_ns{0};
    std::atomic<bool> throttled{false};  // sleeping in the token bucket: not a stall
    std::atomic<bool> running{false};
  };

  Status DoBegin(const engine::MigrationSetup& setup);
  // Asks the receiver, on fresh connections, how the session ended, until
  // it answers or resolve_timeout passes. `lost` says why we ask.
  engine::CommitResult ResolveCommit(const Status& lost);
  // Adds the token to a call's metadata, when there is one.
  void Authorize(grpc::ClientContext& ctx) const;
  Status DoFinishStreams();
  void RunStream(DataStream& ds, uint32_t round, engine::PageList& pages);
  // Builds the batch of `chunk` into ds.next; returns its size on the wire.
  Result<uint64_t> BuildNext(DataStream& ds, const BatchHeader& h, std::span<const engine::PageRun> runs);
  // Waits for one operation of the stream to complete and handles it. False
  // when the call is over (an operation failed, or a bad ack).
  bool Pump(DataStream& ds);
  // Ends the stream's call (Finish) and waits until nothing is in flight;
  // returns the call's status.
  grpc::Status Settle(DataStream& ds);
  void StreamBroke(DataStream& ds);
  // Shuts the stream's completion queue down and drains it (before it is
  // destroyed).
  void Teardown(DataStream& ds);
  // Creates a context that is cancelled with all the others (at once if the
  // sink has already failed).
  grpc::ClientContext* NewContext();
  // Records the error (the first informative one wins: `weak` errors, such
  // as a call cancelled by the peer, give way to a later precise one) and
  // cancels every call.
  void Fail(const Status& s, bool weak = false);
  // The two halves of Fail. RecordFailure returns whether this was the first.
  bool RecordFailure(const Status& s, bool weak);
  void CancelAll();
  Status Failure() const {
    std::lock_guard lock(mu_);
    return failure_;
  }
  bool WriteControl(const proto::ControlRequest& req);
  Result<proto::ControlReply> WaitReply(std::chrono::milliseconds timeout, const std::string& what);
  // The control call's end status, waiting up to `timeout` for it.
  Status ControlEnd(std::chrono::milliseconds timeout, const std::string& what);
  void ReadControl();

  const engine::SlotTable* source_ = nullptr;
  uint64_t session_id_ = 0;
  std::unique_ptr<TokenBucket> bucket_;

  // Every call's context; declared before the calls so that they are
  // destroyed after them. Guarded by mu_ (set up and cancelled under it).
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;
  std::shared_ptr<grpc::Channel> control_channel_;
  std::unique_ptr<proto::Migration::Stub> control_stub_;
  std::unique_ptr<grpc::ClientReaderWriter<proto::ControlRequest, proto::ControlReply>> control_;
  std::thread control_reader_;
  // One writer at a time on control_ (the controlling thread or Abort).
  std::timed_mutex control_write_mu_;
  bool control_writes_done_ = false;  // guarded by control_write_mu_

  std::vector<std::unique_ptr<DataStream>> streams_;  // fixed after Begin

  // Set by Fail/Abort; read without the lock by the sender threads' loops.
  std::atomic<bool> stop_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  Phase phase_ = Phase::kNew;                                 // guarded by mu_
  bool control_started_ = false;                              // guarded by mu_
  bool failed_ = false;                                       // guarded by mu_
  bool cancelled_ = false;                                    // guarded by mu_
  bool failure_weak_ = false;                                 // guarded by mu_
  Status failure_;                                            // guarded by mu_
  bool aborted_ = false;                                      // guarded by mu_
  std::deque<proto::ControlReply> replies_;                   // guarded by mu_
  bool control_ended_ = false;                                // guarded by mu_
  grpc::Status control_status_;                               // guarded by mu_
  uint32_t running_streams_ = 0;                              // guarded by mu_
  int64_t last_round_ = -1;                                   // guarded by mu_
  engine::TransferStats totals_;                              // guarded by mu_
};

// ------------------------------------------------------------- plumbing

GrpcMigrationSink::Impl::~Impl() {
  bool done;
  {
    std::lock_guard lock(mu_);
    done = phase_ == Phase::kDone || phase_ == Phase::kNew;
  }
  if (!done) Abort("the sending side is shutting down");
  Fail(Aborted("sink destroyed"), true);  // cancels whatever is left
  if (control_reader_.joinable()) control_reader_.join();
  for (auto& ds : streams_) Teardown(*ds);
}

void GrpcMigrationSink::Impl::Authorize(grpc::ClientContext& ctx) const {
  if (!options_.security.token.empty()) ctx.AddMetadata("authorization", "Bearer " + options_.security.token);
}

grpc::ClientContext* GrpcMigrationSink::Impl::NewContext() {
  std::lock_guard lock(mu_);
  contexts_.push_back(std::make_unique<grpc::ClientContext>());
  grpc::ClientContext* ctx = contexts_.back().get();
  Authorize(*ctx);
  if (failed_ || cancelled_) ctx->TryCancel();
  return ctx;
}

bool GrpcMigrationSink::Impl::RecordFailure(const Status& s, bool weak) {
  std::lock_guard lock(mu_);
  if (!failed_ || (failure_weak_ && !weak)) {
    failure_ = s;
    failure_weak_ = weak;
  }
  const bool first = !failed_;
  failed_ = true;
  stop_.store(true, std::memory_order_relaxed);
  cv_.notify_all();
  return first;
}

void GrpcMigrationSink::Impl::CancelAll() {
  {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    // TryCancel is thread-safe and idempotent; it makes every blocked read
    // or write on the call return false.
    for (auto& ctx : contexts_) ctx->TryCancel();
    cv_.notify_all();
  }
  if (bucket_) bucket_->Wake();
}

void GrpcMigrationSink::Impl::Fail(const Status& s, bool weak) {
  RecordFailure(s, weak);
  CancelAll();
}

bool GrpcMigrationSink::Impl::WriteControl(const proto::ControlRequest& req) {
  std::lock_guard lock(control_write_mu_);
  if (control_writes_done_) return false;
  return control_->Write(req);
}

void GrpcMigrationSink::Impl::ReadControl() {
  proto::ControlReply reply;
  while (control_->Read(&reply)) {
    std::lock_guard lock(mu_);
    replies_.push_back(std::move(reply));
    reply.Clear();
    cv_.notify_all();
  }
  // Read returned false: the receiver ended the call (or it was cancelled,
  // or the connection died); nothing more will arrive, so Finish is safe.
  grpc::Status st = control_->Finish();
  std::lock_guard lock(mu_);
  control_ended_ = true;
  control_status_ = std::move(st);
  cv_.notify_all();
}

Result<proto::ControlReply> GrpcMigrationSink::Impl::WaitReply(std::chrono::milliseconds timeout,
                                                               const std::string& what) {
  std::unique_lock lock(mu_);
  const bool got = cv_.wait_for(lock, timeout, [&] { return !replies_.empty() || control_ended_ || failed_; });
  if (failed_) return failure_;
  if (!replies_.empty()) {
    proto::ControlReply r = std::move(replies_.front());
    replies_.pop_front();
    return r;
  }
  if (control_ended_) {
    Status s = FromGrpc(control_status_, "receiver ended the migration while " + what);
    if (s.ok()) s = Internal("receiver closed the control stream while " + what);
    lock.unlock();
    Fail(s);
    return s;
  }
  (void)got;
  lock.unlock();
  Status s = Unavailable("no answer from " + options_.target + " within " + Seconds(timeout) + " while " + what);
  Fail(s);
  return Failure();
}

Status GrpcMigrationSink::Impl::ControlEnd(std::chrono::milliseconds timeout, const std::string& what) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return control_ended_; })) {
    return Unavailable("receiver did not close the control stream within " + Seconds(timeout) + " after " + what);
  }
  return FromGrpc(control_status_, "control stream");
}

// ------------------------------------------------------------- Begin

Status GrpcMigrationSink::Impl::Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory) {
  {
    std::lock_guard lock(mu_);
    if (failed_) return failure_;
    if (phase_ != Phase::kNew) return InvalidArgument("GrpcMigrationSink::Begin: called twice");
    phase_ = Phase::kSending;  // Abort may now run concurrently
  }
  source_ = &source_memory;
  if (Status s = DoBegin(setup); !s.ok()) Fail(s);
  std::lock_guard lock(mu_);
  if (failed_) {
    phase_ = Phase::kBroken;
    return failure_;
  }
  phase_ = Phase::kReady;
  return Status::Ok();
}

Status GrpcMigrationSink::Impl::DoBegin(const engine::MigrationSetup& setup) {
  const std::string where = "migration to " + options_.target;
  // Connect everything first: control on connection 0, stream i on i + 1.
  control_channel_ = MakeChannel(options_, 0);
  for (uint32_t i = 0; i < options_.streams; ++i) {
    auto ds = std::make_unique<DataStream>(i, options_.compress, options_.zstd_level,
                                           uint64_t{options_.batch_pages} << engine::kPageShift);
    ds->channel = MakeChannel(options_, static_cast<int>(i) + 1);
    streams_.push_back(std::move(ds));
  }
  auto connect = [&](grpc::Channel& ch, const std::string& which) -> Status {
    // gRPC retries a refused port (with backoff) until the deadline; once it
    // reports a failed attempt, ask whether the port refuses connections and
    // say so at once. Anything else (no answer, a TLS handshake that fails)
    // waits for connect_timeout.
    const auto deadline = std::chrono::system_clock::now() + options_.connect_timeout;
    bool connected = false;
    for (grpc_connectivity_state st = ch.GetState(true);; st = ch.GetState(true)) {
      if (st == GRPC_CHANNEL_READY) {
        connected = true;
        break;
      }
      if (st == GRPC_CHANNEL_TRANSIENT_FAILURE && ConnectionRefused(options_.target)) {
        return Unavailable("connection refused to " + options_.target + " (" + which +
                           "): nothing listens on that port");
      }
      if (!ch.WaitForStateChange(st, deadline)) break;
    }
    if (connected) return Status::Ok();
    return Unavailable("connect to " + options_.target + " (" + which + "): no connection within " +
                       Seconds(options_.connect_timeout) +
                       (options_.security.tls()
                            ? " (with TLS: is the receiver using TLS, is its certificate signed by this side's TLS CA and "
                              "issued for the host you connect to, and does it accept this side's certificate?)"
                            : " (is a receiver listening there? One that demands TLS looks like this to a sender "
                              "without TLS)"));
  };
  PMLMIG_RETURN_IF_ERROR(connect(*control_channel_, "control"));
  for (auto& ds : streams_) {
    PMLMIG_RETURN_IF_ERROR(connect(*ds->channel, "stream " + std::to_string(ds->index)));
  }

  control_stub_ = proto::Migration::NewStub(control_channel_);
  grpc::ClientContext* cctx = NewContext();
  control_ = control_stub_->Control(cctx);
  control_reader_ = std::thread([this] { ReadControl(); });
  {
    std::lock_guard lock(mu_);
    control_started_ = true;
  }

  // Hello.
  proto::ControlRequest req;
  req.mutable_hello()->set_version(kProtocolVersion);
  req.mutable_hello()->set_sender(options_.sender_name);
  if (!WriteControl(req)) return ControlEnd(options_.connect_timeout, "Hello").WithContext(where);
  PMLMIG_ASSIGN_OR_RETURN(proto::ControlReply hello, WaitReply(options_.setup_timeout, "waiting for HelloReply"));
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
  // XXH3 when the receiver takes it (0.4+), else the XXH64 every receiver takes.
  Checksum checksum = Checksum::kXxh64;
  for (int c : hello.hello().checksums()) {
    if (c == proto::BATCH_CHECKSUM_XXH3) checksum = Checksum::kXxh3;
  }
  for (auto& ds : streams_) ds->builder.set_checksum(checksum);

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
  if (!WriteControl(req)) return ControlEnd(options_.connect_timeout, "Setup").WithContext(where);
  PMLMIG_ASSIGN_OR_RETURN(proto::ControlReply sr, WaitReply(options_.setup_timeout, "waiting for the VM to be built"));
  if (!sr.has_setup()) return InvalidArgument(where + ": receiver answered Setup with something else");

  // The data streams; the receiver attaches each at its first batch. Each
  // keeps a read posted for acks from here on.
  for (auto& ds : streams_) {
    ds->stub = std::make_unique<grpc::TemplatedGenericStub<grpc::ByteBuffer, proto::BatchAck>>(ds->channel);
    ds->ctx = NewContext();
    ds->call = ds->stub->PrepareCall(ds->ctx, kPagesMethod, &ds->cq);
    if (!ds->call) return Internal("stream " + std::to_string(ds->index) + ": cannot create the call");
    ds->call->StartCall(&kStartTag);
    void* tag;
    bool ok;
    if (!ds->cq.Next(&tag, &ok) || tag != &kStartTag || !ok) {
      ds->broken = true;
      return Unavailable("stream " + std::to_string(ds->index) + " to " + options_.target + ": cannot start the call");
    }
    ds->call->Read(&ds->ack, &kReadTag);
    ds->read_pending = true;
  }
  return Status::Ok();
}

// ------------------------------------------------------------- SendPages

Result<engine::TransferStats> GrpcMigrationSink::Impl::SendPages(uint32_t round, engine::PageList& pages) {
  {
    std::lock_guard lock(mu_);
    if (failed_) return failure_;
    if (phase_ != Phase::kReady) return InvalidArgument("GrpcMigrationSink::SendPages: not between Begin and Finish");
    if (static_cast<int64_t>(round) < last_round_) {
      return InvalidArgument("GrpcMigrationSink::SendPages: round " + std::to_string(round) + " after round " +
                             std::to_string(last_round_));
    }
    last_round_ = round;
    phase_ = Phase::kSending;
    running_streams_ = static_cast<uint32_t>(streams_.size());
  }
  std::vector<std::thread> threads;
  threads.reserve(streams_.size());
  for (auto& ds : streams_) {
    ds->round_stats = {};
    ds->last_progress_ns.store(NowNs(), std::memory_order_relaxed);
    ds->running.store(true, std::memory_order_relaxed);
    threads.emplace_back([this, d = ds.get(), round, &pages] { RunStream(*d, round, pages); });
  }

  // Stall watch: a stream that is neither finished nor throttled and has
  // made no progress (no write completed, no ack) for stall_timeout fails
  // the migration; cancelling its call unblocks it.
  const auto tick = std::clamp(options_.stall_timeout / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(500));
  {
    std::unique_lock lock(mu_);
    while (!cv_.wait_for(lock, tick, [&] { return running_streams_ == 0; })) {
      if (failed_) continue;  // the cancel is on its way
      const int64_t now = NowNs();
      for (auto& ds : streams_) {
        if (!ds->running.load(std::memory_order_relaxed) || ds->throttled.load(std::memory_order_relaxed)) continue;
        const auto idle = std::chrono::nanoseconds(now - ds->last_progress_ns.load(std::memory_order_relaxed));
        if (idle > options_.stall_timeout) {
          lock.unlock();
          Fail(Unavailable("stream " + std::to_string(ds->index) + " to " + options_.target + ": no progress for " +
                           Seconds(std::chrono::duration_cast<std::chrono::milliseconds>(idle)) +
                           " (receiver stalled or unreachable)"));
          lock.lock();
          break;
        }
      }
    }
  }
  for (std::thread& t : threads) t.join();

  engine::TransferStats round_stats;
  for (auto& ds : streams_) round_stats += ds->round_stats;
  std::lock_guard lock(mu_);
  totals_ += round_stats;  // a failed round's part too: totals() says what went out
  if (failed_) {
    phase_ = Phase::kBroken;
    return failure_;
  }
  phase_ = Phase::kReady;
  return round_stats;
}

Result<uint64_t> GrpcMigrationSink::Impl::BuildNext(DataStream& ds, const BatchHeader& h,
                                                     std::span<const engine::PageRun> runs) {
  uint8_t* buf = ds.pool->Get();
  size_t len = 0;
  if (Status s = ds.builder.Build(*source_, runs, h, &ds.header, buf, &len); !s.ok()) {
    ds.pool->Put(buf);
    return s;
  }
  // [fields but the payload][payload tag and length] in one small slice,
  // then the payload itself: a valid PageBatch, the payload not copied.
  const size_t hlen = ds.header.ByteSizeLong();
  uint8_t prefix[16];
  const size_t plen = len > 0 ? EncodePayloadPrefix(len, prefix) : 0;
  grpc_slice head = grpc_slice_malloc(hlen + plen);
  ds.header.SerializeWithCachedSizesToArray(GRPC_SLICE_START_PTR(head));
  std::memcpy(GRPC_SLICE_START_PTR(head) + hlen, prefix, plen);
  grpc::Slice slices[2] = {grpc::Slice(head, grpc::Slice::STEAL_REF), grpc::Slice()};
  if (len > 0) {
    slices[1] = ds.pool->Wrap(buf, len);
  } else {
    ds.pool->Put(buf);
  }
  ds.next = grpc::ByteBuffer(slices, len > 0 ? 2 : 1);
  return hlen + plen + len;
}

bool GrpcMigrationSink::Impl::Pump(DataStream& ds) {
  void* tag;
  bool ok;
  if (!ds.cq.Next(&tag, &ok)) {
    ds.cq_down = true;
    ds.broken = true;
    return false;
  }
  if (tag == &kReadTag) {
    ds.read_pending = false;
    if (!ok) {
      ds.broken = true;  // the receiver ended the call, or it was cancelled
      return false;
    }
    ds.last_progress_ns.store(NowNs(), std::memory_order_relaxed);
    if (ds.inflight.empty()) {
      ds.stray_ack = true;
      return false;
    }
    const Inflight& f = ds.inflight.front();
    if (ds.ack.sequence() != f.sequence || ds.ack.pages() != f.pages) {
      Fail(DataLoss("stream " + std::to_string(ds.index) + ": receiver acknowledged batch " +
                    std::to_string(ds.ack.sequence()) + " (" + std::to_string(ds.ack.pages()) +
                    " pages), expected batch " + std::to_string(f.sequence) + " (" + std::to_string(f.pages) +
                    " pages)"));
      return false;
    }
    ds.inflight_bytes -= f.bytes;
    ds.inflight.pop_front();
    ds.call->Read(&ds.ack, &kReadTag);
    ds.read_pending = true;
    return true;
  }
  if (tag == &kWriteTag) {
    ds.write_pending = false;
    ds.writing.Clear();
    if (!ok) {
      ds.broken = true;
      return false;
    }
    ds.last_progress_ns.store(NowNs(), std::memory_order_relaxed);
    return true;
  }
  if (tag == &kWritesDoneTag) {
    ds.writes_done_pending = false;
    if (!ok) ds.broken = true;
    return ok;
  }
  if (tag == &kFinishTag) {
    ds.finished = true;
    return true;
  }
  return true;
}

grpc::Status GrpcMigrationSink::Impl::Settle(DataStream& ds) {
  if (!ds.call) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the call was never started");
  if (!ds.finish_requested) {
    ds.call->Finish(&ds.final_status, &kFinishTag);
    ds.finish_requested = true;
  }
  // Finish completes once the receiver has ended the call (or it is
  // cancelled); a pending read then fails, and a write completes either way.
  while (!ds.finished || ds.read_pending || ds.write_pending || ds.writes_done_pending) {
    (void)Pump(ds);
    if (ds.cq_down) break;
  }
  return ds.final_status;
}

void GrpcMigrationSink::Impl::Teardown(DataStream& ds) {
  if (ds.call && !ds.finished) (void)Settle(ds);  // every call was cancelled by now
  if (ds.cq_down) return;
  ds.cq.Shutdown();
  void* tag;
  bool ok;
  while (ds.cq.Next(&tag, &ok)) {
  }
  ds.cq_down = true;
}

void GrpcMigrationSink::Impl::RunStream(DataStream& ds, uint32_t round, engine::PageList& pages) {
  const std::string name = "stream " + std::to_string(ds.index);
  bool exhausted = false;  // the PageList has nothing more for us
  bool have_next = false;  // ds.next holds a built batch
  uint64_t next_bytes = 0;
  uint32_t next_pages = 0;
  uint64_t next_data = 0;
  bool broken = false;
  engine::PageRun chunk;
  std::vector<engine::PageRun> gathered;
  gathered.reserve(options_.batch_pages);
  while (!stop_.load(std::memory_order_relaxed)) {
    if (!have_next && !exhausted) {
      // Gather runs until the batch is full: scattered dirty pages would
      // otherwise travel as one or two pages per message.
      gathered.clear();
      uint64_t gathered_pages = 0;
      while (gathered_pages < options_.batch_pages && pages.Next(options_.batch_pages - gathered_pages, &chunk)) {
        gathered.push_back(chunk);
        gathered_pages += chunk.pages;
      }
      if (gathered.empty()) {
        exhausted = true;
      } else {
        chunk.pages = gathered_pages;
        Result<uint64_t> bytes = BuildNext(ds, BatchHeader{session_id_, ds.index, round, ds.next_sequence}, gathered);
        if (!bytes.ok()) {
          Fail(bytes.status().WithContext(name));
          break;
        }
        have_next = true;
        next_bytes = *bytes;
        next_pages = static_cast<uint32_t>(chunk.pages);
        next_data = ds.header.uncompressed_length();
      }
    }
    // Write the next batch when the previous write is done and the acks
    // allow it: at most max_inflight_bytes unacknowledged (backpressure),
    // but always at least one batch however large.
    if (have_next && !ds.write_pending &&
        (ds.inflight.empty() || ds.inflight_bytes + next_bytes <= options_.max_inflight_bytes)) {
      if (bucket_) {
        ds.throttled.store(true, std::memory_order_relaxed);
        const bool ok = bucket_->Acquire(next_bytes, stop_);
        ds.throttled.store(false, std::memory_order_relaxed);
        ds.last_progress_ns.store(NowNs(), std::memory_order_relaxed);
        if (!ok) break;
      }
      ds.writing.Swap(&ds.next);
      ds.next.Clear();
      ds.call->Write(ds.writing, &kWriteTag);
      ds.write_pending = true;
      have_next = false;
      ds.inflight.push_back({ds.next_sequence, next_bytes, next_pages});
      ds.inflight_bytes += next_bytes;
      ++ds.next_sequence;
      ds.pages_sent += next_pages;
      const uint64_t data_pages = next_data >> engine::kPageShift;
      ds.round_stats.pages += next_pages;
      ds.round_stats.normal_pages += data_pages;
      ds.round_stats.zero_pages += next_pages - data_pages;
      ds.round_stats.payload_bytes += next_data;
      ds.round_stats.wire_bytes += next_bytes;
      ++ds.round_stats.batches;
      continue;
    }
    if (!have_next && exhausted && ds.inflight.empty() && !ds.write_pending) break;  // round done
    if (!Pump(ds)) {
      broken = true;
      break;
    }
  }
  ds.next.Clear();
  if (broken) StreamBroke(ds);
  ds.running.store(false, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  --running_streams_;
  cv_.notify_all();
}

void GrpcMigrationSink::Impl::StreamBroke(DataStream& ds) {
  // The call is over (the receiver refused a batch, the connection died,
  // or we cancelled it), or the receiver misbehaved: make sure it is over,
  // then its status says why, e.g. "batch 17: run 0: gpa ... outside guest
  // memory".
  const std::string name = "stream " + std::to_string(ds.index) + " to " + options_.target;
  if (ds.stray_ack) Fail(DataLoss(name + ": acknowledgement for a batch never sent"));
  if (!ds.broken) Fail(Internal(name + ": call ended"), true);
  const grpc::Status st = Settle(ds);
  if (st.ok()) {
    Fail(Internal(name + ": receiver closed the stream early"), true);
  } else {
    Fail(FromGrpc(st, name), st.error_code() == grpc::StatusCode::CANCELLED);
  }
}

// ------------------------------------------------------------- Finish

Status GrpcMigrationSink::Impl::DoFinishStreams() {
  // Closing the data streams first: a stream's OK status means the receiver
  // saw its end after applying (and acknowledging) every batch on it.
  std::atomic<bool> closed{false};
  std::mutex m;
  std::condition_variable cv;
  std::thread watch([&] {
    std::unique_lock lock(m);
    if (!cv.wait_for(lock, options_.stall_timeout, [&] { return closed.load(); })) {
      Fail(Unavailable("closing the data streams to " + options_.target + ": no answer within " +
                       Seconds(options_.stall_timeout)));
    }
  });
  Status result;
  for (auto& ds : streams_) {
    if (ds->finished) continue;
    if (!ds->broken) {
      ds->call->WritesDone(&kWritesDoneTag);
      ds->writes_done_pending = true;
    }
    const grpc::Status st = Settle(*ds);
    const std::string name = "stream " + std::to_string(ds->index);
    if (!st.ok() && result.ok()) result = FromGrpc(st, name);
    if (ds->stray_ack && result.ok()) result = DataLoss(name + ": acknowledgement for a batch never sent");
  }
  {
    std::lock_guard lock(m);
    closed = true;
    cv.notify_all();
  }
  watch.join();
  return result;
}

Result<engine::FinalReply> GrpcMigrationSink::Impl::Finish(const engine::FinalState& state) {
  {
    std::lock_guard lock(mu_);
    if (failed_) return failure_;
    if (phase_ != Phase::kReady) return InvalidArgument("GrpcMigrationSink::Finish: not after Begin");
    phase_ = Phase::kSending;
  }
  auto fail = [&](const Status& s) -> Status {
    Fail(s);
    std::lock_guard lock(mu_);
    phase_ = Phase::kBroken;
    return failure_;
  };
  if (state.vm_state.size() > kMaxVmStateBytes) {
    return fail(InvalidArgument("final state of " + std::to_string(state.vm_state.size()) + " bytes exceeds " +
                                std::to_string(kMaxVmStateBytes)));
  }
  if (Status s = DoFinishStreams(); !s.ok()) return fail(s);
  if (Status s = Failure(); !s.ok()) return fail(s);

  proto::ControlRequest req;
  proto::Final* f = req.mutable_final();
  f->set_vm_state(state.vm_state.data(), state.vm_state.size());
  f->set_has_digest(state.has_digest);
  f->set_memory_digest(state.memory_digest);
  f->set_source_paused_ms(state.source_paused_ms);
  *f->mutable_chunk_digests() = {state.chunk_digests.begin(), state.chunk_digests.end()};
  f->set_chunk_bytes(state.chunk_bytes);
  for (auto& ds : streams_) {
    proto::StreamTotals* t = f->add_streams();
    t->set_stream(ds->index);
    t->set_batches(ds->next_sequence);
    t->set_pages(ds->pages_sent);
  }
  if (!WriteControl(req)) return fail(ControlEnd(options_.connect_timeout, "Final"));
  auto reply = WaitReply(options_.final_timeout, "waiting for the target to restore the VM");
  if (!reply.ok()) return fail(reply.status());
  if (!reply->has_final()) return fail(InvalidArgument("receiver answered Final with something else"));
  if (!reply->final().prepared()) return fail(Internal("receiver answered Final without preparing the VM"));

  engine::FinalReply out;
  out.prepared = true;
  out.verified = reply->final().verified();
  out.verify_detail = reply->final().verify_detail();
  out.target_restore_ms = reply->final().target_restore_ms();
  out.source_paused_ms = reply->final().source_paused_ms();
  out.chunk_digests.assign(reply->final().chunk_digests().begin(), reply->final().chunk_digests().end());
  out.chunk_bytes = reply->final().chunk_bytes();
  std::lock_guard lock(mu_);
  if (failed_) return failure_;
  phase_ = Phase::kPrepared;
  return out;
}

engine::CommitResult GrpcMigrationSink::Impl::Commit() {
  engine::CommitResult result;
  {
    std::lock_guard lock(mu_);
    if (phase_ != Phase::kPrepared || failed_) {
      // Nothing was sent: the receiver cannot run the VM.
      result.state = engine::CommitState::kNotCommitted;
      result.detail = failed_ ? failure_ : InvalidArgument("GrpcMigrationSink::Commit: not after a successful Finish");
      return result;
    }
    phase_ = Phase::kCommitting;  // from here Abort does nothing
  }
  proto::ControlRequest req;
  req.mutable_commit();
  Status lost;
  if (!WriteControl(req)) {
    lost = Unavailable("the control stream broke while sending Commit");
  } else {
    auto reply = WaitReply(options_.commit_timeout, "waiting for the target to resume the VM");
    if (reply.ok() && reply->has_commit()) {
      result.state = engine::CommitState::kCommitted;
      result.target_resume_ms = reply->commit().target_resume_ms();
      {
        std::lock_guard lock(control_write_mu_);
        control_->WritesDone();
        control_writes_done_ = true;
      }
      (void)ControlEnd(options_.abort_grace, "Commit");
      std::lock_guard lock(mu_);
      phase_ = Phase::kDone;
      return result;
    }
    lost = reply.ok() ? InvalidArgument("receiver answered Commit with something else") : reply.status();
  }
  CancelAll();
  result = ResolveCommit(lost);
  std::lock_guard lock(mu_);
  phase_ = result.state == engine::CommitState::kCommitted ? Phase::kDone : Phase::kBroken;
  return result;
}

namespace {

// Whether nothing listens at `target` ("host:port"): every address of the
// host actively refuses a TCP connection. A timeout or any other error is
// not a refusal.
bool ConnectionRefused(const std::string& target) {
  std::string host, port;
  if (!SplitHostPort(target, &host, &port)) return false;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) return false;
  bool all_refused = true;
  for (addrinfo* ai = res; ai != nullptr && all_refused; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) {
      all_refused = false;
      break;
    }
    int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      if (::poll(&p, 1, 1000) == 1) {
        socklen_t len = sizeof err;
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      } else {
        err = ETIMEDOUT;
      }
    }
    if (err != ECONNREFUSED) all_refused = false;
  }
  freeaddrinfo(res);
  return all_refused;
}

}  // namespace

engine::CommitResult GrpcMigrationSink::Impl::ResolveCommit(const Status& lost) {
  engine::CommitResult result;
  result.resolved = true;
  const auto deadline = Clock::now() + options_.resolve_timeout;
  std::string last = lost.message();
  for (int attempt = 0; Clock::now() < deadline; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    auto channel = MakeChannel(options_, 1000 + attempt);  // a fresh connection each time
    auto stub = proto::Migration::NewStub(channel);
    grpc::ClientContext ctx;
    Authorize(ctx);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    proto::ResolveRequest req;
    req.set_session_id(session_id_);
    proto::ResolveReply rep;
    const grpc::Status st = stub->Resolve(&ctx, req, &rep);
    if (st.ok()) {
      if (rep.outcome() == proto::ResolveReply::COMMITTED) {
        result.state = engine::CommitState::kCommitted;
        return result;
      }
      result.state = engine::CommitState::kNotCommitted;
      result.detail = Aborted("the commit's answer was lost (" + lost.message() + "); the receiver says: " +
                              rep.detail());
      return result;
    }
    if (st.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
        st.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      last = FromGrpc(st, "resolve").message();
      break;  // asking again will not help
    }
    last = FromGrpc(st, "resolve").message();
    if (ConnectionRefused(options_.target)) {
      result.state = engine::CommitState::kNotCommitted;
      result.detail = Aborted("the commit's answer was lost (" + lost.message() + ") and " + options_.target +
                              " now refuses connections: no receiver process there runs the VM");
      return result;
    }
  }
  result.state = engine::CommitState::kInDoubt;
  result.detail = Unavailable(
      "switch-over in doubt: Commit was sent but its answer was lost (" + lost.message() +
      "), and the receiver could not be asked within " + Seconds(options_.resolve_timeout) + " (last: " + last +
      "). The VM may be running on the target, so it stays paused here; find out on the target before resuming it");
  return result;
}

// ------------------------------------------------------------- Abort

void GrpcMigrationSink::Impl::Abort(const std::string& why) {
  bool tell;
  {
    std::lock_guard lock(mu_);
    if (aborted_ || phase_ == Phase::kDone || phase_ == Phase::kCommitting) return;
    aborted_ = true;
    tell = control_started_ && !control_ended_ && !cancelled_;
  }
  // Recorded first, so a SendPages whose streams stop now reports the abort
  // rather than a partial round.
  RecordFailure(Aborted("migration aborted: " + why), false);
  if (bucket_) bucket_->Wake();
  if (tell) {
    // Best effort, bounded: another writer may hold the control stream, or
    // the receiver may not read; then the cancel below speaks for us.
    std::unique_lock wl(control_write_mu_, std::defer_lock);
    if (wl.try_lock_for(options_.abort_grace) && !control_writes_done_) {
      proto::ControlRequest req;
      req.mutable_abort()->set_reason(why);
      if (control_->Write(req)) {
        control_->WritesDone();
        control_writes_done_ = true;
        wl.unlock();
        (void)ControlEnd(options_.abort_grace, "Abort");
      }
    }
  }
  CancelAll();
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
engine::TransferStats GrpcMigrationSink::totals() const { return impl_->totals(); }
const GrpcSinkOptions& GrpcMigrationSink::options() const { return impl_->options_; }

}  // namespace pmlmig::transport
