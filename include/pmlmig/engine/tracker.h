// DirtyTracker: the one interface every dirty-page tracker implements.
//
//   Enable()  start logging: every page written from now on will be reported.
//   Collect() OR every page written since Enable() or the previous Collect()
//             into `out`, and re-protect those pages before returning, so that
//             a caller that reads page contents *after* Collect() returns
//             never misses a later write (the ordering rule of REFERENCE §2).
//   Disable() stop logging and release what Enable() set up.
//
// A tracker that loses information (a dirty ring that overflowed) must say so
// by marking every page of `out` dirty and counting an overflow: a superset
// is safe, a subset never is.
//
// Thread-safety: Enable/Collect/Disable from one controlling thread; stats()
// from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/dirty_set.h"

namespace pmlmig::engine {

struct TrackerStats {
  uint64_t collections = 0;
  uint64_t pages_collected = 0;     // sum over collections of pages reported
  uint64_t collect_ns_total = 0;    // wall time inside Collect()
  uint64_t last_collect_ns = 0;
  uint64_t last_pages = 0;
  uint64_t entries_harvested = 0;   // ring entries / PML entries / bitmap bits
  uint64_t overflows = 0;           // collections that had to report everything
  uint64_t ring_full_exits = 0;     // KVM_EXIT_DIRTY_RING_FULL handled
  uint64_t background_harvests = 0; // collector passes between collections
  // CPU time of the tracker's own background thread (the ring collector),
  // user and kernel, since Enable(); 0 for trackers without one.
  uint64_t background_user_ns = 0;
  uint64_t background_sys_ns = 0;
};

// What a tracker counts while other threads read stats(): one relaxed atomic
// per TrackerStats field (the counts publish nothing else). The owner adds;
// Snapshot() reads.
struct TrackerCounters {
  std::atomic<uint64_t> collections{0};
  std::atomic<uint64_t> pages_collected{0};
  std::atomic<uint64_t> collect_ns_total{0};
  std::atomic<uint64_t> last_collect_ns{0};
  std::atomic<uint64_t> last_pages{0};
  std::atomic<uint64_t> entries_harvested{0};
  std::atomic<uint64_t> overflows{0};
  std::atomic<uint64_t> ring_full_exits{0};
  std::atomic<uint64_t> background_harvests{0};
  std::atomic<uint64_t> background_user_ns{0};
  std::atomic<uint64_t> background_sys_ns{0};

  // One Collect() that reported `pages` in `ns` nanoseconds.
  void RecordCollection(uint64_t pages, uint64_t ns);
  TrackerStats Snapshot() const;
};

// What one vCPU has logged since the tracker was created, for trackers that
// log per vCPU (the dirty ring). Counts only grow; rates are differences.
struct VcpuDirtyCount {
  uint64_t new_pages = 0;  // pages it added to the dirty set (a page counts once between two collections)
  uint64_t entries = 0;    // log entries (this host logs several per page write)
};

class DirtyTracker {
 public:
  virtual ~DirtyTracker() = default;
  virtual std::string_view name() const = 0;
  virtual Status Enable() = 0;
  virtual Status Collect(DirtySet& out) = 0;
  virtual Status Disable() = 0;
  virtual TrackerStats stats() const = 0;
  // Fills one count per vCPU and returns true, or returns false (leaving
  // `out` alone) for a tracker whose log does not say which vCPU wrote (the
  // bitmap, write protection). Any thread.
  virtual bool vcpu_counts(std::vector<VcpuDirtyCount>& out) const {
    (void)out;
    return false;
  }
};

}  // namespace pmlmig::engine

// Building the KVM trackers by name, for the command line and benchmarks.
namespace pmlmig::engine {

class VmControl;

enum class TrackerKind { kNone, kRing, kBitmap, kBitmapClear };

// "none", "ring", "bitmap", "bitmap-clear"; an error lists the valid names.
Result<TrackerKind> ParseTrackerKind(std::string_view name);
std::string_view TrackerKindName(TrackerKind kind);

struct TrackerOptions {
  std::chrono::microseconds ring_collector_period{2000};  // ring: background drain period
  uint64_t clear_chunk_bytes = 64ull << 20;                // bitmap-clear: bytes per KVM_CLEAR_DIRTY_LOG
};

// nullptr for kNone. The VM must have a dirty ring exactly when kind is kRing.
Result<std::unique_ptr<DirtyTracker>> CreateTracker(TrackerKind kind, VmControl& vm, const TrackerOptions& options);

}  // namespace pmlmig::engine

namespace pmlmig::engine {

// The dirty set of a migration is the union of the trackers in use: KVM's
// log of guest writes plus the userspace tracker's log of the VMM's own.
// Enable/Disable/Collect apply to each in order; stats add up.
class UnionTracker final : public DirtyTracker {
 public:
  explicit UnionTracker(std::vector<DirtyTracker*> parts) : parts_(std::move(parts)) {}
  std::string_view name() const override { return "union"; }
  Status Enable() override;
  Status Collect(DirtySet& out) override;
  Status Disable() override;
  TrackerStats stats() const override;

 private:
  std::vector<DirtyTracker*> parts_;  // not owned
};

}  // namespace pmlmig::engine
