// SnapshotRestore: a VM brought back from a snapshot file (snapshot_file.h).
//
//   eager  every data extent of the file is read into the new VM's memory in
//          parallel and checked against the file's chunk digests before the
//          vCPUs run; damage refuses the restore, naming the ranges.
//   lazy   the VM runs at once. Its memory's pages that hold data in the
//          file are missing (userfaultfd, the post-copy machinery of
//          postcopy.h): a vCPU touching one waits while the page is read
//          from the file, and background readers fill the rest. The digests
//          are compared once every page is in (WaitComplete): damage found
//          then is reported, naming the ranges, but the guest has run on it.
//
// The VM is built by the caller's factory from a MigrationSetup made of the
// file (description, memory layout, vCPUs): the same factory a migration's
// target uses.
//
// Thread-safety: Start on one thread; the rest from any, one at a time.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/postcopy.h"
#include "pmlmig/engine/snapshot_file.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

struct RestoreOptions {
  bool lazy = false;
  unsigned threads = 8;  // eager: reads in flight; lazy: background fillers (besides the fault server)
};

struct RestoreStats {
  bool lazy = false;
  double open_ms = 0;      // the file checked: header, layout, meta
  double build_ms = 0;     // the VM built by the factory
  double load_ms = 0;      // eager: memory read and checked; lazy: the faults armed
  double running_ms = 0;   // Start to the vCPUs running
  double complete_ms = 0;  // Start to every page in memory (eager: = running_ms)
  uint64_t guest_bytes = 0;
  uint64_t bytes_read = 0;     // data read from the file
  uint64_t data_extents = 0;
  // Lazy: what the guest waited for and what was filled before it asked.
  uint64_t faults = 0;
  uint64_t requested_pages = 0;
  uint64_t background_pages = 0;
  double latency_p50_ms = 0;
  double latency_p99_ms = 0;
  double latency_max_ms = 0;
  bool verified = false;       // every chunk digest matched
  std::string verify_detail;
};

class SnapshotRestore {
 public:
  using Factory = std::function<Result<std::unique_ptr<VmControl>>(const MigrationSetup&)>;
  // Opens and checks the file, builds the VM, loads its memory (eager) or
  // arms the faults (lazy), restores the state and resumes the vCPUs.
  // Errors name the file and what is wrong in it; nothing runs then.
  static Result<std::unique_ptr<SnapshotRestore>> Start(const std::string& path, const Factory& factory,
                                                        RestoreOptions options);
  ~SnapshotRestore();

  VmControl& vm() { return *vm_; }
  // Lazy: waits until every page is in memory, ends the faults and compares
  // the digests (a mismatch is kDataLoss naming the ranges). Eager: at once.
  // kUnavailable when `timeout` passes first.
  Status WaitComplete(std::chrono::milliseconds timeout);
  RestoreStats stats() const;
  // Remaining pages to place (lazy; 0 once complete or eager).
  uint64_t remaining() const;
  // After WaitComplete: the running VM, the caller's.
  std::unique_ptr<VmControl> TakeVm();
  // Before WaitComplete succeeded, to give up: the missing pages read as
  // zero from here (a vCPU blocked on one wakes), the readers stop and the
  // VM is paused. Nothing of it may run again.
  void Abandon();

 private:
  SnapshotRestore(SnapshotReader reader, RestoreOptions options) : reader_(std::move(reader)), options_(options) {}
  Status StartLazy(std::vector<PageRun> owed);
  void ServeFaults();       // the fault server: reads what a vCPU waits for
  void Fill();              // a background filler
  struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  struct PageBuffer {
    std::unique_ptr<uint8_t, FreeDeleter> data;
    size_t bytes = 0;
  };
  Status PlaceFromFile(const PageRun& run, PageBuffer& buffer);
  void StopWorkers();

  SnapshotReader reader_;
  const RestoreOptions options_;
  std::chrono::steady_clock::time_point start_{};
  std::unique_ptr<VmControl> vm_;
  std::unique_ptr<PageDigestTable> digests_;  // lazy: what was placed
  std::unique_ptr<PostcopyMemory> memory_;    // lazy, until complete; before vm_ is reset
  std::unique_ptr<PostcopyBacklog> backlog_;  // lazy
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint64_t> requests_;  // guarded by mu_: gpas a vCPU waits for
  Status worker_error_;            // guarded by mu_
  RestoreStats stats_;             // Start's; completed by WaitComplete
  bool complete_ = false;
};

}  // namespace pmlmig::engine
