// DirtySet: which guest pages were written, one bit per page, one bitmap per
// memslot, sized from the SlotTable. The memory cost is exactly one bit per
// page of guest memory (plus a few words per slot).
//
// Concurrency: Mark* may run on any number of threads at once (atomic OR;
// relaxed, since nothing else is published through the bits). TakeInto /
// TakeEach may run concurrently with marking: each word is taken with an
// atomic exchange, so a bit set during a take is either taken now or stays
// for the next take, never lost. Count/Test/ForEach read a snapshot that may
// race with marking. Constructing, Clear and MarkAll need no concurrent take.
#pragma once

#include <atomic>
#include <bit>
#include <cstdint>
#include <memory>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {

class DirtySet {
 public:
  struct Slot {
    uint32_t id = 0;     // KVM slot id
    uint64_t gpa = 0;
    uint64_t pages = 0;
    uint64_t words = 0;  // ceil(pages / 64)
    std::unique_ptr<std::atomic<uint64_t>[]> bits;
  };

  DirtySet() = default;
  explicit DirtySet(const SlotTable& slots);
  DirtySet(DirtySet&&) = default;
  DirtySet& operator=(DirtySet&&) = default;

  // Marks page `page` of the slot whose KVM id is `slot_id`. Returns false
  // (marking nothing) if the slot is unknown or the page beyond its end: the
  // caller turns that into an error, never a wild write.
  bool MarkSlotPage(uint32_t slot_id, uint64_t page) {
    if (slot_id >= index_.size()) return false;
    const int32_t i = index_[slot_id];
    if (i < 0 || page >= slots_[static_cast<size_t>(i)].pages) return false;
    slots_[static_cast<size_t>(i)].bits[page >> 6].fetch_or(1ull << (page & 63), std::memory_order_relaxed);
    return true;
  }
  // Marks the page holding `gpa`; false if no slot holds it.
  bool MarkGpa(uint64_t gpa);
  // Marks every page overlapping [gpa, gpa+len); error naming the range if
  // any part lies outside the slots.
  Status MarkRange(uint64_t gpa, uint64_t len);
  // ORs a KVM-format bitmap (bit i = page first_page + i) into a slot.
  void OrBitmap(size_t slot_index, uint64_t first_page, const uint64_t* bitmap, uint64_t pages);
  void MarkAll();
  void Clear();

  bool TestGpa(uint64_t gpa) const;
  uint64_t Count() const;
  uint64_t total_pages() const { return total_pages_; }
  const std::vector<Slot>& slots() const { return slots_; }
  bool SameGeometry(const DirtySet& other) const;

  // Atomically takes every set bit out of this set and ORs it into `out`
  // (same geometry). Returns the number of pages taken.
  uint64_t TakeInto(DirtySet& out);

  // Atomically takes every set bit and calls fn(gpa) for each page, in
  // ascending gpa order within a slot. Returns the number of pages.
  template <typename Fn>
  uint64_t TakeEach(Fn&& fn) {
    uint64_t n = 0;
    for (Slot& s : slots_) {
      for (uint64_t w = 0; w < s.words; ++w) {
        if (s.bits[w].load(std::memory_order_relaxed) == 0) continue;  // cheap skip of clean words
        uint64_t v = s.bits[w].exchange(0, std::memory_order_relaxed);
        n += static_cast<uint64_t>(std::popcount(v));
        while (v != 0) {
          const uint64_t page = (w << 6) + static_cast<uint64_t>(std::countr_zero(v));
          v &= v - 1;
          fn(s.gpa + (page << kPageShift));
        }
      }
    }
    return n;
  }

  // Calls fn(gpa) for each set page without clearing.
  template <typename Fn>
  void ForEach(Fn&& fn) const {
    for (const Slot& s : slots_) {
      for (uint64_t w = 0; w < s.words; ++w) {
        uint64_t v = s.bits[w].load(std::memory_order_relaxed);
        while (v != 0) {
          const uint64_t page = (w << 6) + static_cast<uint64_t>(std::countr_zero(v));
          v &= v - 1;
          fn(s.gpa + (page << kPageShift));
        }
      }
    }
  }

 private:
  std::vector<Slot> slots_;
  std::vector<int32_t> index_;  // KVM slot id -> index in slots_, -1 if none
  uint64_t total_pages_ = 0;
};

}  // namespace pmlmig::engine
