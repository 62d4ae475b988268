#include "pmlmig/engine/dirty_set.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <thread>

namespace pmlmig::engine {
namespace {

SlotTable TwoSlots() {
  SlotTable t;
  // Geometry only: host addresses are never dereferenced by DirtySet.
  EXPECT_TRUE(t.Set({0, 0, reinterpret_cast<uint8_t*>(0x100000000000), 3ull << 30, 0}).ok());
  EXPECT_TRUE(t.Set({1, 4ull << 30, reinterpret_cast<uint8_t*>(0x200000000000), (1ull << 30) + 4096 * 5, 0}).ok());
  return t;
}

TEST(DirtySetTest, SizedFromSlotsOneBitPerPage) {
  DirtySet d(TwoSlots());
  ASSERT_EQ(d.slots().size(), 2u);
  EXPECT_EQ(d.total_pages(), ((4ull << 30) >> 12) + 5);
  EXPECT_EQ(d.slots()[1].words, (((1ull << 30) >> 12) + 5 + 63) / 64);
  EXPECT_EQ(d.Count(), 0u);
}

TEST(DirtySetTest, MarkTestAndRejectOutOfRange) {
  DirtySet d(TwoSlots());
  EXPECT_TRUE(d.MarkSlotPage(0, 0));
  EXPECT_TRUE(d.MarkSlotPage(1, ((1ull << 30) >> 12) + 4));  // last page of slot 1
  EXPECT_FALSE(d.MarkSlotPage(1, ((1ull << 30) >> 12) + 5));  // one past
  EXPECT_FALSE(d.MarkSlotPage(2, 0));                         // no slot 2
  EXPECT_FALSE(d.MarkSlotPage(0x10000, 0));                   // another address space
  EXPECT_FALSE(d.MarkGpa(3ull << 30));                        // the hole
  EXPECT_TRUE(d.MarkGpa((4ull << 30) + 0x1234));
  EXPECT_TRUE(d.TestGpa((4ull << 30) + 0x1000));
  EXPECT_FALSE(d.TestGpa(4ull << 30));
  EXPECT_EQ(d.Count(), 3u);
  EXPECT_TRUE(d.MarkRange(0x1fff, 2).ok());  // straddles pages 1 and 2
  EXPECT_TRUE(d.TestGpa(0x1000) && d.TestGpa(0x2000));
  Status s = d.MarkRange((3ull << 30) - 4096, 8192);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("leaves guest memory at gpa 0xc0000000"), std::string::npos) << s.message();
}

TEST(DirtySetTest, TakeEachIsOrderedAndClears) {
  DirtySet d(TwoSlots());
  std::mt19937_64 rng(1);
  std::set<uint64_t> expect;
  for (int i = 0; i < 5000; ++i) {
    const uint64_t gpa = (rng() % (4ull << 30)) & ~0xfffull;
    const uint64_t g = gpa < (3ull << 30) ? gpa : gpa + (1ull << 30);
    ASSERT_TRUE(d.MarkGpa(g));
    expect.insert(g);
  }
  std::vector<uint64_t> got;
  EXPECT_EQ(d.TakeEach([&](uint64_t gpa) { got.push_back(gpa); }), expect.size());
  EXPECT_EQ(std::vector<uint64_t>(expect.begin(), expect.end()), got);
  EXPECT_EQ(d.Count(), 0u);
}

TEST(DirtySetTest, OrBitmapAlignedAndUnaligned) {
  DirtySet d(TwoSlots());
  std::vector<uint64_t> bm = {0x8000000000000001ull, 0xffull};
  d.OrBitmap(0, 128, bm.data(), 70);  // only the first 70 bits count
  EXPECT_TRUE(d.TestGpa(128 * 4096));
  EXPECT_TRUE(d.TestGpa(191 * 4096));
  EXPECT_TRUE(d.TestGpa(197 * 4096));
  EXPECT_FALSE(d.TestGpa(198 * 4096));
  EXPECT_EQ(d.Count(), 8u);
  d.Clear();
  d.OrBitmap(0, 3, bm.data(), 65);
  EXPECT_TRUE(d.TestGpa(3 * 4096));
  EXPECT_TRUE(d.TestGpa(66 * 4096));
  EXPECT_TRUE(d.TestGpa(67 * 4096));
  EXPECT_EQ(d.Count(), 3u);
}

TEST(DirtySetTest, MarkAllCoversExactlyEveryPage) {
  DirtySet d(TwoSlots());
  d.MarkAll();
  EXPECT_EQ(d.Count(), d.total_pages());
}

TEST(DirtySetTest, ConcurrentMarkAndTakeLoseNothing) {
  SlotTable t;
  ASSERT_TRUE(t.Set({0, 0, reinterpret_cast<uint8_t*>(0x100000000000), 64ull << 20, 0}).ok());
  DirtySet live(t), taken(t);
  const uint64_t pages = (64ull << 20) >> 12;
  std::atomic<bool> done{false};
  std::vector<std::thread> writers;
  for (int w = 0; w < 2; ++w) {
    writers.emplace_back([&, w] {
      for (uint64_t p = static_cast<uint64_t>(w); p < pages; p += 2) live.MarkSlotPage(0, p);
    });
  }
  std::thread taker([&] {
    while (!done.load()) live.TakeInto(taken);
  });
  for (auto& w : writers) w.join();
  done = true;
  taker.join();
  live.TakeInto(taken);
  EXPECT_EQ(taken.Count(), pages);
}

}  // namespace
}  // namespace pmlmig::engine
