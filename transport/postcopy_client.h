// PostcopyClient: the sender's side of post-copy (proto/migration.proto,
// rpc Postcopy), after a post-copy Commit. Two calls, each on its own
// connection:
//   requests  a thread reads the target's page requests and answers each
//             at once with a batch of that page, on this call alone, so an
//             answer never queues behind the background push;
//   push      a thread sends the rest of the backlog, claimed from near the
//             most recently requested page (PostcopyBacklog::Claim moves
//             the hint), in batches of up to 32 pages; with a receiver that
//             acknowledges them, a second thread reads the acknowledgements
//             and the push keeps only a PushWindow of bytes unacknowledged
//             (push_window.h): little queue at a bottleneck for an answer
//             to wait behind.
// The controlling thread waits on the control call for PostcopyDone.
//
// Why the synchronous API: each call is one loop of blocking reads or
// writes on its own thread; gRPC's flow control is the push's
// backpressure (a write blocks while the receiver is behind).
//
// Recovery (proto PostcopyResume): when the link breaks (any of its three
// calls; the receiver pauses the session and lets the VM run on), a new
// link is opened, the receiver says which pages it still lacks, the backlog
// is reset to exactly those, and post-copy goes on over the new link. The
// first link is the sink's own calls; each later one is a PostcopyLink.
//
// Thread-safety: ServePostcopy() on the controlling thread; failures go
// through the link's SinkCalls (any one cancels every call of the link, so
// every thread returns).
#pragma once

#include <cstdint>

#include "batch_codec.h"
#include "control_client.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/postcopy.h"
#include "sink_calls.h"
#include "token_bucket.h"

namespace pmlmig::transport {

struct PostcopyCallOptions {
  uint64_t session_id = 0;
  uint32_t round = 0;  // the rounds sent before the switch: the batches' round
  Checksum checksum = Checksum::kXxh64;
  TokenBucket* bucket = nullptr;  // the push is paced by it when set
  bool recover = false;           // the receiver resumes broken links (HelloReply.postcopy_recovery)
  bool push_acks = false;         // the receiver acknowledges push batches: the push keeps a PushWindow
};

// Runs post-copy to its end: the target's PostcopyDone (its figures and,
// verifying, its digests), or the first failure that cannot be resumed
// (with recovery on and the receiver able to resume: a break that was not
// resumed within o.postcopy_recovery). `result` is filled as pages go
// out, so after a failure it still says what was sent.
Status ServePostcopy(const GrpcSinkOptions& o, SinkCalls& calls, ControlClient& control,
                     const engine::SlotTable& source, const PostcopyCallOptions& p, engine::PostcopyBacklog& backlog,
                     engine::PostcopyResult& result);

}  // namespace pmlmig::transport
