// The verification digests (memory_digest.h, source_digest.h) on plain host
// memory: what a digest is sensitive to, that the incremental table agrees
// with a fresh digest however pages change, how mismatches are named, and
// that the source's digest follows writers it was never told about (its
// witness), so a page the caller "forgot" still shows up.
#include "pmlmig/engine/memory_digest.h"

#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "pmlmig/base/mapping.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/source_digest.h"
#include "pmlmig/engine/userspace_tracker.h"

namespace pmlmig::engine {
namespace {

constexpr uint64_t kMiB = 1ull << 20;

// Guest-like memory: two slots, the second not a multiple of a chunk.
class DigestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto low = Mapping::Map(8 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "low");
    auto high = Mapping::Map(3 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "high");
    ASSERT_TRUE(low.ok() && high.ok());
    low_ = std::move(*low);
    high_ = std::move(*high);
    std::mt19937_64 rng(7);
    for (size_t i = 0; i < low_.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(low_.data() + i, &v, 8);
    }
    ASSERT_TRUE(slots_.Set({0, 0, low_.data(), low_.size(), 0}).ok());
    ASSERT_TRUE(slots_.Set({1, 1ull << 32, high_.data(), high_.size(), 0}).ok());
  }
  uint8_t* At(uint64_t gpa) { return slots_.HostAddress(gpa, 1); }

  Mapping low_, high_;
  SlotTable slots_;
};

TEST_F(DigestTest, LayoutKeepsChunksInsideSlots) {
  const ChunkLayout layout(slots_);
  EXPECT_EQ(layout.chunk_bytes(), 2 * kMiB);
  ASSERT_EQ(layout.size(), 4u + 2u);  // 8 MiB in 4 chunks; 3 MiB in a full and a half chunk
  EXPECT_EQ(layout.chunk(4).gpa, 1ull << 32);
  EXPECT_EQ(layout.chunk(5).pages, 256u);
  EXPECT_EQ(layout.ChunkOf(1, 700), 5u);
}

TEST_F(DigestTest, SensitiveToOneBitAndToAddressNotToOrder) {
  const ChunkLayout layout(slots_);
  const std::vector<uint64_t> before = DigestAllChunks(slots_, layout);
  // One bit.
  At(0x123456)[17] ^= 0x10;
  std::vector<uint64_t> after = DigestAllChunks(slots_, layout);
  EXPECT_NE(after[0], before[0]);
  for (size_t i = 1; i < layout.size(); ++i) EXPECT_EQ(after[i], before[i]) << i;
  At(0x123456)[17] ^= 0x10;
  EXPECT_EQ(DigestAllChunks(slots_, layout), before);
  // Two pages of one chunk swapped: the same bytes, at other addresses.
  std::vector<uint8_t> tmp(kPageSize);
  std::memcpy(tmp.data(), At(0x3000), kPageSize);
  std::memcpy(At(0x3000), At(0x5000), kPageSize);
  std::memcpy(At(0x5000), tmp.data(), kPageSize);
  EXPECT_NE(DigestAllChunks(slots_, layout)[0], before[0]);
  std::memcpy(At(0x5000), At(0x3000), kPageSize);
  std::memcpy(At(0x3000), tmp.data(), kPageSize);
  // The page values of a chunk summed in any order give its digest.
  const ChunkLayout::Chunk& c = layout.chunk(2);
  std::vector<uint64_t> order(c.pages);
  for (uint64_t p = 0; p < c.pages; ++p) order[p] = p;
  std::shuffle(order.begin(), order.end(), std::mt19937(3));
  uint64_t sum = 0;
  for (uint64_t p : order) sum += PageValue(c.gpa + (p << kPageShift), At(c.gpa + (p << kPageShift)));
  EXPECT_EQ(sum, before[2]);
  // MemoryDigest (what a pmlmig 0.2 peer compares) is the sum of the chunks.
  uint64_t total = 0;
  for (uint64_t d : before) total += d;
  EXPECT_EQ(MemoryDigest(slots_), total);
}

TEST_F(DigestTest, TableFollowsUpdatesLikeAFreshDigest) {
  PageDigestTable table(slots_, PageDigestTable::Initial::kRead);
  EXPECT_EQ(table.Snapshot(), DigestAllChunks(slots_, table.layout()));
  // Writes, each followed by the update the transport makes; some pages twice.
  std::mt19937_64 rng(11);
  for (int i = 0; i < 500; ++i) {
    const uint64_t gpa = (rng() % (low_.size() / kPageSize)) << kPageShift;
    At(gpa)[rng() % kPageSize] = static_cast<uint8_t>(rng());
    table.Update(gpa, 1);
  }
  std::memset(At(1ull << 32), 0, 5 * kPageSize);
  table.SetZero(1ull << 32, 5);
  EXPECT_EQ(table.Snapshot(), DigestAllChunks(slots_, table.layout()));
  // A write the table was not told about is exactly what it cannot see.
  At(0x7000)[1] ^= 1;
  EXPECT_NE(table.Snapshot(), DigestAllChunks(slots_, table.layout()));
}

