#include "pmlmig/engine/memory_digest.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <xxh_x86dispatch.h>  // picks the widest vector unit at run time (AVX2 here: 2.5x SSE2)

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <new>
#include <cstdio>
#include <cstring>

#include "pmlmig/base/units.h"

namespace pmlmig::engine {

namespace {

// 2 MiB, doubled until a guest has at most 65536 chunks (512 KiB of digests).
constexpr uint64_t kMinChunkBytes = 2ull << 20;
constexpr uint64_t kMaxChunks = 65536;

alignas(64) const uint8_t kZeroPage[kPageSize] = {};

}  // namespace

uint64_t PageValue(uint64_t gpa, const uint8_t* page) {
  return XXH3_64bits_withSeed_dispatch(page, kPageSize, gpa);
}

uint64_t PageValueOf(uint64_t gpa, const uint8_t* page, ZeroPages zero) {
  if (zero == ZeroPages::kNull && std::memcmp(page, kZeroPage, kPageSize) == 0) return 0;
  return PageValue(gpa, page);
}

ChunkLayout::ChunkLayout(const SlotTable& slots) {
  chunk_bytes_ = kMinChunkBytes;
  while (slots.total_bytes() / chunk_bytes_ > kMaxChunks) chunk_bytes_ <<= 1;
  chunk_shift_ = static_cast<unsigned>(std::countr_zero(chunk_bytes_ >> kPageShift));
  const uint64_t chunk_pages = chunk_bytes_ >> kPageShift;
  const auto all = slots.slots();
  for (size_t i = 0; i < all.size(); ++i) {
    first_chunk_.push_back(chunks_.size());
    for (uint64_t p = 0; p < all[i].pages(); p += chunk_pages) {
      first_page_.push_back(total_pages_ + p);
      chunks_.push_back({i, all[i].gpa + (p << kPageShift), std::min(chunk_pages, all[i].pages() - p)});
    }
    total_pages_ += all[i].pages();
  }
}

std::vector<uint64_t> DigestAllChunks(const SlotTable& slots, const ChunkLayout& layout, ZeroPages zero) {
  std::vector<uint64_t> out(layout.size());
  const auto all = slots.slots();
  tbb::parallel_for(tbb::blocked_range<size_t>(0, layout.size()), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t i = r.begin(); i != r.end(); ++i) {
      const ChunkLayout::Chunk& c = layout.chunk(i);
      const uint8_t* host = all[c.slot_index].host + (c.gpa - all[c.slot_index].gpa);
      uint64_t sum = 0;
      for (uint64_t p = 0; p < c.pages; ++p) sum += PageValueOf(c.gpa + (p << kPageShift), host + (p << kPageShift), zero);
      out[i] = sum;
    }
  });
  return out;
}

std::string DigestMismatch::Describe() const {
  if (empty()) return "every chunk matches";
  std::string s = std::to_string(chunks) + (chunks == 1 ? " chunk (" : " chunks (") + FormatBytes(bytes) +
                  (chunks == 1 ? ") differs: gpa " : ") differ: gpa ");
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (i > 0) s += ", ";
    s += FormatHex(ranges[i].gpa) + "-" + FormatHex(ranges[i].gpa + ranges[i].size - 1);
  }
  if (ranges_total > ranges.size()) s += " and " + std::to_string(ranges_total - ranges.size()) + " more ranges";
  return s;
}

DigestMismatch CompareChunkDigests(const ChunkLayout& layout, std::span<const uint64_t> mine,
                                   std::span<const uint64_t> theirs) {
  DigestMismatch m;
  uint64_t open_gpa = 0, open_end = 0;  // the range being merged; empty when equal
  auto close = [&] {
    if (open_end == open_gpa) return;
    ++m.ranges_total;
    if (m.ranges.size() < DigestMismatch::kMaxRanges) m.ranges.push_back({open_gpa, open_end - open_gpa});
    open_gpa = open_end = 0;
  };
  for (size_t i = 0; i < layout.size(); ++i) {
    if (mine[i] == theirs[i]) continue;
    const ChunkLayout::Chunk& c = layout.chunk(i);
    const uint64_t end = c.gpa + (c.pages << kPageShift);
    ++m.chunks;
    m.bytes += c.pages << kPageShift;
    if (open_end != open_gpa && open_end == c.gpa) {
      open_end = end;
    } else {
      close();
      open_gpa = c.gpa;
      open_end = end;
    }
  }
  close();
  return m;
}

