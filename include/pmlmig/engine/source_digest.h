// SourceDigest: the source's chunk digests (memory_digest.h) of its own guest
// memory at the pause point, computed almost entirely while the VM still runs,
// without trusting the dirty tracker that the verification is checking.
//
//   Start     arms a witness: a second, independent write tracker over the
//             same memory (UserspaceWriteTracker in uffd-wp async mode: the
//             kernel's mm clears a page's write-protect bit on the first
//             write through the host page tables, which every guest write
//             through KVM and every VMM store takes). Then a background
//             thread hashes every page, each read after the witness
//             protected it.
//   Refresh   (each round, VM running) takes the pages the witness saw
//             written, re-protecting them, and queues them to be hashed again.
//   AtPause   (vCPUs paused) stops the thread, takes the witness's last
//             report, and hashes, in parallel, every page still queued: those
//             written since they were last hashed, the ones the thread had
//             not reached, and those Queue()d (the final round's dirty pages).
//
// Why it cannot miss a stale page: a page's table value is the hash of its
// bytes as read after the witness last protected it. A write after that
// protection clears the page's protection first, so the witness reports it
// in a later Refresh or in AtPause, which queues the page; AtPause hashes
// every queued page from memory that no longer changes. So at the pause
// every value is of the page's current bytes, whatever the dirty tracker
// reported: a page the tracker missed (and the transport never re-sent)
// differs here from the target's digest of what it received.
// The witness sees writes through this process's page tables (the guest's
// through KVM, the VMM's, the kernel's on the process's behalf); not writes
// through another mapping of the same memory (another process, pwrite to the
// memfd). Without a witness (the kernel lacks uffd-wp async, or the tracker
// under test already uses it on this memory) every page is hashed at the
// pause: exact, but then the cost lands in the downtime.
//
// Thread-safety: Start, Refresh, AtPause and the destructor from one thread.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/engine/tracker.h"

namespace pmlmig::engine {

struct SourceDigestStats {
  bool witness = false;             // a witness tracked writes
  std::string no_witness_reason;    // why not, when not
  uint64_t background_pages = 0;    // pages hashed while the VM ran
  uint64_t pause_pages = 0;         // pages hashed at the pause
  double pause_ms = 0;              // AtPause's wall time
};

class SourceDigest {
 public:
  // Memory in `slots` must stay mapped until the object is destroyed.
  explicit SourceDigest(const SlotTable& slots);
  ~SourceDigest();
  SourceDigest(const SourceDigest&) = delete;
  SourceDigest& operator=(const SourceDigest&) = delete;

  void Start();
  Status Refresh();
  // Stops the background thread until AtPause (which then does what is
  // left): at the pause point, so that it takes no CPU from the final round.
  void Hold() { StopBackground(); }
  // Queues `pages` (e.g. the final round's) to be hashed at the pause too.
  void Queue(const DirtySet& pages);
  // The chunk digests of memory now. Call with every writer stopped.
  Result<std::vector<uint64_t>> AtPause();
  const ChunkLayout& layout() const { return table_.layout(); }
  const SourceDigestStats& stats() const { return stats_; }

 private:
  void Background();
  void StopBackground();

  SlotTable slots_;
  PageDigestTable table_;
  DirtySet queued_;                        // pages to hash (again); shared with the thread
  std::unique_ptr<DirtyTracker> witness_;  // null: none
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> background_pages_{0};
  SourceDigestStats stats_;
};

}  // namespace pmlmig::engine
