// UserspaceWriteTracker: dirty tracking for writes that KVM never sees:
// device emulation, virtio and vhost-user backends, and the VMM's own stores
// into guest memory. KVM's dirty log covers guest writes only; the dirty set
// a migration sends must be the union of both (Firecracker ORs the KVM bitmap
// with the VMM's own write bitmap for the same reason).
//
// Sources of dirty pages, by mode:
//
//   kUffdWpAsync  The kernel tracks every write to the slots' host ranges.
//                 A userfaultfd with UFFD_FEATURE_WP_ASYNC registers each range
//                 for write protection (UFFDIO_REGISTER_MODE_WP) and Enable
//                 write-protects it (UFFDIO_WRITEPROTECT). A write to a
//                 protected page is resolved by the kernel alone (no fault
//                 message, no handler thread): it clears the page's uffd-wp
//                 bit, i.e. marks it "written". Collect runs PAGEMAP_SCAN with
//                 PM_SCAN_WP_MATCHING on /proc/self/pagemap, which reports the
//                 written pages and write-protects them again in the same
//                 page-table walk, under the page-table lock, with the TLB
//                 flushed before the ioctl returns. Exact to the 4 KiB page
//                 (hugetlbfs: to the huge page); works on anonymous, shmem and
//                 memfd (MAP_SHARED) mappings, populated or not
//                 (WP_UNPOPULATED), and sees writes made by the kernel on the
//                 process's behalf (read(2) into guest memory, GUP writers).
//                 Needs Linux 6.7+ with CONFIG_PTE_MARKER_UFFD_WP. On the
//                 reference host (6.18) it works on memfd MAP_SHARED guest
//                 RAM; soft-dirty does not (no CONFIG_MEM_SOFT_DIRTY).
//   kSoftDirty    Fallback for kernels without WP_ASYNC: Enable writes "4" to
//                 /proc/self/clear_refs, Collect reads bit 55 (soft-dirty) of
//                 /proc/self/pagemap for the ranges and then writes "4" again.
//                 Needs CONFIG_MEM_SOFT_DIRTY. Weaker; see "Soft-dirty" below.
//   kExplicitOnly Only MarkDirty(); the kernel tracks nothing.
//   kAuto         kUffdWpAsync when the kernel offers it for these slots'
//                 mappings, else kSoftDirty, else Enable fails naming both
//                 reasons. mode() says which one is active.
//
// In every mode MarkDirty() adds pages explicitly (from any thread, at any
// time, lock-free); Collect reports the union.
//
// Ordering rule (the contract of DirtyTracker::Collect): a page reported by
// Collect has been re-protected before Collect returns, so a caller that
// copies a reported page after Collect returns copies every write that came
// before the re-protection, and a write after it is reported by the next
// Collect. A write racing Collect is reported by this collection or by the
// next one, never by neither (uffd-wp and explicit marks; soft-dirty only
// with writers paused, see below).
//
// Soft-dirty: read, then clear, and why that can lose a write.
//   Collect reads the pagemap entries of all slots (R), then writes "4" to
//   clear_refs (C). There is no atomic read-and-clear, so for each page
//   there is a window between R reading its entry and C clearing its pte:
//   - page dirty at R: reported now; a write inside the window lands before
//     Collect returns, so the caller's later copy includes it. Safe.
//   - page clean at R and written inside the window: the write sets the bit,
//     C clears it, and it is reported by no collection unless the page is
//     written again. LOST. No ordering fixes this (clearing first would lose
//     every write since the previous read), and no other pagemap bit lets a
//     later read tell such a page from an untouched one, so there is nothing
//     to mark conservatively short of marking everything.
//   Hence: kSoftDirty is exact only if no thread writes the tracked memory
//   while Collect runs (pause device-emulation threads around Collect, as
//   the stop-and-copy phase does anyway); otherwise use kUffdWpAsync.
//   (Measured on Debian's 6.1 kernel: the migration-style test of
//   userspace_tracker_test.cc with writers not paused ended with 117 to 964
//   stale destination pages per run; with writers paused, none.)
//   Further weaknesses: clear_refs is process-wide, so every Collect clears
//   soft-dirty for all memory of the process (another soft-dirty user in the
//   process, e.g. a second tracker, would lose its bits: Enable refuses a
//   second soft-dirty tracker) and write-protects all of the process's pages
//   (every first write after a Collect anywhere in the process faults); a
//   transparent huge page mapped by a PMD is tracked as one 2 MiB unit (one
//   write reports 512 pages); a kernel without CONFIG_MEM_SOFT_DIRTY accepts
//   clear_refs "4" but never sets the bit, which Enable detects with a probe.
//
// Common limits: only writes through the registered virtual ranges are seen;
// a write through another mapping of the same memfd, or pwrite(2) to the
// memfd itself, bypasses the page tables and is not reported (use MarkDirty).
// A written shmem page that is swapped out before Collect loses its state
// (the pte becomes empty): guest memory must not be swapped (mlock it or run
// without swap). One tracker per range: a second uffd registration of the
// same range fails with EBUSY.
//
// Failure: when PAGEMAP_SCAN or a pagemap read fails part way, the pages it
// may have re-protected without reporting are unknown, so Collect marks the
// rest of the scan dirty (a superset is safe), counts an overflow, and
// returns the error; `out` is valid even then.
//
// Thread-safety: Enable, Collect and Disable from one controlling thread.
// MarkDirty from any thread at any time, concurrently with everything
// (including before Enable and after Disable: marks wait for the next
// Collect). stats(), scan_stats() and mode() from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/engine/tracker.h"

