#include "sink_calls.h"

#include <cstdio>

#include "grpc_status.h"

namespace pmlmig::transport {

std::string SecondsText(std::chrono::milliseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g s", static_cast<double>(d.count()) / 1000.0);
  return buf;
}

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

void AuthorizeCall(const TransportSecurity& security, grpc::ClientContext& ctx) {
  if (!security.token.empty()) ctx.AddMetadata("authorization", "Bearer " + security.token);
}

grpc::ClientContext* SinkCalls::NewContext() {
  std::lock_guard lock(mu_);
  contexts_.push_back(std::make_unique<grpc::ClientContext>());
  grpc::ClientContext* ctx = contexts_.back().get();
  AuthorizeCall(security_, *ctx);
  if (cancelled_ || latch_.failed()) ctx->TryCancel();
  return ctx;
}

bool SinkCalls::Record(const Status& s, bool weak) {
  const bool first = latch_.Record(s, weak);
  Wake();
  return first;
}

void SinkCalls::CancelAll() {
  {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    // TryCancel is thread-safe and idempotent; it makes every blocked read
    // or write on the call return false.
    for (auto& ctx : contexts_) ctx->TryCancel();
  }
  Wake();
}

void SinkCalls::Fail(const Status& s, bool weak) {
  Record(s, weak);
  CancelAll();
}

bool SinkCalls::cancelled() const {
  std::lock_guard lock(mu_);
  return cancelled_;
}

void SinkCalls::Wake() const {
  for (const auto& wake : wakers_) wake();
}

}  // namespace pmlmig::transport
