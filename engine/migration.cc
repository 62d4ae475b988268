#include "pmlmig/engine/migration.h"

#include <algorithm>

#include "pmlmig/engine/memory_digest.h"

namespace pmlmig::engine {

std::string_view OutcomeName(Outcome outcome) {
  switch (outcome) {
    case Outcome::kNone: return "none";
    case Outcome::kCompleted: return "completed";
    case Outcome::kFailed: return "failed";
    case Outcome::kCancelled: return "cancelled";
    case Outcome::kInDoubt: return "in-doubt";
    case Outcome::kPostcopyFailed: return "postcopy-failed";
  }
  return "unknown";
}

std::string_view VerifyOrderName(VerifyOrder order) {
  switch (order) {
    case VerifyOrder::kBeforeCommit: return "before-commit";
    case VerifyOrder::kAfterCommit: return "after-commit";
  }
  return "unknown";
}

PageList::PageList(std::vector<PageRun> runs) {
  runs_.reserve(runs.size());
  starts_.reserve(runs.size());
  for (const PageRun& r : runs) {
    if (r.pages == 0) continue;
    runs_.push_back(r);
    starts_.push_back(total_pages_);
    total_pages_ += r.pages;
  }
}

bool PageList::Next(uint64_t max_pages, PageRun* out) {
  if (max_pages == 0) return false;
  uint64_t at = next_.load(std::memory_order_relaxed);
  for (;;) {
    if (at >= total_pages_) return false;
    // The run holding page `at`: the last one starting at or before it.
    const size_t i = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), at) - starts_.begin()) - 1;
    const uint64_t offset = at - starts_[i];
    const uint64_t n = std::min(max_pages, runs_[i].pages - offset);
    if (next_.compare_exchange_weak(at, at + n, std::memory_order_relaxed)) {
      out->gpa = runs_[i].gpa + (offset << kPageShift);
      out->pages = n;
      return true;
    }
  }
}

uint64_t MemoryDigest(const SlotTable& slots) {
  uint64_t digest = 0;
  for (uint64_t d : DigestAllChunks(slots, ChunkLayout(slots))) digest += d;
  return digest;
}

}  // namespace pmlmig::engine
