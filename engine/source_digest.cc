#include "pmlmig/engine/source_digest.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <chrono>

#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/userspace_tracker.h"

namespace pmlmig::engine {

namespace {
// Runs split so that parallel hashing at the pause balances across threads.
constexpr uint64_t kPauseRunPages = 64;
}  // namespace

SourceDigest::SourceDigest(const SlotTable& slots)
    : slots_(slots), table_(slots, PageDigestTable::Initial::kUnset), queued_(slots) {}

SourceDigest::~SourceDigest() {
  StopBackground();
  if (witness_) (void)witness_->Disable();
}

void SourceDigest::Start() {
  auto witness = std::make_unique<UserspaceWriteTracker>(slots_, UserspaceTrackerOptions{
                                                                     .mode = UserspaceTrackMode::kUffdWpAsync});
  if (Status s = witness->Enable(); s.ok()) {
    witness_ = std::move(witness);
    stats_.witness = true;
  } else {
    stats_.no_witness_reason = s.message();
  }
  queued_.MarkAll();
  if (!witness_) return;  // everything is hashed at the pause: memory read earlier proves nothing
  thread_ = std::thread([this] { Background(); });
}

void SourceDigest::Background() {
  // Passes over the queue until stopped; a page taken while stopping goes
  // back for AtPause. Refresh adds pages between passes.
  while (!stop_.load(std::memory_order_acquire)) {
    uint64_t hashed = 0;
    queued_.TakeEach([&](uint64_t gpa) {
      if (stop_.load(std::memory_order_relaxed)) {
        queued_.MarkGpa(gpa);
        return;
      }
      table_.Update(gpa, 1);
      ++hashed;
    });
    background_pages_.fetch_add(hashed, std::memory_order_relaxed);
    if (hashed == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

void SourceDigest::StopBackground() {
  stop_.store(true, std::memory_order_release);
  if (thread_.joinable()) thread_.join();
}

Status SourceDigest::Refresh() {
  if (!witness_) return Status::Ok();
  // Written pages are re-protected before Collect returns, so the thread's
  // later read of them is after the protection (the tracker ordering rule).
  return witness_->Collect(queued_).WithContext("verification witness");
}

void SourceDigest::Queue(const DirtySet& pages) {
  pages.ForEach([&](uint64_t gpa) { queued_.MarkGpa(gpa); });
}

Result<std::vector<uint64_t>> SourceDigest::AtPause() {
  const auto start = std::chrono::steady_clock::now();
  StopBackground();
  if (witness_) {
    if (Status s = witness_->Collect(queued_); !s.ok()) return s.WithContext("verification witness");
  }
  std::vector<PageRun> pieces;
  for (const PageRun& r : RunsOf(queued_)) {
    for (uint64_t p = 0; p < r.pages; p += kPauseRunPages) {
      pieces.push_back({r.gpa + (p << kPageShift), std::min(kPauseRunPages, r.pages - p)});
    }
  }
  tbb::parallel_for(tbb::blocked_range<size_t>(0, pieces.size()), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t i = r.begin(); i != r.end(); ++i) table_.Update(pieces[i].gpa, pieces[i].pages);
  });
  for (const PageRun& p : pieces) stats_.pause_pages += p.pages;
  stats_.background_pages = background_pages_.load(std::memory_order_relaxed);
  stats_.pause_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return table_.Snapshot();
}

}  // namespace pmlmig::engine
