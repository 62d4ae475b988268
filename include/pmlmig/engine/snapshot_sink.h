// SnapshotSink: a migration whose target is a file (snapshot_file.h). The
// engine's MigrationSource drives it as any sink: round 0 and the live
// rounds write pages at their fixed offsets (a page sent again overwrites
// itself in place), the final round and the state land while the VM is
// paused, and Commit is the rename that makes the file complete. The VM
// then runs on here (keeps_source()), or the caller stops it.
//
// Zero pages are holes: round 0 skips them (the new file reads zero there);
// a later round punches a page that has become zero.
//
// Thread-safety: as MigrationSink. SendPages writes from `threads` threads.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/snapshot_file.h"

namespace pmlmig::engine {

struct SnapshotSinkOptions {
  std::string path;      // the snapshot file; replaced only once the new one is complete
  unsigned threads = 2;  // writers per round, 1..16
};

class SnapshotSink final : public MigrationSink {
 public:
  static Result<std::unique_ptr<SnapshotSink>> Create(SnapshotSinkOptions options);

  Status Begin(const MigrationSetup& setup, const SlotTable& source_memory) override;
  Result<TransferStats> SendPages(uint32_t round, PageList& pages) override;
  Result<FinalReply> Finish(const FinalState& state) override;
  CommitResult Commit() override;
  void Abort(const std::string& why) override;
  TransferStats totals() const override;
  bool keeps_source() const override { return true; }

  // After Commit: the file's allocated size (st_blocks), for reports.
  uint64_t file_allocated_bytes() const;
  const std::string& path() const { return options_.path; }

 private:
  explicit SnapshotSink(SnapshotSinkOptions options) : options_(std::move(options)) {}
  // Writes one run read from source memory: data pages, and zero pages as
  // holes (punched after round 0).
  Status WriteRun(uint32_t round, const PageRun& run, TransferStats* sent);

  const SnapshotSinkOptions options_;
  const SlotTable* source_ = nullptr;  // Begin's; read while pages are sent
  std::optional<SnapshotWriter> writer_;
  std::atomic<bool> aborted_{false};
  // Abandon (unlinking the partial file) happens once no round is being
  // written: at Abort, or at the end of the round it interrupted.
  void AbandonLocked();
  mutable std::mutex mu_;
  TransferStats totals_;   // guarded by mu_
  std::string abort_why_;  // guarded by mu_
  bool sending_ = false;   // guarded by mu_: a SendPages is writing
  bool committed_ = false; // guarded by mu_
};

}  // namespace pmlmig::engine
