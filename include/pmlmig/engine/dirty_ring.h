// The dirty-ring tracker: the PML path. On PML hosts KVM flushes each vCPU's
// 512-entry PML buffer into that vCPU's dirty ring at every VM exit; this is
// the userspace consumer of those rings.
//
// Ring protocol (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], REFERENCE §2): entries are
// struct kvm_dirty_gfn {flags, slot, offset}. KVM publishes an entry by
// storing flags = DIRTY (release); userspace harvests strictly in order:
// load-acquire flags, read slot/offset, store-release flags = RESET; then
// KVM_RESET_DIRTY_RINGS on the VM fd recycles every RESET entry, re-protects
// those pages and returns how many it reset.
//
// One collector thread is the only harvester of every ring (single consumer,
// KVM the producer), so the harvest loop needs no lock. It drains the rings
// every `collector_period` while the guest runs (at once again when a pass
// found a ring a quarter full), and on demand: when a vCPU
// exits with KVM_EXIT_DIRTY_RING_FULL (the vCPU waits for the next pass), and
// for Collect(), which first kicks every vCPU out of guest mode (flushing PML
// buffers into the rings) and then waits for a pass that started after the
// kick. Pages harvested between collections accumulate in a DirtySet.
//
// Overflow (this host's emulator can overshoot the soft-full limit, and a
// ring drained too rarely then wraps: KVM overwrites unharvested entries and
// its indices run ahead of ours). Detected when a pass finds every entry of
// a ring published (the ring was completely full), when KVM_RESET_DIRTY_RINGS resets a
// different number than was harvested, or when a ring reported full holds a
// gap (RingHarvester::Resync). The pages of overwritten entries were never
// re-protected, so the next Collect() turns dirty logging off and on (which
// write-protects every page again) and reports every page. A superset is
// safe; a lost page is not.
#pragma once

#include <linux/kvm.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

// Entries KVM keeps free below a full ring before it forces a
// KVM_EXIT_DIRTY_RING_FULL (KVM_DIRTY_RING_RSVD_ENTRIES).
constexpr uint32_t kRingReservedEntries = 64;

// Harvests one ring that lives in plain memory: no system calls, no locks, no
// allocation. Used by the tracker for KVM's mmap()ed rings and by tests and
// benchmarks for synthetic rings.
//
// Thread-safety: one harvesting thread at a time (the producer is KVM, or a
// test playing KVM).
class RingHarvester {
 public:
  struct Result {
    uint32_t harvested = 0;  // entries taken (marked RESET), valid or not
    uint32_t newly_set = 0;  // valid entries whose page was not yet in the set
    uint32_t invalid = 0;    // entries whose slot/offset lie outside the DirtySet
    uint32_t first_bad_slot = 0;
    uint64_t first_bad_offset = 0;
  };

  RingHarvester() = default;
  // `entries` points at `size` entries; size is a power of two.
  RingHarvester(kvm_dirty_gfn* entries, uint32_t size) : entries_(entries), mask_(size - 1) {}

  // Takes every published entry, in order, marking valid ones in `set`
  // (with DirtySet::MarkExclusive: the harvesting thread must own `set`).
  // Stops at the first entry KVM has not published, or after `max` entries.
  Result Harvest(DirtySet& set, uint32_t max = UINT32_MAX);

  // After an overflow KVM has overwritten entries and its indices run ahead
  // of ours: the entry at our fetch index stays empty while later ones are
  // published. Finds the first published entry within one ring length, marks
  // the gap before it RESET (so KVM_RESET_DIRTY_RINGS, which walks in order,
  // can pass it) and moves the fetch index there. Returns the gap length (0 if
  // nothing is published). Only for a ring KVM reported full.
  uint32_t Resync();

  uint32_t size() const { return mask_ + 1; }
  uint64_t fetch_index() const { return fetch_; }

 private:
  kvm_dirty_gfn* entries_ = nullptr;
  uint32_t mask_ = 0;
  uint64_t fetch_ = 0;  // next entry to look at; only the harvesting thread touches it
};

struct DirtyRingOptions {
  // How often the collector drains the rings while the guest runs. Short keeps
  // ring-full exits rare; each pass costs O(entries found) plus one ioctl.
  std::chrono::microseconds collector_period{2000};
};

class DirtyRingTracker final : public DirtyTracker {
 public:
  // The VM must have been created with a dirty ring (vm.dirty_ring_entries()).
  // Maps every vCPU's ring (owned here). Does not start logging.
  static Result<std::unique_ptr<DirtyRingTracker>> Create(VmControl& vm, const DirtyRingOptions& options);
  ~DirtyRingTracker() override;

  std::string_view name() const override { return "ring"; }
  Status Enable() override;
  Status Collect(DirtySet& out) override;
  Status Disable() override;
  TrackerStats stats() const override;
  bool vcpu_counts(std::vector<VcpuDirtyCount>& out) const override;

 private:
  // Per-ring state, each on its own cache lines: the harvester is touched
  // only by the collector thread.
  struct alignas(128) Ring {
    Mapping mapping;
    RingHarvester harvester;
    // Collector only: this ring was found completely full, so KVM may have
    // written past it and its index may now run ahead of ours. Cleared by the
    // next harvest that finds entries at our index (the two agree again).
    bool suspect = false;
    // Set by the vCPU thread on KVM_EXIT_DIRTY_RING_FULL, taken by the
    // collector (which then checks the ring for an overflow gap).
    alignas(128) std::atomic<bool> reported_full{false};
    // Added by the collector after each harvest, read by vcpu_counts().
    std::atomic<uint64_t> new_pages{0};
    std::atomic<uint64_t> entries{0};
  };

  DirtyRingTracker(VmControl& vm, const DirtyRingOptions& options);
  void CollectorLoop();
  // One pass over every ring, then KVM_RESET_DIRTY_RINGS. Collector thread
  // only (and Disable, after the collector stopped). Returns whether some
  // ring was found a quarter full or more.
  bool Pass();
  // Asks for a pass and waits until one that started after the request ends;
  // with `take_into`, the collector then moves its harvested pages there.
  Status RequestPassAndWait(DirtySet* take_into);
  Status OnRingFull(uint32_t vcpu);

  VmControl& vm_;
  DirtyRingOptions options_;
  std::vector<std::unique_ptr<Ring>> rings_;
  DirtySet pending_;  // harvested since the last Collect; the collector thread's alone

  // Collector coordination, all guarded by mu_.
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t requested_ = 0;   // pass generation asked for
  uint64_t completed_ = 0;   // generation of the last finished pass
  bool running_ = false;
  bool stop_ = false;
  Status error_;             // first bad entry or failed reset, reported by Collect
  DirtySet* take_into_ = nullptr;  // a Collect's destination, taken after a pass
  uint64_t take_generation_ = 0;   // ... that started at or after this generation
  uint64_t taken_pages_ = 0;
  bool overflow_ = false;    // since the last Collect
  std::thread collector_;

  // Statistics: the collector and Collect() add, stats() reads from any thread.
  alignas(128) TrackerCounters counters_;
};

}  // namespace pmlmig::engine
