#include "pmlmig/transport/control.h"
#include "pmlmig/transport/handover.h"
#include "pmlmig/engine/snapshot_sink.h"

#include <cmath>

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mutex>

#include "control.grpc.pb.h"
#include "grpc_status.h"

namespace pmlmig::transport {
namespace {

Status FromGrpc(const grpc::Status& s, const std::string& path) {
  if (s.ok()) return Status::Ok();
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return Unavailable("control socket " + path + ": no VM answers there (" + s.error_message() + ")");
  }
  return Status(CodeFromGrpc(s.error_code()), s.error_message());
}

class Service final : public proto::Control::Service {
 public:
  explicit Service(ControlHandler& handler) : handler_(handler) {}

  grpc::Status Migrate(grpc::ServerContext*, const proto::MigrateRequest* r, proto::MigrateReply*) override {
    MigrateCommand c;
    c.to = r->to();
    c.streams = r->streams();
    c.compress = r->compress();
    c.max_bandwidth = r->max_bandwidth();
    c.downtime_limit_ms = r->downtime_limit_ms();
    c.max_rounds = r->max_rounds();
    c.timeout_ms = r->timeout_ms();
    c.force_on_timeout = r->force_on_timeout();
    c.verify = r->verify();
    c.verify_order = r->verify_before_commit() ? engine::VerifyOrder::kBeforeCommit : engine::VerifyOrder::kAfterCommit;
    c.tls_ca = r->tls_ca();
    c.tls_cert = r->tls_cert();
    c.tls_key = r->tls_key();
    c.tls_server_name = r->tls_server_name();
    c.token_file = r->token_file();
    switch (r->converge()) {
      case proto::CONVERGE_NONE: c.aid = engine::ConvergeAid::kNone; break;
      case proto::CONVERGE_DIRTY_LIMIT: c.aid = engine::ConvergeAid::kDirtyLimit; break;
      case proto::CONVERGE_AUTO: c.aid = engine::ConvergeAid::kAutoConverge; break;
      default:
        return ToGrpc(InvalidArgument("migrate: unknown converge aid " + std::to_string(r->converge()) +
                                      " (this VM knows none, dirty-limit and auto-converge)"));
    }
    c.dirty_limit_pages_per_s = r->dirty_limit_pages_per_s();
    if (!(c.dirty_limit_pages_per_s >= 0) || !std::isfinite(c.dirty_limit_pages_per_s)) {
      return ToGrpc(InvalidArgument("migrate: the dirty limit must be a finite rate >= 0"));
    }
    if (c.dirty_limit_pages_per_s > 0 && c.aid != engine::ConvergeAid::kDirtyLimit) {
      return ToGrpc(InvalidArgument("migrate: a dirty limit was given without the dirty-limit aid"));
    }
    if (r->has_stall_rounds()) c.stall_rounds = r->stall_rounds();
    if (r->has_postcopy_recovery_ms()) c.postcopy_recovery_ms = r->postcopy_recovery_ms();
    c.local = r->local();
    c.grpc_data = r->grpc_data();
    c.snapshot_to = r->snapshot_to();
    c.live = r->snapshot_live();
    c.snapshot_stop = r->snapshot_stop();
    switch (r->postcopy()) {
      case proto::POSTCOPY_OFF: c.postcopy = engine::PostcopyMode::kOff; break;
      case proto::POSTCOPY_AUTO: c.postcopy = engine::PostcopyMode::kAuto; break;
      case proto::POSTCOPY_NOW: c.postcopy = engine::PostcopyMode::kNow; break;
      default:
        return ToGrpc(InvalidArgument("migrate: unknown post-copy mode " + std::to_string(r->postcopy()) +
                                      " (this VM knows off, auto and now)"));
    }
    return ToGrpc(handler_.StartMigration(c));
  }
  grpc::Status Status(grpc::ServerContext*, const proto::StatusRequest*, proto::StatusReply* out) override {
    const ControlStatus s = handler_.GetStatus();
    out->set_vm(s.vm);
    out->set_pages_written(s.pages_written);
    out->set_migration(s.migration);
    out->set_phase(s.phase);
    out->set_round(s.round);
    out->set_remaining_pages(s.remaining_pages);
    out->set_bandwidth_mbps(s.bandwidth_mbps);
    out->set_expected_downtime_ms(s.expected_downtime_ms);
    out->set_sent_bytes(s.sent_bytes);
    out->set_elapsed_ms(s.elapsed_ms);
    out->set_error(s.error);
    out->set_stats_json(s.stats_json);
    out->set_throttle_pct(s.throttle_pct);
    out->set_vcpu_quota_pages_per_s(s.vcpu_quota_pages_per_s);
    out->set_postcopy_requests(s.postcopy_requests);
    for (const engine::VcpuRate& v : s.vcpus) {
      proto::VcpuRate* o = out->add_vcpus();
      o->set_dirty_pages_per_s(v.dirty_pages_per_s);
      o->set_entries_per_s(v.entries_per_s);
      o->set_quota_pages_per_s(v.quota_pages_per_s);
      o->set_held_ns(v.held_ns);
    }
    return grpc::Status::OK;
  }
  grpc::Status Cancel(grpc::ServerContext*, const proto::CancelRequest*, proto::CancelReply*) override {
    return ToGrpc(handler_.CancelMigration());
  }

