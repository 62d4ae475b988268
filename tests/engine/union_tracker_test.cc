// The union of trackers: guest writes seen by one (here the PML model), the
// VMM's own writes by another (explicit userspace marks).
#include <gtest/gtest.h>

#include "pmlmig/engine/pml_model.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/userspace_tracker.h"

namespace pmlmig::engine {
namespace {

TEST(UnionTrackerTest, ReportsWhatEitherPartSaw) {
  SlotTable slots;
  ASSERT_TRUE(slots.Set({0, 0, reinterpret_cast<uint8_t*>(0x100000000000), 16ull << 20, 0}).ok());
  PmlModelTracker pml(slots, PmlFormat::kVmx);
  UserspaceTrackerOptions uo;
  uo.mode = UserspaceTrackMode::kExplicitOnly;
  UserspaceWriteTracker vmm_writes(slots, uo);
  UnionTracker both({&pml, &vmm_writes});
  ASSERT_TRUE(both.Enable().ok());

  ASSERT_TRUE(pml.model().Write(0x5000).ok());          // a guest write
  ASSERT_TRUE(vmm_writes.MarkDirty(0x9000, 0x2000).ok());  // the VMM wrote two pages
  DirtySet out(slots);
  ASSERT_TRUE(both.Collect(out).ok());
  EXPECT_EQ(out.Count(), 3u);
  EXPECT_TRUE(out.TestGpa(0x5000));
  EXPECT_TRUE(out.TestGpa(0x9000));
  EXPECT_TRUE(out.TestGpa(0xa000));
  EXPECT_EQ(both.stats().pages_collected, 3u);

  out.Clear();
  ASSERT_TRUE(both.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u);  // both re-armed
  ASSERT_TRUE(pml.model().Write(0x5000).ok());
  ASSERT_TRUE(both.Collect(out).ok());
  EXPECT_EQ(out.Count(), 1u);
  ASSERT_TRUE(both.Disable().ok());
}

}  // namespace
}  // namespace pmlmig::engine
