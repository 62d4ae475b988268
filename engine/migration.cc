#include "pmlmig/engine/migration.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_reduce.h>
#include <xxhash.h>

namespace pmlmig::engine {

std::string_view OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kNone: return "none";
    case Outcome::kCompleted: return "completed";
    case Outcome::kFailed: return "failed";
    case Outcome::kCancelled: return "cancelled";
    case Outcome::kInDoubt: return "in-doubt";
  }
  return "unknown";
}

bool PageList::Next(uint64_t max_pages, PageRun* out) {
  std::lock_guard lock(mu_);
  while (run_ < runs_.size() && offset_ >= runs_[run_].pages) {
    ++run_;
    offset_ = 0;
  }
  if (run_ >= runs_.size() || max_pages == 0) return false;
  const PageRun& r = runs_[run_];
  const uint64_t n = std::min(max_pages, r.pages - offset_);
  out->gpa = r.gpa + (offset_ << kPageShift);
  out->pages = n;
  offset_ += n;
  return true;
}

uint64_t MemoryDigest(const SlotTable& slots) {
  // Per page: XXH3-64 seeded with the gpa, so a page that moved or a missing
  // page changes the result; pages combine by addition, so the parallel
  // reduction's order does not matter.
  uint64_t digest = 0;
  for (const MemorySlot& s : slots.slots()) {
    digest += tbb::parallel_reduce(
        tbb::blocked_range<uint64_t>(0, s.pages(), 4096), uint64_t{0},
        [&](const tbb::blocked_range<uint64_t>& r, uint64_t acc) {
          for (uint64_t p = r.begin(); p != r.end(); ++p) {
            acc += XXH3_64bits_withSeed(s.host + (p << kPageShift), kPageSize, s.gpa + (p << kPageShift));
          }
          return acc;
        },
        [](uint64_t a, uint64_t b) { return a + b; });
  }
  return digest;
}

}  // namespace pmlmig::engine
