// MigrationServer: the receiver of protocol version 2 (proto/migration.proto,
// whose header describes the state machine, the limits and the rejections).
// This file is the gRPC service and its lifecycle; the parts:
//   - Receiver (receiver.h): what every call shares, under one mutex (the
//     migration in progress, the outcomes, the ended sessions), and the
//     Session record;
//   - ReceiverSession (receiver_session.h): one Control call, the state
//     machine, one method per protocol message, with its deadline watchdog;
//   - PagesReactor (pages_reactor.h): one Pages call, which checks
//     (receiver_checks.h) and applies batches;
//   - PostcopyCall (postcopy_call.h): one Postcopy call, page requests out
//     and owed pages in, after a post-copy Commit;
//   - Resolve (below, answered by Receiver::Resolve) decides a PREPARED
//     session as discarded under the Receiver's lock, so it and a late
//     Commit never both win.
//
// gRPC programming models, one per kind of call: Control is synchronous
// (one thread per call running a sequence of blocking target calls: see
// receiver_session.h), Pages is a callback reactor (no thread of ours per
// stream, payload applied from gRPC's slices: see pages_reactor.h), Resolve
// is a synchronous unary call. Both Control and Pages are registered raw
// (ByteBuffer) so that the receiver parses the messages itself.
#include "pmlmig/transport/grpc_server.h"

#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/server_posix.h>

#include "batch_codec.h"
#include "grpc_status.h"
#include "migration.grpc.pb.h"
#include "pages_reactor.h"
#include "port_acceptor.h"
#include "postcopy_call.h"
#include "receiver.h"
#include "receiver_session.h"

namespace pmlmig::transport {

class MigrationServer::Impl final : public proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service> {
 public:
  using Base = proto::Migration::WithRawCallbackMethod_Pages<proto::Migration::Service>;
  using Base::Pages;    // the synchronous overload stays disabled
  using Base::Control;  // never called: method 0 (Control) gets the raw handler below
  Impl(TargetFactory factory, MigrationServerOptions options) : receiver_(std::move(factory), std::move(options)) {
    // Control as a synchronous call of ByteBuffers: the handler the
    // generated code would install, but without its protobuf parse.
    using RawStream = grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>;
    MarkMethodStreamed(0, new grpc::internal::TemplatedBidiStreamingHandler<RawStream, false>(
                              [this](grpc::ServerContext* ctx, RawStream* raw) {
                                ControlStream stream(raw);
                                return ReceiverSession(receiver_, ctx, &stream).Run();
                              }));
  }

  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Pages(grpc::CallbackServerContext* ctx) override {
    return new PagesReactor(receiver_, receiver_.Authorize(*ctx));
  }
  grpc::Status Postcopy(grpc::ServerContext* ctx,
                        grpc::ServerReaderWriter<proto::PostcopyRequest, proto::PageBatch>* stream) override {
    return PostcopyCall(receiver_, ctx, stream).Run();
  }
  grpc::Status Resolve(grpc::ServerContext* ctx, const proto::ResolveRequest* req,
                       proto::ResolveReply* reply) override {
    if (Status a = receiver_.Authorize(*ctx); !a.ok()) return ToGrpc(a);
    return receiver_.Resolve(req->session_id(), reply);
  }

  void Shutdown() {
    if (acceptor_) acceptor_->Stop();  // no new connection from here on
    if (!receiver_.BeginShutdown()) return;
    // Handlers return promptly once cancelled; the deadline cancels whatever
    // else is still open (e.g. a Pages call not yet attached).
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    server_->Wait();
    receiver_.NotifyAll();
  }

  Receiver receiver_;
  std::unique_ptr<grpc::Server> server_;
  // Without TLS, with direct data on: the port, serving gRPC and direct
  // streams (port_acceptor.h). Declared after server_: stopped first.
  std::unique_ptr<PortAcceptor> acceptor_;
  int port_ = 0;
};

// ------------------------------------------------------------- public

Result<std::unique_ptr<MigrationServer>> MigrationServer::Start(const std::string& listen, TargetFactory factory,
                                                                MigrationServerOptions options) {
  Result<HostPort> address = ParseHostPort(listen);
  if (!address.ok()) return InvalidArgument("listen address " + address.status().message());
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
  // Direct data streams share the port: this side accepts, and hands gRPC
  // what is not a direct stream. Under TLS gRPC keeps its own listener.
  if (options.direct_data && !options.security.tls()) {
    PMLMIG_ASSIGN_OR_RETURN(impl->acceptor_, PortAcceptor::Listen(address->host, address->port));
    impl->port_ = impl->acceptor_->port();
    impl->receiver_.set_direct_port(true);
  }
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (options.security.tls()) {
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    ssl.pem_root_certs = options.security.tls_ca_pem;
    ssl.pem_key_cert_pairs.push_back({options.security.tls_key_pem, options.security.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder b;
  if (!impl->acceptor_) b.AddListeningPort(listen, creds, &impl->port_);
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
  if (impl->acceptor_) {
    Impl* i = impl.get();
    PMLMIG_RETURN_IF_ERROR(impl->acceptor_->Run(
        {[i](UniqueFd fd) { grpc::AddInsecureChannelFromFd(i->server_.get(), fd.Release()); },
         [i](UniqueFd fd, const direct::Hello& hello) { i->receiver_.AdoptDirect(std::move(fd), hello); }}));
  }
  return std::unique_ptr<MigrationServer>(new MigrationServer(std::move(impl)));
}

MigrationServer::MigrationServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MigrationServer::~MigrationServer() { Shutdown(); }
int MigrationServer::port() const { return impl_->port_; }
Result<ReceivedMigration> MigrationServer::WaitForMigration(std::chrono::steady_clock::time_point deadline) {
  return impl_->receiver_.WaitForMigration(deadline);
}
void MigrationServer::RefuseNewMigrations(std::string why) { impl_->receiver_.RefuseNewMigrations(std::move(why)); }
void MigrationServer::Shutdown() { impl_->Shutdown(); }

}  // namespace pmlmig::transport