 private:
  ControlHandler& handler_;
};

std::unique_ptr<proto::Control::Stub> Connect(const std::string& path) {
  return proto::Control::NewStub(grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials()));
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return ctx;
}

}  // namespace

class ControlServer::Impl {
 public:
  Impl(ControlHandler& handler, std::string path) : service(handler), socket_path(std::move(path)) {}
  ~Impl() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    ::unlink(socket_path.c_str());
  }
  Service service;
  std::string socket_path;
  std::unique_ptr<grpc::Server> server;
};

ControlServer::ControlServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlServer::~ControlServer() = default;

Result<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& path, ControlHandler& handler) {
  if (path.empty()) return InvalidArgument("control socket: empty path");
  if (::access(path.c_str(), F_OK) == 0) {
    return InvalidArgument("control socket " + path + ": the path exists (another VM's socket, or stale: remove it)");
  }
  auto impl = std::make_unique<Impl>(handler, path);
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix:" + path, grpc::InsecureServerCredentials());
  builder.RegisterService(&impl->service);
  // The socket is created by BuildAndStart: with this umask it is born 0600,
  // never briefly open to others.
  const mode_t old = ::umask(0077);
  impl->server = builder.BuildAndStart();
  ::umask(old);
  if (!impl->server) return Unavailable("control socket " + path + ": cannot listen on this unix socket");
  ::chmod(path.c_str(), 0600);
  return std::unique_ptr<ControlServer>(new ControlServer(std::move(impl)));
}

Status ControlMigrate(const std::string& path, const MigrateCommand& c) {
  proto::MigrateRequest r;
  r.set_to(c.to);
  r.set_streams(c.streams);
  r.set_compress(c.compress);
  r.set_max_bandwidth(c.max_bandwidth);
  r.set_downtime_limit_ms(c.downtime_limit_ms);
  r.set_max_rounds(c.max_rounds);
  r.set_timeout_ms(c.timeout_ms);
  r.set_force_on_timeout(c.force_on_timeout);
  r.set_verify(c.verify);
  r.set_verify_before_commit(c.verify_order == engine::VerifyOrder::kBeforeCommit);
  r.set_tls_ca(c.tls_ca);
  r.set_tls_cert(c.tls_cert);
  r.set_tls_key(c.tls_key);
  r.set_tls_server_name(c.tls_server_name);
  r.set_token_file(c.token_file);
  r.set_converge(c.aid == engine::ConvergeAid::kDirtyLimit     ? proto::CONVERGE_DIRTY_LIMIT
                 : c.aid == engine::ConvergeAid::kAutoConverge ? proto::CONVERGE_AUTO
                                                               : proto::CONVERGE_NONE);
  r.set_dirty_limit_pages_per_s(c.dirty_limit_pages_per_s);
  r.set_stall_rounds(c.stall_rounds);
  r.set_postcopy_recovery_ms(c.postcopy_recovery_ms);
  r.set_local(c.local);
  r.set_grpc_data(c.grpc_data);
  r.set_snapshot_to(c.snapshot_to);
  r.set_snapshot_live(c.live);
  r.set_snapshot_stop(c.snapshot_stop);
  r.set_postcopy(c.postcopy == engine::PostcopyMode::kAuto  ? proto::POSTCOPY_AUTO
                 : c.postcopy == engine::PostcopyMode::kNow ? proto::POSTCOPY_NOW
                                                            : proto::POSTCOPY_OFF);
  proto::MigrateReply reply;
  auto ctx = Context();
  return FromGrpc(Connect(path)->Migrate(ctx.get(), r, &reply), path);
}

