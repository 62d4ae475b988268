// PagesReactor: the receiver's side of one Pages call (proto/migration.proto),
// a callback-API reactor over raw ByteBuffers, so a batch's payload is read
// straight out of the received slices into guest memory (no protobuf parse
// copy). OnReadDone decodes, checks (receiver_checks.h) and applies the
// batch (through its StreamIntake, stream_intake.h) and queues its ack; at
// most one ack write is in flight, and Finish waits for it. The first batch
// attaches the call to the session it names (which must be the one in
// progress) and to its stream index. When it refuses a batch it marks the
// session failed and cancels the control call with the same reason, whose
// thread then discards the target.
//
// Why the callback API: one reactor per call, owned by gRPC and deleted in
// OnDone, needs no thread of ours per stream, and reading the raw
// ByteBuffer lets the payload be applied from gRPC's own slices. Decoding
// and applying run on gRPC's callback thread; the bulk path that avoids it
// is the direct data streams (direct_receiver.h, a thread per stream),
// which a sender uses whenever TLS is off.
//
// Thread-safety: gRPC runs the reactions one at a time per call. Abandon
// runs on other threads, under Receiver::mu_, while the reactor is attached
// (it is not deleted before the intake's Done detaches it). mu_ below guards the
// ack queue and the call's closing; the session state is guarded by
// Receiver::mu_, which is never taken under mu_.
#pragma once

#include <grpcpp/grpcpp.h>

#include <deque>
#include <memory>
#include <mutex>

#include "batch_codec.h"
#include "grpc_status.h"
#include "migration.grpc.pb.h"
#include "receiver.h"
#include "stream_intake.h"

namespace pmlmig::transport {

class PagesReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>, public DataCall {
 public:
  // A call that failed authorization ends at once with `denied`.
  PagesReactor(Receiver& receiver, const Status& denied);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // Ends the call with `why` (from another thread, under Receiver::mu_,
  // while the reactor is attached).
  void Abandon(const Status& why) override { Close(ToGrpc(why)); }

 private:
  // Decodes one received message and hands it to the intake; returns its ack.
  Result<proto::BatchAck> HandleBatch(Chunks wire);
  // Finishes the call with `st` once the ack being written (and, for a
  // clean end, those queued) are out.
  void Close(const grpc::Status& st);
  void WriteNextLocked();

  StreamIntake intake_;
  proto::PageBatch header_;  // reused
  ChunkList payload_;
  grpc::ByteBuffer in_;
  ChunkList chunks_;
  std::mutex mu_;
  std::deque<proto::BatchAck> acks_;  // guarded by mu_
  grpc::ByteBuffer out_;              // guarded by mu_: the ack being written
  bool writing_ = false;              // guarded by mu_
  bool closing_ = false;              // guarded by mu_
  bool finish_pending_ = false;       // guarded by mu_
  grpc::Status finish_status_;        // guarded by mu_
};

}  // namespace pmlmig::transport