PageDigestTable::PageDigestTable(const SlotTable& slots, Initial initial, ZeroPages zero)
    : slots_(slots), layout_(slots), zero_(zero) {
  // Zero-filled by the kernel, and untouched until written.
  auto zeroed = [](size_t n, Mapping* owner) {
    auto m = Mapping::Map(std::max<size_t>(n, 1) * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, "digest table");
    if (!m.ok()) throw std::bad_alloc();  // as `new` would: a table the size of memory's pages cannot fail quietly
    *owner = std::move(*m);
    return reinterpret_cast<uint64_t*>(owner->data());
  };
  values_ = zeroed(layout_.total_pages(), &values_map_);
  sums_ = zeroed(layout_.size(), &sums_map_);
  uint64_t first = 0;
  for (const MemorySlot& s : slots_.slots()) {
    slot_first_page_.push_back(first);
    first += s.pages();
  }
  if (initial == Initial::kUnset || (initial == Initial::kZero && zero == ZeroPages::kNull)) return;  // all 0
  const auto all = slots_.slots();
  tbb::parallel_for(tbb::blocked_range<size_t>(0, layout_.size()), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t i = r.begin(); i != r.end(); ++i) {
      const ChunkLayout::Chunk& c = layout_.chunk(i);
      const uint8_t* host = all[c.slot_index].host + (c.gpa - all[c.slot_index].gpa);
      const uint64_t first_page = layout_.FirstPage(i);
      uint64_t sum = 0;
      for (uint64_t p = 0; p < c.pages; ++p) {
        const uint64_t v = PageValueOf(c.gpa + (p << kPageShift),
                                       initial == Initial::kZero ? kZeroPage : host + (p << kPageShift), zero);
        value_at(first_page + p).store(v, std::memory_order_relaxed);
        sum += v;
      }
      sum_at(i).store(sum, std::memory_order_relaxed);
    }
  });
}

void PageDigestTable::Replace(size_t slot_index, uint64_t page, uint64_t value) {
  const uint64_t old = value_at(slot_first_page_[slot_index] + page).exchange(value, std::memory_order_relaxed);
  if (old != value) sum_at(layout_.ChunkOf(slot_index, page)).fetch_add(value - old, std::memory_order_relaxed);
}

void PageDigestTable::Update(uint64_t gpa, uint64_t pages) {
  const MemorySlot* s = slots_.FindByGpa(gpa);
  if (s == nullptr) return;
  const size_t index = static_cast<size_t>(s - slots_.slots().data());
  const uint64_t first = (gpa - s->gpa) >> kPageShift;
  for (uint64_t p = 0; p < pages && first + p < s->pages(); ++p) {
    const uint64_t at = gpa + (p << kPageShift);
    Replace(index, first + p, PageValueOf(at, s->host + (at - s->gpa), zero_));
  }
}

void PageDigestTable::SetZero(uint64_t gpa, uint64_t pages) {
  const MemorySlot* s = slots_.FindByGpa(gpa);
  if (s == nullptr) return;
  const size_t index = static_cast<size_t>(s - slots_.slots().data());
  const uint64_t first = (gpa - s->gpa) >> kPageShift;
  for (uint64_t p = 0; p < pages && first + p < s->pages(); ++p) {
    Replace(index, first + p, zero_ == ZeroPages::kNull ? 0 : PageValue(gpa + (p << kPageShift), kZeroPage));
  }
}

void PageDigestTable::SetFrom(uint64_t gpa, uint64_t pages, const uint8_t* data) {
  const MemorySlot* s = slots_.FindByGpa(gpa);
  if (s == nullptr) return;
  const size_t index = static_cast<size_t>(s - slots_.slots().data());
  const uint64_t first = (gpa - s->gpa) >> kPageShift;
  for (uint64_t p = 0; p < pages && first + p < s->pages(); ++p) {
    Replace(index, first + p, PageValueOf(gpa + (p << kPageShift), data + (p << kPageShift), zero_));
  }
}

void PageDigestTable::UpdateChunk(size_t i) {
  const ChunkLayout::Chunk& c = layout_.chunk(i);
  Update(c.gpa, c.pages);
}

std::vector<uint64_t> PageDigestTable::Snapshot() const {
  std::vector<uint64_t> out(layout_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = sum_at(i).load(std::memory_order_relaxed);
  return out;
}

}  // namespace pmlmig::engine
