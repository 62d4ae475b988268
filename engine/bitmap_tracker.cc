#include "pmlmig/engine/bitmap_tracker.h"

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>

namespace pmlmig::engine {
namespace {

#ifndef KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1 << 0)
#endif

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

Result<std::unique_ptr<BitmapTracker>> BitmapTracker::Create(VmControl& vm, const BitmapOptions& options) {
  if (vm.dirty_ring_entries() != 0) {
    return Unavailable("bitmap tracker: this VM logs into dirty rings; KVM offers no bitmap alongside "
                       "(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is 0 here)");
  }
  const uint64_t chunk_pages = options.clear_chunk_bytes >> kPageShift;
  if (chunk_pages == 0 || chunk_pages % 64 != 0) {
    return InvalidArgument("bitmap tracker: clear chunk must be a multiple of 256 KiB (64 pages)");
  }
  return std::unique_ptr<BitmapTracker>(new BitmapTracker(vm, options));
}

BitmapTracker::~BitmapTracker() { (void)Disable(); }

Status BitmapTracker::Enable() {
  if (enabled_) return Status::Ok();
  if (options_.manual_clear && !manual_enabled_) {
    kvm_enable_cap cap{};
    cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;  // never INITIALLY_SET: only writes from now on
    if (::ioctl(vm_.vm_fd(), KVM_ENABLE_CAP, &cap) < 0) {
      return Status::FromErrno(errno, "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) (vm)");
    }
    manual_enabled_ = true;
  }
  bitmaps_.clear();
  for (const MemorySlot& s : vm_.memory_slots().slots()) bitmaps_.emplace_back((s.pages() + 63) / 64);
  PMLMIG_RETURN_IF_ERROR(vm_.SetDirtyLogging(true).WithContext("bitmap tracker"));
  enabled_ = true;
  return Status::Ok();
}

Status BitmapTracker::Disable() {
  if (!enabled_) return Status::Ok();
  enabled_ = false;
  return vm_.SetDirtyLogging(false).WithContext("bitmap tracker");
}

Status BitmapTracker::ClearChunks(uint32_t slot, const std::vector<uint64_t>& bitmap, uint64_t pages) {
  const uint64_t chunk_pages = options_.clear_chunk_bytes >> kPageShift;
  const uint64_t chunks = (pages + chunk_pages - 1) / chunk_pages;
  std::atomic<int> first_errno{0};
  auto clear = [&](uint64_t c) {
    const uint64_t first = c * chunk_pages;
    const uint64_t n = std::min(chunk_pages, pages - first);
    const uint64_t* words = bitmap.data() + first / 64;
    bool any = false;
    for (uint64_t w = 0; w < (n + 63) / 64 && !any; ++w) any = words[w] != 0;
    if (!any) return;  // nothing reported here, nothing to re-protect
    kvm_clear_dirty_log clr{};
    clr.slot = slot;
    clr.first_page = first;
    clr.num_pages = static_cast<uint32_t>(n);
    clr.dirty_bitmap = const_cast<uint64_t*>(words);
    if (::ioctl(vm_.vm_fd(), KVM_CLEAR_DIRTY_LOG, &clr) < 0) {
      int expected = 0;
      first_errno.compare_exchange_strong(expected, errno);
    }
  };
  if (chunks > 1) {
    tbb::parallel_for(uint64_t{0}, chunks, clear);
  } else if (chunks == 1) {
    clear(0);
  }
  if (const int err = first_errno.load(); err != 0) {
    return Status::FromErrno(err, "KVM_CLEAR_DIRTY_LOG (slot " + std::to_string(slot) + ")");
  }
  return Status::Ok();
}

Status BitmapTracker::Collect(DirtySet& out) {
  if (!enabled_) return InvalidArgument("bitmap tracker: Collect before Enable");
  const uint64_t start = NowNs();
  uint64_t pages = 0;
  const auto slots = vm_.memory_slots().slots();
  if (out.slots().size() != slots.size()) return InvalidArgument("bitmap tracker: dirty set does not match the memslots");
  for (size_t i = 0; i < slots.size(); ++i) {
    const MemorySlot& s = slots[i];
    std::vector<uint64_t>& bitmap = bitmaps_[i];
    kvm_dirty_log log{};
    log.slot = s.slot;
    log.dirty_bitmap = bitmap.data();
    if (::ioctl(vm_.vm_fd(), KVM_GET_DIRTY_LOG, &log) < 0) {
      return Status::FromErrno(errno, "KVM_GET_DIRTY_LOG (" + DescribeSlot(s) + ")");
    }
    if (options_.manual_clear) PMLMIG_RETURN_IF_ERROR(ClearChunks(s.slot, bitmap, s.pages()));
    // Merge into the dirty set; a large slot in parallel, by word ranges.
    std::atomic<uint64_t> found{0};
    auto merge = [&](uint64_t w0, uint64_t w1) {
      uint64_t n = 0;
      for (uint64_t w = w0; w < w1; ++w) n += static_cast<uint64_t>(std::popcount(bitmap[w]));
      if (n == 0) return;
      out.OrBitmap(i, w0 * 64, bitmap.data() + w0, std::min((w1 - w0) * 64, s.pages() - w0 * 64));
      found.fetch_add(n, std::memory_order_relaxed);
    };
    if (s.pages() >= options_.parallel_min_pages) {
      tbb::parallel_for(tbb::blocked_range<uint64_t>(0, bitmap.size(), 4096),
                        [&](const tbb::blocked_range<uint64_t>& r) { merge(r.begin(), r.end()); });
    } else {
      merge(0, bitmap.size());
    }
    pages += found.load();
  }
  const uint64_t ns = NowNs() - start;
  ++stats_.collections;
  stats_.pages_collected += pages;
  stats_.entries_harvested += pages;
  stats_.collect_ns_total += ns;
  stats_.last_collect_ns = ns;
  stats_.last_pages = pages;
  return Status::Ok();
}

}  // namespace pmlmig::engine
