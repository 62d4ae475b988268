// SinkCalls: every gRPC call of one GrpcMigrationSink, cancelled together,
// and the sink's first informative error (FailureLatch). A failure anywhere
// goes through Fail(): it is recorded, every call is cancelled (which makes
// every blocked gRPC read or write return) and the wakers run (the token
// bucket, the control reply queue), and the sink is unusable from then on.
// Also the sender's gRPC helpers shared by its parts (channels, statuses).
//
// Thread-safety: everything from any thread. mu_ guards the contexts and
// `cancelled_`; the latch has its own lock. Wakers are added before any
// other thread runs and are called with no lock held.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "failure_latch.h"
#include "pmlmig/transport/grpc_sink.h"

namespace pmlmig::transport {

// "1.5 s".
std::string SecondsText(std::chrono::milliseconds d);
// A gRPC status as a pmlmig Status, "<what>: <the peer's message>".
Status FromGrpc(const grpc::Status& s, const std::string& what);
// A channel of its own (own subchannel pool, own TCP connection: `index`
// makes its arguments distinct) to o.target, with the sink's limits,
// keepalive and credentials. Defined in grpc_sink.cc, beside Begin, which
// connects.
std::shared_ptr<grpc::Channel> MakeChannel(const GrpcSinkOptions& o, int index);
// Waits until `ch` is connected, up to o.connect_timeout; a port that
// refuses connections fails at once (and sets *refused when given).
// `stop` (if given) ends the wait within 50 ms of being set (kAborted).
Status WaitConnected(const GrpcSinkOptions& o, grpc::Channel& ch, const std::string& which, bool* refused = nullptr,
                     const std::atomic<bool>* stop = nullptr);
// Adds the token to a call's metadata, when there is one.
void AuthorizeCall(const TransportSecurity& security, grpc::ClientContext& ctx);

class SinkCalls {
 public:
  explicit SinkCalls(const TransportSecurity& security) : security_(security) {}
  SinkCalls(const SinkCalls&) = delete;
  SinkCalls& operator=(const SinkCalls&) = delete;

  // Runs `wake` on every failure and cancel (before other threads start).
  void AddWaker(std::function<void()> wake) { wakers_.push_back(std::move(wake)); }

  // A context (with the token) that is cancelled with all the others, at
  // once if they already are. Owned here: it outlives the call made on it
  // as long as this object outlives the calls.
  grpc::ClientContext* NewContext();
  // Records the error (see FailureLatch) and cancels every call.
  void Fail(const Status& s, bool weak = false);
  // The two halves of Fail. Record returns whether this was the first.
  bool Record(const Status& s, bool weak);
  void CancelAll();

  Status failure() const { return latch_.status(); }
  bool failed() const { return latch_.failed(); }
  bool cancelled() const;
  const std::atomic<bool>& stop() const { return latch_.stop(); }

 private:
  void Wake() const;

  const TransportSecurity& security_;
  FailureLatch latch_;
  std::vector<std::function<void()>> wakers_;  // fixed once threads run
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;  // guarded by mu_
  bool cancelled_ = false;                                      // guarded by mu_
};

}  // namespace pmlmig::transport
