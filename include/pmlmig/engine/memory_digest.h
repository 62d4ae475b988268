// Memory digests for verifying a migration: both sides digest guest memory
// per chunk, so a mismatch names the guest-physical ranges that differ.
//
//   page value   XXH3-64 of the 4 KiB page, seeded with its gpa: one flipped
//                bit or a page at another address changes it.
//   chunk digest the sum (mod 2^64) of its pages' values. A chunk is
//                ChunkLayout::chunk_bytes() (2 MiB for guests up to 128 GiB)
//                of one memory slot; a chunk never spans two slots.
//   memory digest the sum of all chunk digests: MemoryDigest() of
//                migration.h, so a peer that knows only the whole-memory
//                digest still compares.
// Sums make the digest independent of the order pages were hashed in
// (parallel, across streams and rounds) and let a page's value be replaced
// without rehashing its chunk: PageDigestTable keeps every page's value and
// every chunk's sum, updated as pages are written (the target, as batches are
// applied) or re-read (the source, see source_digest.h).
//
// Thread-safety: ChunkLayout is immutable. PageDigestTable::Update and Set
// may run concurrently from any threads (atomics); Snapshot while none runs
// gives the state after them.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {

// The value of the 4 KiB page at `page` that lives at `gpa`.
uint64_t PageValue(uint64_t gpa, const uint8_t* page);

// How a zero page counts. kHashed: PageValue like any page (the migration
// digests, both sides, every version). kNull: 0, so that memory nobody
// wrote costs nothing to digest (snapshot files: a 4 GiB untouched guest is
// digested without hashing 4 GiB of zeros). A nonzero page keeps its
// PageValue either way, so a flipped bit or a page at another address still
// changes its chunk's digest; a page that became zero (or nonzero) too.
enum class ZeroPages : uint8_t { kHashed, kNull };
// PageValue, or 0 for a zero page under kNull.
uint64_t PageValueOf(uint64_t gpa, const uint8_t* page, ZeroPages zero);

class ChunkLayout {
 public:
  ChunkLayout() = default;
  explicit ChunkLayout(const SlotTable& slots);

  struct Chunk {
    size_t slot_index = 0;  // into SlotTable::slots()
    uint64_t gpa = 0;
    uint64_t pages = 0;
  };
  size_t size() const { return chunks_.size(); }
  const Chunk& chunk(size_t i) const { return chunks_[i]; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t total_pages() const { return total_pages_; }
  // The chunk holding page `page` of slot `slot_index`.
  size_t ChunkOf(size_t slot_index, uint64_t page) const {
    return first_chunk_[slot_index] + static_cast<size_t>(page >> chunk_shift_);
  }
  // Page index (over all slots, in slot order) of the first page of chunk i.
  uint64_t FirstPage(size_t i) const { return first_page_[i]; }

 private:
  std::vector<Chunk> chunks_;
  std::vector<size_t> first_chunk_;    // per slot
  std::vector<uint64_t> first_page_;   // per chunk
  uint64_t chunk_bytes_ = 0;
  unsigned chunk_shift_ = 0;           // log2 of pages per chunk
  uint64_t total_pages_ = 0;
};

// Digests every chunk of `slots` from its memory now, in parallel.
std::vector<uint64_t> DigestAllChunks(const SlotTable& slots, const ChunkLayout& layout,
                                      ZeroPages zero = ZeroPages::kHashed);

// Where two sets of chunk digests differ.
struct DigestMismatch {
  uint64_t chunks = 0;                // chunks that differ
  uint64_t bytes = 0;                 // their size
  struct Range {
    uint64_t gpa = 0;
    uint64_t size = 0;
  };
  std::vector<Range> ranges;          // adjacent differing chunks merged, at most kMaxRanges
  uint64_t ranges_total = 0;          // how many there are in all
  static constexpr size_t kMaxRanges = 16;
  bool empty() const { return chunks == 0; }
  // "3 chunks (6 MiB) differ: gpa 0x200000-0x5fffff, 0x10000000-0x101fffff".
  std::string Describe() const;
};

// Compares chunk by chunk; `mine` and `theirs` must both have layout.size()
// entries (the caller checks).
DigestMismatch CompareChunkDigests(const ChunkLayout& layout, std::span<const uint64_t> mine,
                                   std::span<const uint64_t> theirs);

// Every page's value and every chunk's sum, kept up to date as pages change.
class PageDigestTable {
 public:
  enum class Initial : uint8_t {
    kRead,   // the values of `slots`' memory now (read in parallel)
    kZero,   // of zero pages, memory not read (a target's freshly built, zeroed memory)
    kUnset,  // 0: the caller Updates every page before a Snapshot means anything
  };
  PageDigestTable(const SlotTable& slots, Initial initial, ZeroPages zero = ZeroPages::kHashed);

  const ChunkLayout& layout() const { return layout_; }
  // Re-reads `pages` pages from `gpa` (inside one slot; the caller checked)
  // and replaces their values.
  void Update(uint64_t gpa, uint64_t pages);
  // Replaces the values of `pages` pages from `gpa` by those of zero pages.
  void SetZero(uint64_t gpa, uint64_t pages);
  // Replaces the values of `pages` pages from `gpa` by those of `data`
  // (pages * 4096 bytes): what was written there, read from the writer's
  // buffer rather than from memory (post-copy: the guest may already be
  // writing the page).
  void SetFrom(uint64_t gpa, uint64_t pages, const uint8_t* data);
  // Re-reads every page of chunk `i`.
  void UpdateChunk(size_t i);
  std::vector<uint64_t> Snapshot() const;

 private:
  void Replace(size_t slot_index, uint64_t page, uint64_t value);

  SlotTable slots_;
  ChunkLayout layout_;
  ZeroPages zero_ = ZeroPages::kHashed;
  // Anonymous mappings, so that a table that starts at 0 (kUnset, or kZero
  // with ZeroPages::kNull) costs no page until its entries are written (a
  // 16 GiB guest's is 32 MiB). Accessed through std::atomic_ref.
  Mapping values_map_, sums_map_;
  uint64_t* values_ = nullptr;  // per page, slot order
  uint64_t* sums_ = nullptr;    // per chunk
  std::atomic_ref<uint64_t> value_at(uint64_t i) const { return std::atomic_ref<uint64_t>(values_[i]); }
  std::atomic_ref<uint64_t> sum_at(size_t i) const { return std::atomic_ref<uint64_t>(sums_[i]); }
  std::vector<uint64_t> slot_first_page_;
};

}  // namespace pmlmig::engine
