#include "pmlmig/engine/slot_table.h"

#include <gtest/gtest.h>

namespace pmlmig::engine {
namespace {

uint8_t* Host(uintptr_t a) { return reinterpret_cast<uint8_t*>(a); }

TEST(SlotTableTest, AddFindAndTranslate) {
  SlotTable t;
  ASSERT_TRUE(t.Set({1, 4ull << 30, Host(0x7f0000000000), 1ull << 30, 0}).ok());
  ASSERT_TRUE(t.Set({0, 0, Host(0x7e0000000000), 3ull << 30, 0}).ok());
  ASSERT_EQ(t.slots().size(), 2u);
  EXPECT_EQ(t.slots()[0].slot, 0u);  // sorted by gpa
  EXPECT_EQ(t.FindByGpa(0x1000)->slot, 0u);
  EXPECT_EQ(t.FindByGpa(3ull << 30), nullptr);  // the hole
  EXPECT_EQ(t.FindByGpa((4ull << 30) + 5)->slot, 1u);
  EXPECT_EQ(t.HostAddress((4ull << 30) + 0x2000, 0x1000), Host(0x7f0000002000));
  EXPECT_EQ(t.HostAddress((3ull << 30) - 0x1000, 0x2000), nullptr);  // crosses the slot end
  EXPECT_EQ(t.total_bytes(), 4ull << 30);
}

TEST(SlotTableTest, RejectsOverlapAndMisalignment) {
  SlotTable t;
  ASSERT_TRUE(t.Set({0, 0, Host(0x100000000), 0x100000, 0}).ok());
  Status s = t.Set({1, 0x80000, Host(0x200000000), 0x100000, 0});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("overlaps slot 0"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("guest-physical"), std::string::npos);
  s = t.Set({1, 0x200000, Host(0x100080000), 0x100000, 0});
  EXPECT_NE(s.message().find("host memory"), std::string::npos) << s.message();
  EXPECT_FALSE(t.Set({2, 0x300001, Host(0x300000000), 0x1000, 0}).ok());
  EXPECT_FALSE(t.Set({2, 0x300000, Host(0x300000000), 0, 0}).ok());
  EXPECT_FALSE(t.Set({2, ~0ull & ~0xfffull, Host(0x300000000), 0x2000, 0}).ok());
  EXPECT_EQ(t.slots().size(), 1u);
}

TEST(SlotTableTest, ReplaceSameSlotId) {
  SlotTable t;
  ASSERT_TRUE(t.Set({0, 0, Host(0x100000000), 0x100000, 0}).ok());
  ASSERT_TRUE(t.Set({0, 0, Host(0x100000000), 0x100000, 1}).ok());  // flags change
  ASSERT_EQ(t.slots().size(), 1u);
  EXPECT_EQ(t.slots()[0].flags, 1u);
}

}  // namespace
}  // namespace pmlmig::engine
