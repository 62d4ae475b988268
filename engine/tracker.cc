#include "pmlmig/engine/tracker.h"

#include <string>

#include "pmlmig/engine/bitmap_tracker.h"
#include "pmlmig/engine/dirty_ring.h"

namespace pmlmig::engine {

void TrackerCounters::RecordCollection(uint64_t pages, uint64_t ns) {
  collections.fetch_add(1, std::memory_order_relaxed);
  pages_collected.fetch_add(pages, std::memory_order_relaxed);
  collect_ns_total.fetch_add(ns, std::memory_order_relaxed);
  last_collect_ns.store(ns, std::memory_order_relaxed);
  last_pages.store(pages, std::memory_order_relaxed);
}

TrackerStats TrackerCounters::Snapshot() const {
  TrackerStats s;
  s.collections = collections.load(std::memory_order_relaxed);
  s.pages_collected = pages_collected.load(std::memory_order_relaxed);
  s.collect_ns_total = collect_ns_total.load(std::memory_order_relaxed);
  s.last_collect_ns = last_collect_ns.load(std::memory_order_relaxed);
  s.last_pages = last_pages.load(std::memory_order_relaxed);
  s.entries_harvested = entries_harvested.load(std::memory_order_relaxed);
  s.overflows = overflows.load(std::memory_order_relaxed);
  s.ring_full_exits = ring_full_exits.load(std::memory_order_relaxed);
  s.background_harvests = background_harvests.load(std::memory_order_relaxed);
  s.background_user_ns = background_user_ns.load(std::memory_order_relaxed);
  s.background_sys_ns = background_sys_ns.load(std::memory_order_relaxed);
  return s;
}

Result<TrackerKind> ParseTrackerKind(std::string_view name) {
  if (name == "none") return TrackerKind::kNone;
  if (name == "ring") return TrackerKind::kRing;
  if (name == "bitmap") return TrackerKind::kBitmap;
  if (name == "bitmap-clear") return TrackerKind::kBitmapClear;
  return InvalidArgument("unknown tracker '" + std::string(name) + "' (expected ring, bitmap, bitmap-clear or none)");
}

std::string_view TrackerKindName(TrackerKind kind) {
  switch (kind) {
    case TrackerKind::kNone: return "none";
    case TrackerKind::kRing: return "ring";
    case TrackerKind::kBitmap: return "bitmap";
    case TrackerKind::kBitmapClear: return "bitmap-clear";
  }
  return "unknown";
}

Result<std::unique_ptr<DirtyTracker>> CreateTracker(TrackerKind kind, VmControl& vm, const TrackerOptions& options) {
  switch (kind) {
    case TrackerKind::kNone: return std::unique_ptr<DirtyTracker>();
    case TrackerKind::kRing: {
      DirtyRingOptions o;
      o.collector_period = options.ring_collector_period;
      PMLMIG_ASSIGN_OR_RETURN(auto t, DirtyRingTracker::Create(vm, o));
      return std::unique_ptr<DirtyTracker>(std::move(t));
    }
    case TrackerKind::kBitmap:
    case TrackerKind::kBitmapClear: {
      BitmapOptions o;
      o.manual_clear = kind == TrackerKind::kBitmapClear;
      o.clear_chunk_bytes = options.clear_chunk_bytes;
      PMLMIG_ASSIGN_OR_RETURN(auto t, BitmapTracker::Create(vm, o));
      return std::unique_ptr<DirtyTracker>(std::move(t));
    }
  }
  return InvalidArgument("unknown tracker kind");
}

}  // namespace pmlmig::engine

namespace pmlmig::engine {

Status UnionTracker::Enable() {
  for (size_t i = 0; i < parts_.size(); ++i) {
    if (Status s = parts_[i]->Enable(); !s.ok()) {
      for (size_t j = 0; j < i; ++j) (void)parts_[j]->Disable();
      return s;
    }
  }
  return Status::Ok();
}

Status UnionTracker::Collect(DirtySet& out) {
  // Every part collects (and re-protects) even if one fails, so no part is
  // left holding pages that the caller then copies without re-protection.
  Status first;
  for (DirtyTracker* t : parts_) {
    Status s = t->Collect(out);
    if (first.ok()) first = s;
  }
  return first;
}

Status UnionTracker::Disable() {
  Status first;
  for (DirtyTracker* t : parts_) {
    Status s = t->Disable();
    if (first.ok()) first = s;
  }
  return first;
}

TrackerStats UnionTracker::stats() const {
  TrackerStats sum;
  for (const DirtyTracker* t : parts_) {
    const TrackerStats s = t->stats();
    sum.collections = std::max(sum.collections, s.collections);
    sum.pages_collected += s.pages_collected;
    sum.collect_ns_total += s.collect_ns_total;
    sum.last_collect_ns += s.last_collect_ns;
    sum.last_pages += s.last_pages;
    sum.entries_harvested += s.entries_harvested;
    sum.overflows += s.overflows;
    sum.ring_full_exits += s.ring_full_exits;
    sum.background_harvests += s.background_harvests;
    sum.background_user_ns += s.background_user_ns;
    sum.background_sys_ns += s.background_sys_ns;
  }
  return sum;
}

}  // namespace pmlmig::engine
