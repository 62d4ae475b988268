// The receiver's checks of control messages and of a batch's place in its
// stream: pure functions over protobuf messages, no gRPC, no session state
// beyond what they are given. MigrationServer calls them; the fuzz target
// (tests/fuzz/) drives them with hostile input. What each rejection means is
// described at the top of proto/migration.proto.
//
// Private to transport/ (it speaks protobuf); tests include it by path.
#pragma once

#include <cstdint>

#include "migration.pb.h"
#include "pmlmig/base/status.h"

namespace pmlmig::transport {

// What a receiver accepts from one Setup.
struct ReceiverLimits {
  uint64_t max_memory_bytes = 0;  // total of all memory ranges
  uint32_t max_vcpus = 1024;
  uint32_t max_streams = 64;      // further capped by kMaxStreams
};

// A valid Setup: description size, 1..256 page-aligned, non-empty,
// non-overlapping ranges with distinct slot ids, in total within the memory
// limit (RESOURCE_EXHAUSTED beyond it), vCPUs and streams within the limits.
Status ValidateSetup(const proto::Setup& setup, const ReceiverLimits& limits);

// The shape of a Final for a migration with `streams` data streams: the VM
// state's size and one StreamTotals per stream. (Whether the totals match
// what was applied is the session's business.)
Status ValidateFinalShape(const proto::Final& final, uint32_t streams);

// Where a data stream stands: the next sequence number it expects and the
// round of its last batch.
struct StreamCursor {
  uint64_t next_sequence = 0;
  uint32_t last_round = 0;
};

// May `batch`, arriving on stream `index` of session `session_id`, be
// applied next? Checks the session and stream it names, its sequence number
// and that its round does not go back. Errors name the stream and batch.
Status AdmitBatch(uint64_t session_id, uint32_t index, const StreamCursor& cursor, const proto::PageBatch& batch);

}  // namespace pmlmig::transport
