#include "pmlmig/base/units.h"
#include "pmlmig/engine/pml_model.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdio>
#include <string>

namespace pmlmig::engine {
namespace {

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

PmlModel::PmlModel(const SlotTable& slots, PmlFormat format)
    : format_(format), log_(std::make_unique<PmlLogPage>()) {
  uint64_t words = 0;
  for (const MemorySlot& m : slots.slots()) {  // already sorted by gpa
    regions_.push_back(Region{m.gpa, m.pages(), words});
    words += (m.pages() + 63) / 64;
    total_pages_ += m.pages();
  }
  // A region that holds no page, so Find() needs no emptiness check.
  if (regions_.empty()) regions_.push_back(Region{});
  dirty_.assign(words, 0);
}

PmlModel::Region* PmlModel::FindSlow(uint64_t gpa) {
  for (size_t i = 0; i < regions_.size(); ++i) {
    if (((gpa - regions_[i].gpa) >> kPageShift) < regions_[i].pages) {
      hint_ = i;
      return &regions_[i];
    }
  }
  return nullptr;
}

const PmlModel::Region* PmlModel::FindConst(uint64_t gpa) const {
  for (const Region& r : regions_) {
    if (((gpa - r.gpa) >> kPageShift) < r.pages) return &r;
  }
  return nullptr;
}

Status PmlModel::OutsideGuestMemory(uint64_t gpa) const {
  return InvalidArgument("pml model: write to gpa " + FormatHex(gpa) + " outside guest memory");
}

Status PmlModel::TakeFullExit() {
  ++full_exits_;
  if (!on_full_) {
    return Internal("pml model: PML-full exit (index " + FormatHex(index_) + ") with no handler");
  }
  Status s = on_full_(*this);
  if (!s.ok()) return s.WithContext("pml model: PML-full exit handler");
  if (PmlLogFull(format_, index_)) {
    return Internal("pml model: PML-full exit handler left the log full (index " + FormatHex(index_) + ")");
  }
  return Status::Ok();
}

void PmlModel::ClearAllDirtyBits() { std::fill(dirty_.begin(), dirty_.end(), 0); }

bool PmlModel::ClearDirtyBit(uint64_t gpa) {
  Region* r = Find(gpa);
  if (r == nullptr) return false;
  const uint64_t page = (gpa - r->gpa) >> kPageShift;
  dirty_[r->first_word + (page >> 6)] &= ~(1ull << (page & 63));
  return true;
}

bool PmlModel::DirtyBit(uint64_t gpa) const {
  const Region* r = FindConst(gpa);
  if (r == nullptr) return false;
  const uint64_t page = (gpa - r->gpa) >> kPageShift;
  return (dirty_[r->first_word + (page >> 6)] >> (page & 63)) & 1;
}

uint64_t PmlModel::CountDirtyBits() const {
  uint64_t n = 0;
  for (uint64_t w : dirty_) n += static_cast<uint64_t>(std::popcount(w));
  return n;
}

PmlModelTracker::PmlModelTracker(const SlotTable& slots, PmlFormat format)
    : model_(slots, format), pending_(slots) {
  // The tracker is neither copyable nor movable, so `this` stays valid for
  // the model's lifetime (the model is a member).
  model_.set_full_exit_handler([this](PmlModel& m) { return OnFullExit(m); });
}

Status PmlModelTracker::DrainIntoPending() {
  PmlDrainStats st;
  Result<uint32_t> r = DrainPmlLog(model_.format(), model_.log(), model_.index(), pending_, &st);
  // Reset even after an error: every in-slot entry was marked, and a log left
  // full would stop the guest at its next logging write.
  model_.ResetLog();
  counters_.entries_harvested.fetch_add(st.valid, std::memory_order_relaxed);
  return r.status();
}

Status PmlModelTracker::OnFullExit(PmlModel&) {
  counters_.background_harvests.fetch_add(1, std::memory_order_relaxed);
  Status s = DrainIntoPending();
  // Keep the guest running (as KVM does after a bad entry) and report the
  // first error at the next Collect.
  if (!s.ok() && error_.ok()) error_ = s;
  return Status::Ok();
}

Status PmlModelTracker::Enable() {
  model_.set_logging(false);
  model_.ClearAllDirtyBits();
  model_.ResetLog();
  pending_.Clear();
  error_ = Status::Ok();
  model_.set_logging(true);
  enabled_ = true;
  return Status::Ok();
}

Status PmlModelTracker::Collect(DirtySet& out) {
  if (!enabled_) return InvalidArgument("pml-model tracker: Collect before Enable");
  if (!out.SameGeometry(pending_)) return InvalidArgument("pml-model tracker: dirty set does not match the memslots");
  const uint64_t start = NowNs();
  // 1. The flush a VM exit does: the partial log joins what full exits drained.
  Status flush = DrainIntoPending();
  if (!flush.ok() && error_.ok()) error_ = flush;
  // 2. Report and re-protect exactly the pages in pending_.
  uint64_t pages = pending_.TakeEach([&](uint64_t gpa) {
    out.MarkGpa(gpa);
    model_.ClearDirtyBit(gpa);
  });
  // 3. Self-check: a dirty bit still set belongs to a page that was logged
  // (or dirtied) but never reported, and its next write would log nothing.
  // Report every page and start clean rather than miss one.
  if (model_.CountDirtyBits() != 0) [[unlikely]] {
    out.MarkAll();
    model_.ClearAllDirtyBits();
    counters_.overflows.fetch_add(1, std::memory_order_relaxed);
    pages = out.Count();
  }
  const uint64_t ns = NowNs() - start;
  counters_.RecordCollection(pages, ns);
  Status err = error_;
  error_ = Status::Ok();
  return err;
}

Status PmlModelTracker::Disable() {
  model_.set_logging(false);
  model_.ResetLog();
  pending_.Clear();
  enabled_ = false;
  return Status::Ok();
}

TrackerStats PmlModelTracker::stats() const { return counters_.Snapshot(); }

}  // namespace pmlmig::engine