TEST_F(DigestTest, ZeroTableMatchesZeroedMemory) {
  std::memset(low_.data(), 0, low_.size());
  PageDigestTable table(slots_, PageDigestTable::Initial::kZero);
  EXPECT_EQ(table.Snapshot(), DigestAllChunks(slots_, table.layout()));
}

TEST_F(DigestTest, ConcurrentUpdatesAgree) {
  PageDigestTable table(slots_, PageDigestTable::Initial::kRead);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Each thread owns every fourth page (as streams own a round's pages).
      for (uint64_t p = static_cast<uint64_t>(t); p < low_.size() / kPageSize; p += 4) {
        At(p << kPageShift)[9] ^= 0x5a;
        table.Update(p << kPageShift, 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(table.Snapshot(), DigestAllChunks(slots_, table.layout()));
}

TEST_F(DigestTest, MismatchNamesMergedRanges) {
  const ChunkLayout layout(slots_);
  const std::vector<uint64_t> a = DigestAllChunks(slots_, layout);
  std::vector<uint64_t> b = a;
  EXPECT_TRUE(CompareChunkDigests(layout, a, b).empty());
  b[1] ^= 1;
  b[2] ^= 1;
  b[5] ^= 1;
  const DigestMismatch m = CompareChunkDigests(layout, a, b);
  EXPECT_EQ(m.chunks, 3u);
  EXPECT_EQ(m.bytes, 5 * kMiB);  // two full chunks and the half one
  ASSERT_EQ(m.ranges.size(), 2u);
  EXPECT_EQ(m.ranges[0].gpa, 2 * kMiB);
  EXPECT_EQ(m.ranges[0].size, 4 * kMiB);
  EXPECT_EQ(m.ranges[1].gpa, (1ull << 32) + 2 * kMiB);
  EXPECT_EQ(m.Describe(), "3 chunks (5 MiB) differ: gpa 0x200000-0x5fffff, 0x100200000-0x1002fffff");
}

// The source's digest, with writers it is not told about: at the "pause"
// (writers stopped) it must equal a fresh digest of memory, page by page.
TEST_F(DigestTest, SourceDigestSeesWritesNobodyReported) {
  if (Status s = UserspaceWriteTracker::ProbeUffdWpAsync(); !s.ok()) {
    GTEST_SKIP() << "no write witness on this kernel: " << s.message();
  }
  SourceDigest digest(slots_);
  digest.Start();
  ASSERT_TRUE(digest.stats().witness) << digest.stats().no_witness_reason;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> writes{0};
  std::thread writer([&] {
    std::mt19937_64 rng(5);
    while (!stop.load()) {
      const uint64_t p = rng() % ((low_.size() + high_.size()) / kPageSize);
      const uint64_t gpa = p < low_.size() / kPageSize ? p << kPageShift : (1ull << 32) + ((p - low_.size() / kPageSize) << kPageShift);
      At(gpa)[rng() % kPageSize] = static_cast<uint8_t>(rng() | 1);
      writes.fetch_add(1);
    }
  });
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_TRUE(digest.Refresh().ok());
  }
  stop.store(true);
  writer.join();
  auto at_pause = digest.AtPause();
  ASSERT_TRUE(at_pause.ok()) << at_pause.status().message();
  EXPECT_EQ(*at_pause, DigestAllChunks(slots_, digest.layout()));
  EXPECT_GT(writes.load(), 1000u);
  EXPECT_GT(digest.stats().background_pages, 0u);
  std::printf("[source digest] %llu writes, %llu pages hashed running, %llu at the pause in %.2f ms\n",
              static_cast<unsigned long long>(writes.load()),
              static_cast<unsigned long long>(digest.stats().background_pages),
              static_cast<unsigned long long>(digest.stats().pause_pages), digest.stats().pause_ms);
}

// Without a witness (this memory already has a uffd-wp tracker) every page is
// hashed at the pause: still exact.
TEST_F(DigestTest, SourceDigestWithoutWitnessHashesEverythingAtThePause) {
  if (Status s = UserspaceWriteTracker::ProbeUffdWpAsync(); !s.ok()) GTEST_SKIP() << s.message();
  UserspaceWriteTracker other(slots_, UserspaceTrackerOptions{.mode = UserspaceTrackMode::kUffdWpAsync});
  ASSERT_TRUE(other.Enable().ok());
  SourceDigest digest(slots_);
  digest.Start();
  EXPECT_FALSE(digest.stats().witness);
  EXPECT_FALSE(digest.stats().no_witness_reason.empty());
  At(0x1000)[3] ^= 7;
  auto at_pause = digest.AtPause();
  ASSERT_TRUE(at_pause.ok());
  EXPECT_EQ(*at_pause, DigestAllChunks(slots_, digest.layout()));
  EXPECT_EQ(digest.stats().pause_pages, (low_.size() + high_.size()) / kPageSize);
}

}  // namespace
}  // namespace pmlmig::engine
