// The ring harvester against synthetic rings in plain memory, with the test
// playing KVM: publishing entries, checking RESET marks, wrapping around.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "pmlmig/engine/dirty_ring.h"

namespace pmlmig::engine {
namespace {

constexpr uint32_t kDirty = 1, kReset = 2;

SlotTable Slots() {
  SlotTable t;
  EXPECT_TRUE(t.Set({0, 0, reinterpret_cast<uint8_t*>(0x100000000000), 16ull << 20, 0}).ok());
  EXPECT_TRUE(t.Set({1, 4ull << 30, reinterpret_cast<uint8_t*>(0x200000000000), 8ull << 20, 0}).ok());
  return t;
}

struct FakeKvmRing {
  explicit FakeKvmRing(uint32_t n) : entries(n) {}
  std::vector<kvm_dirty_gfn> entries;
  uint64_t push = 0;   // next entry KVM writes
  uint64_t reset = 0;  // next entry KVM_RESET_DIRTY_RINGS looks at
  bool Push(uint32_t slot, uint64_t offset) {
    kvm_dirty_gfn& e = entries[push % entries.size()];
    if (std::atomic_ref<uint32_t>(e.flags).load(std::memory_order_acquire) != 0) return false;  // full
    e.slot = slot;
    e.offset = offset;
    std::atomic_ref<uint32_t>(e.flags).store(kDirty, std::memory_order_release);
    ++push;
    return true;
  }
  // What KVM_RESET_DIRTY_RINGS does: recycle RESET entries in order.
  uint32_t Reset() {
    uint32_t n = 0;
    while (reset < push) {
      kvm_dirty_gfn& e = entries[reset % entries.size()];
      if (std::atomic_ref<uint32_t>(e.flags).load(std::memory_order_acquire) != kReset) break;
      std::atomic_ref<uint32_t>(e.flags).store(0, std::memory_order_relaxed);
      ++reset;
      ++n;
    }
    return n;
  }
};

TEST(RingHarvesterTest, HarvestsInOrderMarksResetAndStopsAtUnpublished) {
  FakeKvmRing ring(16);
  RingHarvester h(ring.entries.data(), 16);
  DirtySet set(Slots());
  ASSERT_TRUE(ring.Push(0, 5));
  ASSERT_TRUE(ring.Push(1, 7));
  ASSERT_TRUE(ring.Push(0, 5));  // the same page twice: two entries, one page
  auto r = h.Harvest(set);
  EXPECT_EQ(r.harvested, 3u);
  EXPECT_EQ(r.invalid, 0u);
  EXPECT_EQ(set.Count(), 2u);
  EXPECT_TRUE(set.TestGpa(5 * 4096));
  EXPECT_TRUE(set.TestGpa((4ull << 30) + 7 * 4096));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(ring.entries[static_cast<size_t>(i)].flags, kReset);
  EXPECT_EQ(ring.entries[3].flags, 0u);
  EXPECT_EQ(ring.Reset(), 3u);
  EXPECT_EQ(h.Harvest(set).harvested, 0u);
}

TEST(RingHarvesterTest, MalformedEntriesAreCountedNeverWritten) {
  FakeKvmRing ring(8);
  RingHarvester h(ring.entries.data(), 8);
  DirtySet set(Slots());
  ASSERT_TRUE(ring.Push(2, 0));             // no such slot
  ASSERT_TRUE(ring.Push(0, 4096));          // slot 0 has 4096 pages: one past the end
  ASSERT_TRUE(ring.Push(1u | (1u << 16), 1));  // address space 1
  ASSERT_TRUE(ring.Push(0, ~0ull));         // absurd offset
  ASSERT_TRUE(ring.Push(0, 4095));          // the last valid page
  auto r = h.Harvest(set);
  EXPECT_EQ(r.harvested, 5u);
  EXPECT_EQ(r.invalid, 4u);
  EXPECT_EQ(r.first_bad_slot, 2u);
  EXPECT_EQ(set.Count(), 1u);
  EXPECT_TRUE(set.TestGpa(4095ull * 4096));
  EXPECT_EQ(ring.Reset(), 5u);  // bad entries are still taken, so the ring keeps moving
}

TEST(RingHarvesterTest, WrapsAroundManyTimes) {
  FakeKvmRing ring(64);
  RingHarvester h(ring.entries.data(), 64);
  DirtySet set(Slots());
  uint64_t pushed = 0, harvested = 0;
  for (int round = 0; round < 100; ++round) {
    const int n = 1 + (round * 37) % 64;
    for (int i = 0; i < n; ++i) ASSERT_TRUE(ring.Push(0, (pushed++) % 4096));
    auto r = h.Harvest(set);
    EXPECT_EQ(r.harvested, static_cast<uint32_t>(n));
    harvested += r.harvested;
    EXPECT_EQ(ring.Reset(), static_cast<uint32_t>(n));  // the reset count matches the harvest
  }
  EXPECT_EQ(harvested, pushed);
  EXPECT_EQ(h.fetch_index(), pushed);
  EXPECT_EQ(set.Count(), std::min<uint64_t>(pushed, 4096));
}

TEST(RingHarvesterTest, FullRingThenMaxBound) {
  FakeKvmRing ring(32);
  RingHarvester h(ring.entries.data(), 32);
  DirtySet set(Slots());
  for (uint32_t i = 0; i < 32; ++i) ASSERT_TRUE(ring.Push(0, i));
  EXPECT_FALSE(ring.Push(0, 99));  // full: KVM would force an exit long before this
  EXPECT_EQ(h.Harvest(set, 10).harvested, 10u);
  EXPECT_EQ(h.Harvest(set).harvested, 22u);
  // Without a reset KVM cannot reuse the entries; a harvest finds nothing new.
  EXPECT_EQ(h.Harvest(set).harvested, 0u);
  EXPECT_EQ(ring.Reset(), 32u);
}

TEST(RingHarvesterTest, ConcurrentProducerNothingLost) {
  // A producer thread plays KVM (push, and reset on request); the harvester
  // runs concurrently. Every pushed page must end up in the set.
  constexpr uint32_t kSize = 128;
  FakeKvmRing ring(kSize);
  RingHarvester h(ring.entries.data(), kSize);
  DirtySet set(Slots());
  std::atomic<bool> done{false};
  std::atomic<uint64_t> reset_requests{0}, resets_done{0};
  constexpr uint64_t kPushes = 200000;
  std::thread kvm([&] {
    uint64_t i = 0;
    while (i < kPushes) {
      if (ring.Push(0, i % 4096)) {
        ++i;
      } else if (reset_requests.load() > resets_done.load()) {
        ring.Reset();
        resets_done.fetch_add(1);
      }
    }
    done = true;
  });
  uint64_t total = 0;
  while (!done.load() || total < kPushes) {
    total += h.Harvest(set).harvested;
    const uint64_t want = reset_requests.fetch_add(1) + 1;
    while (resets_done.load() < want && !done.load()) std::this_thread::yield();
    if (done.load()) {
      total += h.Harvest(set).harvested;
      ring.Reset();
    }
  }
  kvm.join();
  EXPECT_EQ(total, kPushes);
  EXPECT_EQ(set.Count(), 4096u);
}

}  // namespace
}  // namespace pmlmig::engine
