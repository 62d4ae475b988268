// MigrationController: the source side of migrating one running VM, for an
// embedder or a command. It runs one migration at a time on its own thread
// (MigrationSource through a sink the caller made), keeps the outcome of the
// last one, and latches the two states after which the VM must not migrate
// again: migrated (the VM runs on a target) and in doubt (the VM stays
// paused here until someone learns whether the target runs it).
//
// Thread-safety: every method from any thread. Callbacks run on the
// migration's thread and must not call Start or Wait (status and Cancel are
// fine). The VM and the tracker must outlive the controller.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "pmlmig/base/clock.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

// Where the VM is, as the controller knows it.
enum class VmPlacement : uint8_t {
  kHere,            // runs here (never migrated, or every attempt failed or was cancelled)
  kMigrated,        // runs on the target: stop it here, never resume it
  kPausedInDoubt,   // paused here; it may run on the target
  kPausedPostcopyFailed,  // paused here as of a post-copy switch that failed afterwards (the target's run is lost)
};
// "running", "migrated", "paused-in-doubt", "paused-postcopy-failed".
std::string_view VmPlacementName(VmPlacement placement);

struct ControllerStatus {
  VmPlacement vm = VmPlacement::kHere;
  bool active = false;         // a migration is in flight
  MigrationProgress progress;  // of the one in flight (active), else of the last
  Outcome last = Outcome::kNone;  // how the last finished migration ended
  MigrationStats last_stats;   // its statistics (outcome kNone... none yet: default)
};

class MigrationController {
 public:
  MigrationController(VmControl& vm, DirtyTracker& tracker, std::string vm_description,
                      const Clock& clock = Clock::Steady());
  ~MigrationController();  // cancels a migration in flight and waits for it

  MigrationController(const MigrationController&) = delete;
  MigrationController& operator=(const MigrationController&) = delete;

  // Starts a migration through `sink` (owned from here) and returns. Refused
  // (kInvalidArgument) while one is in flight, after the VM migrated, and
  // while the last switch-over is in doubt.
  Status Start(std::unique_ptr<MigrationSink> sink, MigrationOptions options, MigrationCallbacks callbacks = {});
  // Stops the migration in flight (the VM runs on here); kInvalidArgument
  // when none is in flight, or in post-copy (the target needs this side's
  // pages to finish). Too late once the commit is under way: the migration
  // then ends as the commit does.
  Status Cancel();
  // Blocks until no migration is in flight; the last one's statistics
  // (outcome kNone when none ever ran).
  MigrationStats Wait();
  ControllerStatus status() const;
  bool busy() const;  // a migration is in flight
  // Whether the caller runs on the migration's own thread (in one of its
  // callbacks), where Wait() would wait for itself.
  bool OnMigrationThread() const;

 private:
  void Joined();  // joins a finished migration's thread (mu_ not held)

  VmControl& vm_;
  DirtyTracker& tracker_;
  const std::string vm_description_;
  const Clock& clock_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool active_ = false;                      // guarded by mu_
  VmPlacement placement_ = VmPlacement::kHere;  // guarded by mu_
  MigrationStats last_;                      // guarded by mu_ (outcome kNone until one ended)
  std::unique_ptr<MigrationSink> sink_;      // guarded by mu_; the one in flight or the last
  std::unique_ptr<MigrationSource> source_;  // guarded by mu_; likewise
  std::thread thread_;                       // guarded by mu_
};

}  // namespace pmlmig::engine