namespace pmlmig::engine {

enum class UserspaceTrackMode : uint8_t {
  kAuto,
  kUffdWpAsync,
  kSoftDirty,
  kExplicitOnly,
};

struct UserspaceTrackerOptions {
  // Which kernel mechanism tracks writes; see the file comment.
  UserspaceTrackMode mode = UserspaceTrackMode::kAuto;
  // page_region entries per PAGEMAP_SCAN call (24 bytes each). A full array
  // makes the kernel stop early and Collect call again from walk_end; a
  // small value only costs more ioctls. Must be > 0.
  size_t scan_regions = 1024;
  // pagemap entries per pread in soft-dirty mode (8 bytes each). Must be > 0.
  size_t pagemap_batch = 4096;
};

class UserspaceWriteTracker final : public DirtyTracker {
 public:
  using Mode = UserspaceTrackMode;
  using Options = UserspaceTrackerOptions;

  // Counters beyond TrackerStats, for tests and tuning.
  struct ScanStats {
    uint64_t scan_calls = 0;     // PAGEMAP_SCAN ioctls (uffd) or pagemap preads (soft-dirty)
    uint64_t partial_scans = 0;  // PAGEMAP_SCAN calls that stopped before the end (array full)
    uint64_t kernel_pages = 0;   // pages the kernel reported written, summed over collections
  };

  // Tracks the host ranges of `slots` (copied; their memory must stay mapped
  // while the tracker is enabled). Nothing is touched until Enable.
  explicit UserspaceWriteTracker(SlotTable slots, Options options = {});
  ~UserspaceWriteTracker() override;  // Disables if enabled
  UserspaceWriteTracker(const UserspaceWriteTracker&) = delete;
  UserspaceWriteTracker& operator=(const UserspaceWriteTracker&) = delete;

  // "userspace/uffd-wp", "userspace/soft-dirty", "userspace/explicit", or
  // "userspace/auto" while kAuto is not yet resolved.
  std::string_view name() const override;
  // Starts tracking: every write from now on will be reported. Fails if
  // already enabled, if the requested mode is unavailable (kUnavailable,
  // naming the missing kernel feature), or a syscall fails (naming it, the
  // slot's range and errno).
  Status Enable() override;
  // ORs into `out` (geometry of this tracker's slots) every page written or
  // marked since Enable or the previous Collect; see the ordering rule.
  Status Collect(DirtySet& out) override;
  // Stops tracking and releases the userfaultfd and proc files. Writes after
  // the last Collect are not reported. Idempotent.
  Status Disable() override;
  TrackerStats stats() const override;
  ScanStats scan_stats() const;

  // Marks [gpa, gpa + length) dirty for the next Collect. Lock-free: a few
  // atomic ORs per 64 pages, no allocation, no syscall. Call it after the
  // write it reports (a mark taken by Collect makes the written data visible
  // to the thread that copies after Collect). Fails, marking nothing, when
  // any part of the range lies outside the slots or the range wraps.
  Status MarkDirty(uint64_t gpa, uint64_t length);

  // The active mode while enabled; the requested one otherwise.
  Mode mode() const { return mode_.load(std::memory_order_acquire); }
  const SlotTable& slots() const { return slots_; }

  static std::string_view ModeName(Mode mode);

  // Whether this kernel offers each mechanism, tried on scratch mappings of
  // the kinds guest memory uses (anonymous and memfd MAP_SHARED): OK, or
  // kUnavailable saying what is missing. ProbeSoftDirty writes clear_refs,
  // which is process-wide: it fails while a soft-dirty tracker is enabled.
  static Status ProbeUffdWpAsync();
  static Status ProbeSoftDirty();

 private:
  // Every slot's host range must be mapped in full.
  Status CheckMapped() const;
  Status EnableUffd();
  Status EnableSoftDirty();
  // Scans slot `index` with PAGEMAP_SCAN (looping on partial results),
  // marking what it reports into pending_ and counting it in *pages. On a
  // failure, with `mark_on_failure`, marks the rest of the scan dirty.
  Status ScanSlotUffd(size_t index, uint64_t* pages, bool mark_on_failure);
  Status CollectUffd(uint64_t* pages);
  Status CollectSoftDirty(uint64_t* pages);
  // Marks pages [first, first + count) of slot `index` into pending_.
  void MarkPending(size_t index, uint64_t first, uint64_t count);
  // Marks every page of every slot from slot `index`, page `first` on, after
  // a failure that may have hidden dirty pages.
  void MarkRestConservatively(size_t index, uint64_t first);
  void ReleaseKernelState();

  const SlotTable slots_;
  const Options options_;

  // Marks from MarkDirty and from the kernel scans, taken by Collect. Shared
  // by every thread; DirtySet's atomic marks and takes make that safe.
  DirtySet pending_;

  // Controlling thread only (Enable/Collect/Disable).
  bool enabled_ = false;
  UniqueFd uffd_;
  UniqueFd pagemap_;
  UniqueFd clear_refs_;
  std::vector<std::byte> scan_buffer_;  // page_region[] or pagemap entries, sized by Enable
  bool owns_soft_dirty_ = false;        // holds the process-wide soft-dirty claim

  // Written by the controlling thread, read by any (stats, mode, name).
  std::atomic<Mode> mode_;
  TrackerCounters counters_;
  std::atomic<uint64_t> scan_calls_{0};
  std::atomic<uint64_t> partial_scans_{0};
  std::atomic<uint64_t> kernel_pages_{0};
};

}  // namespace pmlmig::engine