Result<ControlStatus> ControlGetStatus(const std::string& path) {
  proto::StatusReply r;
  auto ctx = Context();
  PMLMIG_RETURN_IF_ERROR(FromGrpc(Connect(path)->Status(ctx.get(), proto::StatusRequest(), &r), path));
  ControlStatus s;
  s.vm = r.vm();
  s.pages_written = r.pages_written();
  s.migration = r.migration();
  s.phase = r.phase();
  s.round = r.round();
  s.remaining_pages = r.remaining_pages();
  s.bandwidth_mbps = r.bandwidth_mbps();
  s.expected_downtime_ms = r.expected_downtime_ms();
  s.sent_bytes = r.sent_bytes();
  s.elapsed_ms = r.elapsed_ms();
  s.error = r.error();
  s.stats_json = r.stats_json();
  s.throttle_pct = r.throttle_pct();
  s.vcpu_quota_pages_per_s = r.vcpu_quota_pages_per_s();
  s.postcopy_requests = r.postcopy_requests();
  for (const proto::VcpuRate& v : r.vcpus()) {
    engine::VcpuRate o;
    o.dirty_pages_per_s = v.dirty_pages_per_s();
    o.entries_per_s = v.entries_per_s();
    o.quota_pages_per_s = v.quota_pages_per_s();
    o.held_ns = v.held_ns();
    s.vcpus.push_back(o);
  }
  return s;
}

Status ControlCancel(const std::string& path) {
  proto::CancelReply reply;
  auto ctx = Context();
  return FromGrpc(Connect(path)->Cancel(ctx.get(), proto::CancelRequest(), &reply), path);
}

Result<GrpcSinkOptions> SinkOptionsFor(const MigrateCommand& c) {
  GrpcSinkOptions so;
  so.target = c.to;
  so.streams = c.streams;
  PMLMIG_ASSIGN_OR_RETURN(so.compress, ParseCompression(c.compress));
  so.max_bandwidth = c.max_bandwidth;
  so.postcopy_recovery = std::chrono::milliseconds(c.postcopy_recovery_ms);
  so.direct_data = !c.grpc_data;
  PMLMIG_ASSIGN_OR_RETURN(so.security, LoadTransportSecurity(c.tls_ca, c.tls_cert, c.tls_key, c.token_file,
                                                             c.tls_server_name));
  return so;
}

Result<std::unique_ptr<engine::MigrationSink>> SinkFor(const MigrateCommand& c) {
  if (!c.snapshot_to.empty()) {
    if (c.local || c.compress != "none" || c.max_bandwidth != 0 || !c.tls_ca.empty() || !c.tls_cert.empty() ||
        !c.token_file.empty() || c.postcopy != engine::PostcopyMode::kOff || c.verify) {
      return InvalidArgument("a snapshot goes to a file: a handover, compression, a bandwidth limit, TLS, tokens, "
                             "post-copy and verification do not apply (the file carries its own digests, checked "
                             "when it is restored)");
    }
    engine::SnapshotSinkOptions so;
    so.path = c.snapshot_to;
    PMLMIG_ASSIGN_OR_RETURN(auto sink, engine::SnapshotSink::Create(std::move(so)));
    return std::unique_ptr<engine::MigrationSink>(std::move(sink));
  }
  if (c.local) {
    PMLMIG_ASSIGN_OR_RETURN(std::string path, ParseUnixAddress(c.to));
    if (c.compress != "none" || c.max_bandwidth != 0 || !c.tls_ca.empty() || !c.tls_cert.empty() ||
        !c.token_file.empty()) {
      return InvalidArgument("a same-host handover sends no page: compression, a bandwidth limit, TLS and tokens "
                             "do not apply (the socket is private to this user)");
    }
    HandoverSinkOptions ho;
    ho.path = std::move(path);
    PMLMIG_ASSIGN_OR_RETURN(auto sink, HandoverSink::Create(std::move(ho)));
    return std::unique_ptr<engine::MigrationSink>(std::move(sink));
  }
  if (c.to.rfind("unix:", 0) == 0) {
    return InvalidArgument("'" + c.to + "' is a unix socket: only a same-host handover (local) uses one");
  }
  PMLMIG_ASSIGN_OR_RETURN(GrpcSinkOptions so, SinkOptionsFor(c));
  PMLMIG_ASSIGN_OR_RETURN(auto sink, GrpcMigrationSink::Create(std::move(so)));
  return std::unique_ptr<engine::MigrationSink>(std::move(sink));
}

engine::MigrationOptions MigrationOptionsFor(const MigrateCommand& c) {
  engine::MigrationOptions mo;
  mo.convergence.downtime_limit = std::chrono::milliseconds(c.downtime_limit_ms);
  mo.convergence.max_rounds = c.max_rounds;
  mo.convergence.timeout = std::chrono::milliseconds(c.timeout_ms);
  mo.convergence.force_on_timeout = c.force_on_timeout;
  mo.verify = c.verify;
  mo.verify_order = c.verify_order;
  mo.convergence.aid = c.aid;
  mo.convergence.dirty_limit = c.dirty_limit_pages_per_s;
  mo.convergence.stall_rounds = c.stall_rounds;
  mo.convergence.postcopy = c.postcopy;
  mo.live = c.snapshot_to.empty() || c.live;
  return mo;
}

}  // namespace pmlmig::transport
