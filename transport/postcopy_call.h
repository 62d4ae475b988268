// PostcopyCall: the receiver's side of one Postcopy call (proto/migration.
// proto): after a post-copy Commit the source opens two, each on its own
// connection, named by metadata:
//   "requests"  a writer thread sends the pages vCPUs wait for
//               (Session::requests, filled by PostcopyMemory's fault
//               thread); the handler thread places the answers;
//   "push"      the handler thread places the background pages.
// Batches are checked as Pages batches are (AdmitBatch, BatchApplier) and
// placed through engine::PostcopyMemory, which drops pages already there.
// A call that breaks while pages are still missing pauses the session (its
// link is over; Receiver::PausePostcopyLocked): the VM runs on, and the
// source may resume on a new link (proto PostcopyResume). A call of an
// older link is stale: it places what it still carries and nothing else.
//
// Why gRPC's synchronous API: two calls per migration, each a loop of
// blocking reads; the requests call needs a concurrent writer, which the
// synchronous API allows (one reader and one writer thread per call).
//
// Thread-safety: one object per call, on its handler thread (and its
// writer thread); the session is guarded by Receiver::mu_.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

#include "batch_codec.h"
#include "migration.grpc.pb.h"
#include "receiver.h"

namespace pmlmig::transport {

class PostcopyCall {
 public:
  using Stream = grpc::ServerReaderWriter<proto::PostcopyRequest, proto::PageBatch>;
  PostcopyCall(Receiver& receiver, grpc::ServerContext* ctx, Stream* stream)
      : r_(receiver), ctx_(ctx), stream_(stream) {}
  grpc::Status Run();

 private:
  // Attaches the call to the session in post-copy that the metadata names.
  Status Attach();
  Status Serve();
  void WriteRequests();
  void Detach(const Status& why);
  // Under mu_: a resume started a newer link since this call attached.
  bool StaleLocked() const;

  Receiver& r_;
  grpc::ServerContext* const ctx_;
  Stream* const stream_;
  std::shared_ptr<Session> session_;
  bool requests_ = false;  // the "requests" call (else "push")
  uint32_t link_ = 0;      // the session's link this call belongs to
  bool push_acks_ = false; // the push call's source reads an ack per batch placed
  bool stop_ = false;      // guarded by Receiver::mu_: the writer thread ends
  BatchApplier applier_;
};

}  // namespace pmlmig::transport
