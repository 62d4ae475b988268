// DirtySet: which guest pages were written, one bit per page, one bitmap per
// memslot, sized from the SlotTable, plus a summary level of one bit per
// 64-page word, so that taking, counting and iterating cost O(dirty words +
// guest size / 4096 pages), not O(guest size / 64 pages). Memory: one bit per
// page of guest memory, plus 1/64 of that.
//
// Concurrency: Mark* may run on any number of threads at once. TakeInto /
// TakeEach may run concurrently with Mark*: a bit set during a take is either
// taken now or stays for the next take, never lost. (Marking sets the word,
// then the summary bit; taking clears the summary bit, then the word; all
// four seq_cst, so a marker that finds its summary bit still set cannot have
// set its word after the taker emptied it.) MarkExclusive is the cheap form
// for a set that one thread owns (no concurrent mark or take at all): plain
// loads and stores, no locked instructions. Count/Test/ForEach read a
// snapshot. Clear and MarkAll need no concurrent take.
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
    uint64_t summary_words = 0;  // ceil(words / 64)
    std::unique_ptr<std::atomic<uint64_t>[]> summary;  // bit w: bits[w] may be non-zero
  };

  DirtySet() = default;
  explicit DirtySet(const SlotTable& slots);
  DirtySet(DirtySet&&) = default;
  DirtySet& operator=(DirtySet&&) = default;

  // Marks page `page` of the slot whose KVM id is `slot_id`. Returns false
  // (marking nothing) if the slot is unknown or the page beyond its end: the
  // caller turns that into an error, never a wild write.
  bool MarkSlotPage(uint32_t slot_id, uint64_t page) {
    Slot* s = Find(slot_id, page);
    if (s == nullptr) [[unlikely]] return false;
    const uint64_t w = page >> 6;
    s->bits[w].fetch_or(1ull << (page & 63), std::memory_order_seq_cst);
    std::atomic<uint64_t>& sum = s->summary[w >> 6];
    const uint64_t sbit = 1ull << (w & 63);
    if ((sum.load(std::memory_order_seq_cst) & sbit) == 0) sum.fetch_or(sbit, std::memory_order_seq_cst);
    return true;
  }
  // Same, for a set owned by the calling thread alone: no locked instruction.
  bool MarkExclusive(uint32_t slot_id, uint64_t page) {
    uint32_t newly_set = 0;
    return MarkExclusive(slot_id, page, newly_set);
  }
  // The same, adding 1 to `newly_set` when the page was not yet in the set
  // (how the ring tracker measures each vCPU's dirty rate).
  bool MarkExclusive(uint32_t slot_id, uint64_t page, uint32_t& newly_set) {
    Slot* s = Find(slot_id, page);
    if (s == nullptr) [[unlikely]] return false;
    const uint64_t w = page >> 6;
    const uint64_t v = s->bits[w].load(std::memory_order_relaxed);
    const uint64_t bit = 1ull << (page & 63);
    if ((v & bit) == 0) {
      ++newly_set;
      s->bits[w].store(v | bit, std::memory_order_relaxed);
      std::atomic<uint64_t>& sum = s->summary[w >> 6];
      const uint64_t sv = sum.load(std::memory_order_relaxed);
      const uint64_t sbit = 1ull << (w & 63);
      if ((sv & sbit) == 0) sum.store(sv | sbit, std::memory_order_relaxed);
    }
    return true;
  }
  // ORs `bits` into 64-page word `word` of the slot at `slot_index` (an index
  // into slots()): one atomic operation for a run of pages, as a PML drain
  // or a bitmap merge produces them. The caller keeps every bit below the
  // slot's page count.
  void OrWord(size_t slot_index, uint64_t word, uint64_t bits) {
    Slot& s = slots_[slot_index];
    s.bits[word].fetch_or(bits, std::memory_order_seq_cst);
    std::atomic<uint64_t>& sum = s.summary[word >> 6];
    const uint64_t sbit = 1ull << (word & 63);
    if ((sum.load(std::memory_order_seq_cst) & sbit) == 0) sum.fetch_or(sbit, std::memory_order_seq_cst);
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
      ForEachTakenWord(s, [&](uint64_t w, uint64_t v) {
        n += static_cast<uint64_t>(std::popcount(v));
        while (v != 0) {
          const uint64_t page = (w << 6) + static_cast<uint64_t>(std::countr_zero(v));
          v &= v - 1;
          fn(s.gpa + (page << kPageShift));
        }
      });
    }
    return n;
  }

  // Calls fn(gpa) for each set page without clearing.
  template <typename Fn>
  void ForEach(Fn&& fn) const {
    for (const Slot& s : slots_) {
      for (uint64_t sw = 0; sw < s.summary_words; ++sw) {
        uint64_t sv = s.summary[sw].load(std::memory_order_relaxed);
        while (sv != 0) {
          const uint64_t w = (sw << 6) + static_cast<uint64_t>(std::countr_zero(sv));
          sv &= sv - 1;
          uint64_t v = s.bits[w].load(std::memory_order_relaxed);
          while (v != 0) {
            const uint64_t page = (w << 6) + static_cast<uint64_t>(std::countr_zero(v));
            v &= v - 1;
            fn(s.gpa + (page << kPageShift));
          }
        }
      }
    }
  }

 private:
  Slot* Find(uint32_t slot_id, uint64_t page) {
    if (slot_id >= index_.size()) return nullptr;
    const int32_t i = index_[slot_id];
    if (i < 0 || page >= slots_[static_cast<size_t>(i)].pages) return nullptr;
    return &slots_[static_cast<size_t>(i)];
  }
  // Takes the summary, then each word it names: fn(word index, taken bits)
  // for every non-zero word.
  template <typename Fn>
  static void ForEachTakenWord(Slot& s, Fn&& fn) {
    for (uint64_t sw = 0; sw < s.summary_words; ++sw) {
      if (s.summary[sw].load(std::memory_order_relaxed) == 0) continue;
      uint64_t sv = s.summary[sw].exchange(0, std::memory_order_seq_cst);
      while (sv != 0) {
        const uint64_t w = (sw << 6) + static_cast<uint64_t>(std::countr_zero(sv));
        sv &= sv - 1;
        const uint64_t v = s.bits[w].exchange(0, std::memory_order_seq_cst);
        if (v != 0) fn(w, v);
      }
    }
  }
  void SetSummary(Slot& s, uint64_t w) {
    s.summary[w >> 6].fetch_or(1ull << (w & 63), std::memory_order_seq_cst);
  }

  std::vector<Slot> slots_;
  std::vector<int32_t> index_;  // KVM slot id -> index in slots_, -1 if none
  uint64_t total_pages_ = 0;
};

}  // namespace pmlmig::engine
