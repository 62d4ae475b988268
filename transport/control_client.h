// ControlClient: the sender's side of the Control call (proto/migration.proto:
// Hello, Setup, Final, Commit, Abort and their replies), in gRPC's
// synchronous API. One reader thread reads every ControlReply into a queue
// and, when the call ends, its final status; the controlling thread writes a
// request and waits on that queue with a timeout, so no read ever needs a
// deadline of its own.
//
// Why the synchronous API: the control stream carries a handful of
// messages, each a blocking request and reply on the controlling thread (the
// engine's); blocking calls say that directly, and cancelling the call's
// context (SinkCalls::CancelAll) makes every blocked read and write return.
//
// Thread-safety: Write, WaitReply and End from the controlling thread;
// TryAbort from any thread (it takes the write lock with a bound); Wake from
// any thread. write_mu_ allows one writer at a time on the call and guards
// `writes_done_`; mu_ guards the reply queue and the call's end.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "migration.grpc.pb.h"
#include "sink_calls.h"

namespace pmlmig::transport {

class ControlClient {
 public:
  // `target` names the receiver in messages.
  ControlClient(SinkCalls& calls, std::string target) : calls_(calls), target_(std::move(target)) {}
  // Join() must have run (the reader thread is gone).
  ~ControlClient() = default;
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // Opens the Control call on `channel` (a context from SinkCalls) and
  // starts the reader thread.
  void Start(const std::shared_ptr<grpc::Channel>& channel);
  // Writes one request; false if the call is over (or was half-closed).
  bool Write(const proto::ControlRequest& req);
  // The next reply, waiting up to `timeout`; `what` says what we wait for.
  // The call's end, a timeout, or a failure elsewhere fails the sink.
  Result<proto::ControlReply> WaitReply(std::chrono::milliseconds timeout, const std::string& what);
  // The call's end status, waiting up to `timeout` for it.
  Status End(std::chrono::milliseconds timeout, const std::string& what);
  // After a successful Commit: half-closes the call and waits up to `grace`
  // for its end.
  void Close(std::chrono::milliseconds grace);
  // Abort, best effort (after Start, while open()): if the write lock is
  // free within `grace`, writes Abort, half-closes and waits up to `grace`
  // for the end.
  void TryAbort(const std::string& why, std::chrono::milliseconds grace);
  // Started, and not yet ended.
  bool open() const;
  // Makes WaitReply look at SinkCalls' failure (a SinkCalls waker).
  void Wake();
  // Waits for the reader thread (every call cancelled, or ended).
  void Join();

 private:
  void ReadLoop();

  SinkCalls& calls_;
  const std::string target_;
  std::unique_ptr<proto::Migration::Stub> stub_;
  std::unique_ptr<grpc::ClientReaderWriter<proto::ControlRequest, proto::ControlReply>> call_;
  std::thread reader_;

  std::timed_mutex write_mu_;  // one writer at a time on call_ (the controlling thread or Abort)
  bool writes_done_ = false;   // guarded by write_mu_

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false;                     // guarded by mu_: call_ is set
  std::deque<proto::ControlReply> replies_;  // guarded by mu_
  bool ended_ = false;                       // guarded by mu_: status_ is set
  grpc::Status status_;                      // guarded by mu_
};

}  // namespace pmlmig::transport
