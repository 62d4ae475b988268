#include "pmlmig/engine/tracker.h"

#include <string>

#include "pmlmig/engine/bitmap_tracker.h"
#include "pmlmig/engine/dirty_ring.h"

namespace pmlmig::engine {

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
