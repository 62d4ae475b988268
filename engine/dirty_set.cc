#include "pmlmig/engine/dirty_set.h"

#include <cstdio>

namespace pmlmig::engine {

DirtySet::DirtySet(const SlotTable& table) {
  uint32_t max_id = 0;
  for (const MemorySlot& m : table.slots()) max_id = std::max(max_id, m.slot);
  index_.assign(table.slots().empty() ? 0 : max_id + 1, -1);
  for (const MemorySlot& m : table.slots()) {
    Slot s;
    s.id = m.slot;
    s.gpa = m.gpa;
    s.pages = m.pages();
    s.words = (s.pages + 63) / 64;
    s.bits = std::make_unique<std::atomic<uint64_t>[]>(s.words);  // value-initialized: zero
    s.summary_words = (s.words + 63) / 64;
    s.summary = std::make_unique<std::atomic<uint64_t>[]>(s.summary_words);
    index_[m.slot] = static_cast<int32_t>(slots_.size());
    total_pages_ += s.pages;
    slots_.push_back(std::move(s));
  }
}

bool DirtySet::MarkGpa(uint64_t gpa) {
  for (const Slot& s : slots_) {
    if (gpa >= s.gpa && ((gpa - s.gpa) >> kPageShift) < s.pages) {
      return MarkSlotPage(s.id, (gpa - s.gpa) >> kPageShift);
    }
  }
  return false;
}

Status DirtySet::MarkRange(uint64_t gpa, uint64_t len) {
  if (len == 0) return Status::Ok();
  const uint64_t first = gpa >> kPageShift;
  const uint64_t end = gpa + len;
  if (end < gpa) return InvalidArgument("dirty range overflows");
  const uint64_t last = (end - 1) >> kPageShift;
  for (uint64_t p = first; p <= last; ++p) {
    if (!MarkGpa(p << kPageShift)) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "dirty range [0x%llx, +0x%llx) leaves guest memory at gpa 0x%llx",
                    static_cast<unsigned long long>(gpa), static_cast<unsigned long long>(len),
                    static_cast<unsigned long long>(p << kPageShift));
      return InvalidArgument(buf);
    }
  }
  return Status::Ok();
}

void DirtySet::OrBitmap(size_t slot_index, uint64_t first_page, const uint64_t* bitmap, uint64_t pages) {
  Slot& s = slots_[slot_index];
  if (first_page >= s.pages) return;
  if (pages > s.pages - first_page) pages = s.pages - first_page;
  if ((first_page & 63) == 0) {
    const uint64_t base = first_page >> 6;
    const uint64_t words = (pages + 63) / 64;
    for (uint64_t w = 0; w < words; ++w) {
      uint64_t v = bitmap[w];
      if (w == words - 1 && (pages & 63) != 0) v &= (1ull << (pages & 63)) - 1;
      if (v != 0) OrWord(slot_index, base + w, v);
    }
    return;
  }
  for (uint64_t i = 0; i < pages; ++i) {
    if (bitmap[i >> 6] & (1ull << (i & 63))) MarkSlotPage(s.id, first_page + i);
  }
}

void DirtySet::MarkAll() {
  for (Slot& s : slots_) {
    for (uint64_t w = 0; w < s.words; ++w) {
      const uint64_t remaining = s.pages - (w << 6);
      s.bits[w].store(remaining >= 64 ? ~0ull : (1ull << remaining) - 1, std::memory_order_seq_cst);
    }
    for (uint64_t sw = 0; sw < s.summary_words; ++sw) {
      const uint64_t remaining = s.words - (sw << 6);
      s.summary[sw].store(remaining >= 64 ? ~0ull : (1ull << remaining) - 1, std::memory_order_seq_cst);
    }
  }
}

void DirtySet::Clear() {
  for (Slot& s : slots_) {
    for (uint64_t w = 0; w < s.words; ++w) s.bits[w].store(0, std::memory_order_relaxed);
    for (uint64_t sw = 0; sw < s.summary_words; ++sw) s.summary[sw].store(0, std::memory_order_relaxed);
  }
}

bool DirtySet::TestGpa(uint64_t gpa) const {
  for (const Slot& s : slots_) {
    if (gpa >= s.gpa && ((gpa - s.gpa) >> kPageShift) < s.pages) {
      const uint64_t page = (gpa - s.gpa) >> kPageShift;
      return (s.bits[page >> 6].load(std::memory_order_relaxed) >> (page & 63)) & 1;
    }
  }
  return false;
}

uint64_t DirtySet::Count() const {
  uint64_t n = 0;
  for (const Slot& s : slots_) {
    for (uint64_t sw = 0; sw < s.summary_words; ++sw) {
      uint64_t sv = s.summary[sw].load(std::memory_order_relaxed);
      while (sv != 0) {
        const uint64_t w = (sw << 6) + static_cast<uint64_t>(std::countr_zero(sv));
        sv &= sv - 1;
        n += static_cast<uint64_t>(std::popcount(s.bits[w].load(std::memory_order_relaxed)));
      }
    }
  }
  return n;
}

bool DirtySet::SameGeometry(const DirtySet& o) const {
  if (slots_.size() != o.slots_.size()) return false;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].id != o.slots_[i].id || slots_[i].gpa != o.slots_[i].gpa || slots_[i].pages != o.slots_[i].pages) {
      return false;
    }
  }
  return true;
}

uint64_t DirtySet::TakeInto(DirtySet& out) {
  uint64_t n = 0;
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& d = out.slots_[i];
    ForEachTakenWord(slots_[i], [&](uint64_t w, uint64_t v) {
      n += static_cast<uint64_t>(std::popcount(v));
      d.bits[w].fetch_or(v, std::memory_order_seq_cst);
      out.SetSummary(d, w);
    });
  }
  return n;
}

}  // namespace pmlmig::engine
