// ReceiverSession: the receiver's side of one Control call, the protocol's
// state machine (proto/migration.proto): WAIT_HELLO (no session yet) ->
// Hello -> WAIT_SETUP -> Setup -> RECEIVING -> Final -> PREPARED -> Commit,
// with Abort at any point, and a deadline in every phase. Run() reads a
// request and hands it to the method of the state the session is in; each
// method either answers and lets the loop read on, or ends the call with a
// status. This thread is the only one that calls the target (factory,
// OnSetup, OnFinal, OnCommit, OnAbort) and that ends a session.
//
// Why gRPC's synchronous API: the state machine is a sequence of blocking
// steps (building the VM, restoring it, resuming it) on one thread per
// call, which the synchronous handler gives directly; the call is read as
// raw bytes (ControlStream) so that a message that is not a ControlRequest
// is refused by name rather than taken for the end of the stream.
//
// Thread-safety: one ReceiverSession per Control call, used by the call's
// handler thread only; its watchdog thread checks the phase deadlines (by
// cancelling the call with the reason, which is what the source then
// reads). watch_mu_ guards what the watchdog reads of this object; the
// session record is guarded by Receiver::mu_.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <optional>

#include "migration.grpc.pb.h"
#include "pmlmig/base/watchdog.h"
#include "receiver.h"

namespace pmlmig::engine {
class PostcopyMemory;
}

namespace pmlmig::transport {

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
  Result<bool> Read(proto::ControlRequest* req);
  bool Write(const proto::ControlReply& reply);

 private:
  grpc::ServerReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>* const call_;
};

class ReceiverSession {
 public:
  ReceiverSession(Receiver& receiver, grpc::ServerContext* ctx, ControlStream* stream);
  ReceiverSession(const ReceiverSession&) = delete;
  ReceiverSession& operator=(const ReceiverSession&) = delete;

  // Serves the call to its end; the status is what the source reads.
  grpc::Status Run();

 private:
  // What a message handler decides: nullopt to read the next request, or
  // the status that ends the call.
  using Next = std::optional<grpc::Status>;

  Next Dispatch(const proto::ControlRequest& req);
  // One method per protocol message, each in the state that expects it.
  Next Hello(const proto::ControlRequest& req);   // WAIT_HELLO
  Next Setup(const proto::ControlRequest& req);   // WAIT_SETUP
  Next Final(const proto::ControlRequest& req);   // RECEIVING
  Next Prepare(const proto::PostcopyPrepare& p);  // RECEIVING, before a post-copy Final
  // Stops round 0's populate-ahead workers (joined when it returns) and
  // userfaultfd fill (its memory unregistered when it returns).
  void StopPopulating();
  Next Commit(const proto::ControlRequest& req);  // PREPARED
  Next Abort(const proto::Abort& abort);          // any state
  // WAIT_HELLO, a PostcopyResume: takes over a post-copy session whose
  // link broke (or replaces its link) and serves it on this call.
  Next Resume(const proto::ControlRequest& req);
  // After a post-copy Commit or a resume: waits until every page is placed
  // (then PostcopyDone on this call), a newer link takes over (this call's
  // part is over), or the source does not resume within the recovery
  // window (the VM is discarded).
  Next AwaitPostcopy(engine::PostcopyMemory& postcopy);
  // Watchdog thread: the deadline of the phase, every tick; true once it
  // has cancelled the call.
  bool CheckDeadlines();
  // Ends the session as failed (discarding the target) and the call with
  // the same error.
  grpc::Status Fail(const Status& s);
  // The call ended (a clean half-close after Commit, the source went away,
  // or we were cancelled: the session failed elsewhere, a deadline passed,
  // or the server is shutting down): ends the session with the best reason.
  grpc::Status EndOfCall();

  Receiver& r_;
  grpc::ServerContext* const ctx_;
  ControlStream* const stream_;
  const Session::Clock::time_point call_start_ = Session::Clock::now();
  std::shared_ptr<Session> session_;  // null until Hello
  bool done_ = false;                 // the commit went through, or a newer link serves the session
  engine::FinalReply prepared_;       // what OnFinal answered, completed by the commit
  proto::ControlReply reply_;         // reused

  std::mutex watch_mu_;
  std::shared_ptr<Session> watched_;  // guarded by watch_mu_: the session the watchdog checks
  bool handshake_expired_ = false;    // guarded by watch_mu_
  // Last: stopped (joined) before anything it reads is destroyed.
  std::optional<Watchdog> watchdog_;
};

}  // namespace pmlmig::transport
