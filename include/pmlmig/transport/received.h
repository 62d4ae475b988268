// What a receiver hands back when a migration ends, and the interface both
// receivers implement (the gRPC MigrationServer of grpc_server.h, the
// same-host HandoverServer of handover.h), so that whoever waits for a VM
// does not care how it arrives. No protobuf or gRPC type appears here.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"

namespace pmlmig::transport {

// How one migration ended, as the receiver saw it.
struct ReceivedMigration {
  // kCompleted, kFailed, or kCancelled (the source aborted it).
  engine::Outcome outcome = engine::Outcome::kFailed;
  Status error;                 // why it failed or was cancelled; OK when completed
  uint64_t session_id = 0;
  engine::FinalReply reply;     // the target's reply (completed only)
  engine::TransferStats totals; // pages and bytes applied (wire_bytes: message bytes received)
  uint32_t rounds = 0;          // highest round seen + 1
  bool postcopy = false;             // the VM resumed before all its memory was here
  uint32_t postcopy_recoveries = 0;  // post-copy links broken and resumed
  // The page batches came on direct data streams (0.9; proto/migration.proto
  // "Direct data streams"), not Pages calls: the source asked for them and
  // this receiver offered them.
  bool direct_data = false;
  // Bytes of round 0's pages placed into fresh memory with userfaultfd
  // (0.11; MigrationServerOptions::uffd_fill): 0 with one stream, without
  // userfaultfd, or with the option off.
  uint64_t uffd_filled_bytes = 0;
  // Of that fill: pages something else touched before their data came,
  // given a zero page (a read of a hole; expected 0 for a paused target).
  uint64_t uffd_zero_faults = 0;
  // Bytes of page data read from direct data streams straight into guest
  // memory (0.12; MigrationServerOptions::read_in_place).
  uint64_t in_place_bytes = 0;
  // A completed migration's resumed VM (target->TakeVm()), the caller's from
  // here; null otherwise.
  std::unique_ptr<engine::VmControl> vm;
  // The target of a completed migration (its VM taken into `vm`). Null
  // otherwise (a failed target has been discarded via OnAbort and destroyed).
  std::unique_ptr<engine::MigrationTarget> target;
};

// Thread-safety: every method from any thread.
class MigrationReceiver {
 public:
  virtual ~MigrationReceiver() = default;
  // Waits until a migration ends (completed, failed or aborted) and returns
  // its outcome; outcomes are returned oldest first, each once. Error:
  // kAborted when the deadline passes first, kUnavailable when the
  // receiver shuts down (Shutdown wakes every waiter).
  virtual Result<ReceivedMigration> WaitForMigration(std::chrono::steady_clock::time_point deadline) = 0;
  // From now on a new migration is refused (naming `why`), while a source's
  // question about a commit whose answer it lost is still answered. Keep
  // the receiver like this as long as a VM it received runs.
  virtual void RefuseNewMigrations(std::string why) = 0;
  // Stops receiving (a migration in progress fails: its target's OnAbort
  // runs) and waits for the handlers. Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace pmlmig::transport
