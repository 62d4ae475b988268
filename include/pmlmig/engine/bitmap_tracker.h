// The dirty-bitmap tracker: KVM_GET_DIRTY_LOG, one bit per page per memslot.
//
// Without manual protect, KVM_GET_DIRTY_LOG returns the bitmap and
// write-protects the reported pages again in the same call. With
// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (`manual_clear`), GET only reads; this
// tracker then re-protects exactly the reported pages with KVM_CLEAR_DIRTY_LOG
// in aligned chunks (skipping chunks with nothing to clear) before Collect()
// returns, so the ordering rule holds either way: read pages after Collect().
//
// Cost: O(guest memory) per collection (the bitmap is copied and scanned
// whole), which is what the dirty ring avoids. Large slots are scanned and
// cleared in parallel with TBB.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

struct BitmapOptions {
  bool manual_clear = false;               // GET, then CLEAR (MANUAL_DIRTY_LOG_PROTECT2)
  uint64_t clear_chunk_bytes = 64ull << 20; // guest bytes per KVM_CLEAR_DIRTY_LOG; multiple of 256 KiB
  uint64_t parallel_min_pages = 1ull << 18; // scan a slot in parallel from 1 GiB up
};

class BitmapTracker final : public DirtyTracker {
 public:
  // Fails when the VM has a dirty ring (KVM allows the bitmap only alongside
  // the ring with KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP).
  static Result<std::unique_ptr<BitmapTracker>> Create(VmControl& vm, const BitmapOptions& options);
  ~BitmapTracker() override;

  std::string_view name() const override { return options_.manual_clear ? "bitmap-clear" : "bitmap"; }
  Status Enable() override;
  Status Collect(DirtySet& out) override;
  Status Disable() override;
  TrackerStats stats() const override { return stats_; }  // controlling thread only

 private:
  BitmapTracker(VmControl& vm, const BitmapOptions& options) : vm_(vm), options_(options) {}
  Status ClearChunks(uint32_t slot, const std::vector<uint64_t>& bitmap, uint64_t pages);

  VmControl& vm_;
  BitmapOptions options_;
  bool enabled_ = false;
  bool manual_enabled_ = false;
  std::vector<std::vector<uint64_t>> bitmaps_;  // one per slot, reused across collections
  TrackerStats stats_;                          // controlling thread only
};

}  // namespace pmlmig::engine
