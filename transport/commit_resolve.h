// The sender's switch-over: Commit on the control stream and, when its
// answer is lost, Resolve on fresh connections, which decides between
// committed, not committed and in doubt (proto/migration.proto, "Commit and
// Resolve"). The VM stays paused on the source unless the answer is "not
// committed": a commit in doubt must never be resumed on both sides.
//
// Thread-safety: the controlling thread; Resolve blocks up to
// resolve_timeout.
#pragma once

#include <cstdint>

#include "control_client.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/transport/grpc_sink.h"
#include "sink_calls.h"

namespace pmlmig::transport {

// Sends Commit and waits up to commit_timeout for its answer; then
// half-closes the control stream. When the answer is lost (the stream broke,
// no answer, a wrong one), cancels every call and resolves.
// `keep_open` (post-copy): the control call stays open after CommitReply
// (PostcopyDone comes on it later).
engine::CommitResult CommitAndResolve(ControlClient& control, SinkCalls& calls, const GrpcSinkOptions& o,
                                      uint64_t session_id, bool keep_open = false);

// Asks the receiver, on fresh connections, how session `session_id` ended,
// until it answers or resolve_timeout passes. `lost` says why we ask.
engine::CommitResult ResolveCommit(const GrpcSinkOptions& o, uint64_t session_id, const Status& lost);

}  // namespace pmlmig::transport
