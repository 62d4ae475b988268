#include "commit_resolve.h"

#include <thread>

#include "connection_probe.h"

namespace pmlmig::transport {

engine::CommitResult CommitAndResolve(ControlClient& control, SinkCalls& calls, const GrpcSinkOptions& o,
                                      uint64_t session_id, bool keep_open) {
  engine::CommitResult result;
  proto::ControlRequest req;
  req.mutable_commit();
  Status lost;
  if (!control.Write(req)) {
    lost = Unavailable("the control stream broke while sending Commit");
  } else {
    auto reply = control.WaitReply(o.commit_timeout, "waiting for the target to resume the VM");
    if (reply.ok() && reply->has_commit()) {
      result.state = engine::CommitState::kCommitted;
      result.target_resume_ms = reply->commit().target_resume_ms();
      if (!keep_open) control.Close(o.abort_grace);
      return result;
    }
    lost = reply.ok() ? InvalidArgument("receiver answered Commit with something else") : reply.status();
  }
  calls.CancelAll();
  return ResolveCommit(o, session_id, lost);
}

engine::CommitResult ResolveCommit(const GrpcSinkOptions& o, uint64_t session_id, const Status& lost) {
  using Clock = std::chrono::steady_clock;
  engine::CommitResult result;
  result.resolved = true;
  const auto deadline = Clock::now() + o.resolve_timeout;
  std::string last = lost.message();
  for (int attempt = 0; Clock::now() < deadline; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(250));
    auto channel = MakeChannel(o, 1000 + attempt);  // a fresh connection each time
    auto stub = proto::Migration::NewStub(channel);
    grpc::ClientContext ctx;
    AuthorizeCall(o.security, ctx);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    proto::ResolveRequest req;
    req.set_session_id(session_id);
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
    if (ConnectionRefused(o.target)) {
      result.state = engine::CommitState::kNotCommitted;
      result.detail = Aborted("the commit's answer was lost (" + lost.message() + ") and " + o.target +
                              " now refuses connections: no receiver process there runs the VM");
      return result;
    }
  }
  result.state = engine::CommitState::kInDoubt;
  result.detail = Unavailable(
      "switch-over in doubt: Commit was sent but its answer was lost (" + lost.message() +
      "), and the receiver could not be asked within " + SecondsText(o.resolve_timeout) + " (last: " + last +
      "). The VM may be running on the target, so it stays paused here; find out on the target before resuming it");
  return result;
}

}  // namespace pmlmig::transport
