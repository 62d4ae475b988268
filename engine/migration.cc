#include "pmlmig/engine/migration.h"

#include "pmlmig/engine/memory_digest.h"

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

std::string_view VerifyOrderName(VerifyOrder order) {
  switch (order) {
    case VerifyOrder::kBeforeCommit: return "before-commit";
    case VerifyOrder::kAfterCommit: return "after-commit";
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
  uint64_t digest = 0;
  for (uint64_t d : DigestAllChunks(slots, ChunkLayout(slots))) digest += d;
  return digest;
}

}  // namespace pmlmig::engine
