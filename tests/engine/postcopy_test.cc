// Post-copy memory (engine/postcopy.h) against the real kernel: a memfd
// mapped like guest memory, userfaultfd missing faults, a "guest" thread
// touching owed pages and a "source" thread answering the requests. No KVM.
#include "pmlmig/engine/postcopy.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/memory_digest.h"

namespace pmlmig::engine {
namespace {

constexpr uint64_t kPages = 256;
constexpr uint64_t kBytes = kPages * kPageSize;
constexpr uint64_t kGpa = 0x100000;

// The byte a page holds on the "source".
uint8_t SourceByte(uint64_t page) { return static_cast<uint8_t>(page * 7 + 1); }

class PostcopyMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Status s = PostcopyMemory::Available(); !s.ok()) GTEST_SKIP() << s.message();
    fd_.Reset(::memfd_create("postcopy-test", MFD_CLOEXEC));
    ASSERT_TRUE(fd_.valid());
    ASSERT_EQ(::ftruncate(fd_.get(), kBytes), 0);
    auto m = Mapping::Map(kBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0, "memfd");
    ASSERT_TRUE(m.ok()) << m.status().message();
    map_ = std::move(*m);
    ASSERT_TRUE(slots_.Set({1, kGpa, map_.data(), kBytes, 0}).ok());
    source_.resize(kBytes);
    for (uint64_t p = 0; p < kPages; ++p) std::memset(source_.data() + p * kPageSize, SourceByte(p), kPageSize);
    // Pre-copy left a stale copy in the first half; the second half was
    // never sent (holes).
    for (uint64_t p = 0; p < kPages / 2; ++p) std::memset(map_.data() + p * kPageSize, 0xee, kPageSize);
  }

  const uint8_t* SourcePage(uint64_t gpa) const { return source_.data() + (gpa - kGpa); }

  UniqueFd fd_;
  Mapping map_;
  SlotTable slots_;
  std::vector<uint8_t> source_;
};

TEST_F(PostcopyMemoryTest, GuestGetsTheSourcesPagesAndPlacesNeverOverwrite) {
  // Owed: pages 0..63 (stale) and 128..191 (holes). Not owed: 64..127 hold
  // the right (pre-copied) bytes... here the stale 0xee stands for them;
  // 192..255 are holes the source never wrote (zero).
  std::vector<PageRun> owed = {{kGpa, 64}, {kGpa + 128 * kPageSize, 64}};
  PageDigestTable digests(slots_, PageDigestTable::Initial::kZero);
  auto armed = PostcopyMemory::Arm(slots_, {MemoryFile{fd_.get(), 0}}, owed, &digests);
  ASSERT_TRUE(armed.ok()) << armed.status().message();
  PostcopyMemory& pc = **armed;
  EXPECT_EQ(pc.remaining(), 128u);

  // The "source": answers each request with its page, from another thread.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<uint64_t> asked;
  bool stop = false;
  std::set<uint64_t> requested;
  std::thread server([&] {
    for (;;) {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return stop || !asked.empty(); });
      if (stop) return;
      const uint64_t gpa = asked.front();
      asked.pop_front();
      lock.unlock();
      ASSERT_TRUE(pc.Place(gpa, 1, SourcePage(gpa)).ok());
    }
  });
  pc.Start([&](uint64_t gpa) {
    std::lock_guard lock(mu);
    requested.insert(gpa);
    asked.push_back(gpa);
    cv.notify_all();
  });

  // The "guest" reads every page: owed ones block until placed.
  for (uint64_t p = 0; p < kPages; ++p) {
    const uint8_t v = map_.data()[p * kPageSize + 100];
    const bool is_owed = p < 64 || (p >= 128 && p < 192);
    if (is_owed) {
      EXPECT_EQ(v, SourceByte(p)) << "page " << p;
    } else if (p < 128) {
      EXPECT_EQ(v, 0xee) << "page " << p << " was not owed: left as it was";
    } else {
      EXPECT_EQ(v, 0) << "page " << p << ": a hole not owed reads zero";
    }
  }
  // A guest write to a placed page, then the same page again from the
  // background push: dropped, the guest's write stays.
  map_.data()[5 * kPageSize] = 0x42;
  auto again = pc.Place(kGpa + 5 * kPageSize, 1, SourcePage(kGpa + 5 * kPageSize));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0u);
  EXPECT_EQ(map_.data()[5 * kPageSize], 0x42);

  EXPECT_TRUE(pc.WaitComplete(std::chrono::milliseconds(1000)));
  EXPECT_EQ(pc.remaining(), 0u);
  {
    std::lock_guard lock(mu);
    stop = true;
    cv.notify_all();
  }
  server.join();
  const PostcopyStats st = pc.stats();
  EXPECT_EQ(st.needed_pages, 128u);
  EXPECT_EQ(st.faults, 128u);  // every owed page was touched before anything pushed it
  EXPECT_EQ(st.requested_pages, 128u);
  EXPECT_EQ(st.background_pages, 0u);
  EXPECT_GE(st.duplicate_pages, 1u);
  EXPECT_EQ(st.zero_faults, 64u);
  EXPECT_GT(st.latency_p50_ms, 0);
  EXPECT_LE(st.latency_p50_ms, st.latency_p99_ms);
  EXPECT_LE(st.latency_p99_ms, st.latency_max_ms);
  EXPECT_TRUE(pc.Missing().empty());

  // The digests are of what was placed (the source's bytes), not of the
  // guest's later write: page 5's value is the source's.
  PageDigestTable expect(slots_, PageDigestTable::Initial::kZero);
  for (const PageRun& r : owed) expect.SetFrom(r.gpa, r.pages, SourcePage(r.gpa));
  EXPECT_EQ(digests.Snapshot(), expect.Snapshot());
}

// What a resume after a broken link needs: the faulting pages still
// waiting (their requests were lost with the link) and the missing runs,
// each inside one slot even where slots are adjacent.
TEST_F(PostcopyMemoryTest, WaitingAndMissingForAResume) {
  SlotTable two;
  ASSERT_TRUE(two.Set({1, kGpa, map_.data(), kBytes / 2, 0}).ok());
  ASSERT_TRUE(two.Set({2, kGpa + kBytes / 2, map_.data() + kBytes / 2, kBytes / 2, 0}).ok());
  std::vector<PageRun> owed = {{kGpa, kPages / 2}, {kGpa + kBytes / 2, kPages / 2}};
  auto armed = PostcopyMemory::Arm(two, {MemoryFile{fd_.get(), 0}, MemoryFile{fd_.get(), kBytes / 2}}, owed, nullptr);
  ASSERT_TRUE(armed.ok()) << armed.status().message();
  PostcopyMemory& pc = **armed;
  std::vector<PageRun> missing = pc.Missing();
  ASSERT_EQ(missing.size(), 2u) << "runs must not cross the slot boundary";
  EXPECT_EQ(missing[0].gpa, kGpa);
  EXPECT_EQ(missing[0].pages, kPages / 2);
  EXPECT_EQ(missing[1].gpa, kGpa + kBytes / 2);
  EXPECT_EQ(missing[1].pages, kPages / 2);

  std::atomic<int> asked{0};
  pc.Start([&](uint64_t) { ++asked; });  // the link is down: the request goes nowhere
  std::atomic<uint8_t> seen{0};
  std::thread vcpu([&] { seen = map_.data()[3 * kPageSize + 9]; });  // blocks on a missing page
  const uint64_t page3 = kGpa + 3 * kPageSize;
  for (int i = 0; i < 500 && pc.Waiting().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_EQ(pc.Waiting(), std::vector<uint64_t>{page3});
  EXPECT_EQ(asked.load(), 1);
  // Pages 4.. of slot 1 and all of slot 2 arrive (the push, on the old link).
  ASSERT_TRUE(pc.Place(kGpa + 4 * kPageSize, kPages / 2 - 4, SourcePage(kGpa + 4 * kPageSize)).ok());
  ASSERT_TRUE(pc.Place(kGpa + kBytes / 2, kPages / 2, SourcePage(kGpa + kBytes / 2)).ok());
  missing = pc.Missing();
  ASSERT_EQ(missing.size(), 1u);
  EXPECT_EQ(missing[0].gpa, kGpa);
  EXPECT_EQ(missing[0].pages, 4u);
  EXPECT_EQ(pc.Waiting(), std::vector<uint64_t>{page3}) << "still waiting: asked again after the resume";
  // The resume: the missing pages arrive; the waiting vCPU goes on.
  ASSERT_TRUE(pc.Place(kGpa, 4, SourcePage(kGpa)).ok());
  vcpu.join();
  EXPECT_EQ(seen.load(), SourceByte(3));
  EXPECT_TRUE(pc.Waiting().empty());
  EXPECT_TRUE(pc.Missing().empty());
  EXPECT_TRUE(pc.WaitComplete(std::chrono::milliseconds(100)));
}

// Pages made holes before the switch (Punch, while the source still runs)
// are owed at Arm without being punched again; one punched but not owed at
// Arm would read as zero, and is refused.
TEST_F(PostcopyMemoryTest, PunchBeforeTheSwitchThenArm) {
  const std::vector<std::optional<MemoryFile>> files = {MemoryFile{fd_.get(), 0}};
  PageBits punched(slots_);
  // Pages 0..9 and 20 are stale (they hold 0xee): punched early.
  ASSERT_TRUE(PostcopyMemory::Punch(slots_, files, std::vector<PageRun>{{kGpa, 10}, {kGpa + 20 * kPageSize, 1}},
                                    &punched)
                  .ok());
  for (uint64_t p = 0; p < 24; ++p) EXPECT_EQ(punched.Test(p), p < 10 || p == 20) << "page " << p;
  // The file holds a hole there now: the stale copy is gone.
  {
    uint8_t b = 0xff;
    ASSERT_EQ(::pread(fd_.get(), &b, 1, 5 * kPageSize), 1);
    EXPECT_EQ(b, 0) << "a punched page reads as a hole";
  }
  // A prepared page that the switch does not owe: refused by name.
  {
    auto bad = PostcopyMemory::Arm(slots_, files, std::vector<PageRun>{{kGpa, 10}}, nullptr, &punched);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.status().message().find("0x114000"), std::string::npos) << bad.status().message();
  }
  // Owed: the prepared pages and pages 30..31, dirtied after the prepare.
  auto armed = PostcopyMemory::Arm(
      slots_, files, std::vector<PageRun>{{kGpa, 10}, {kGpa + 20 * kPageSize, 1}, {kGpa + 30 * kPageSize, 2}}, nullptr,
      &punched);
  ASSERT_TRUE(armed.ok()) << armed.status().message();
  PostcopyMemory& pc = **armed;
  EXPECT_EQ(pc.remaining(), 13u);
  pc.Start([&](uint64_t gpa) { ASSERT_TRUE(pc.Place(gpa, 1, SourcePage(gpa)).ok()); });
  for (uint64_t p : {0, 9, 20, 30, 31}) EXPECT_EQ(map_.data()[p * kPageSize + 1], SourceByte(p)) << "page " << p;
  EXPECT_EQ(map_.data()[15 * kPageSize], 0xee) << "a page neither punched nor owed keeps its pre-copied bytes";
}

TEST_F(PostcopyMemoryTest, BackgroundPushPlacesWithoutFaults) {
  std::vector<PageRun> owed = {{kGpa, kPages}};
  auto armed = PostcopyMemory::Arm(slots_, {MemoryFile{fd_.get(), 0}}, owed, nullptr);
  ASSERT_TRUE(armed.ok()) << armed.status().message();
  PostcopyMemory& pc = **armed;
  std::atomic<int> requests{0};
  pc.Start([&](uint64_t) { ++requests; });
  // Two pushers over the same pages (a request's answer racing the push):
  // every page is placed once.
  auto push = [&] {
    for (uint64_t p = 0; p < kPages; p += 16) ASSERT_TRUE(pc.Place(kGpa + p * kPageSize, 16, source_.data() + p * kPageSize).ok());
  };
  std::thread a(push), b(push);
  a.join();
  b.join();
  EXPECT_TRUE(pc.WaitComplete(std::chrono::milliseconds(100)));
  for (uint64_t p = 0; p < kPages; ++p) ASSERT_EQ(map_.data()[p * kPageSize], SourceByte(p)) << p;
  const PostcopyStats st = pc.stats();
  EXPECT_EQ(requests.load(), 0);
  EXPECT_EQ(st.background_pages, kPages);
  EXPECT_EQ(st.duplicate_pages, kPages);  // each page came twice
}

TEST_F(PostcopyMemoryTest, RefusesOwedPagesOutsideMemory) {
  std::vector<PageRun> owed = {{kGpa + (kPages - 1) * kPageSize, 2}};
  auto armed = PostcopyMemory::Arm(slots_, {MemoryFile{fd_.get(), 0}}, owed, nullptr);
  ASSERT_FALSE(armed.ok());
  EXPECT_NE(armed.status().message().find("outside guest memory"), std::string::npos) << armed.status().message();
}

TEST(PostcopyBacklogTest, EveryOwedPageOnceFromTheHintOnward) {
  SlotTable slots;
  // Host addresses only: the backlog never touches memory.
  ASSERT_TRUE(slots.Set({1, 0, reinterpret_cast<uint8_t*>(0x100000000000), 100 * kPageSize, 0}).ok());
  ASSERT_TRUE(slots.Set({2, 1ull << 32, reinterpret_cast<uint8_t*>(0x200000000000), 100 * kPageSize, 0}).ok());
  // Owed: 10..89 of slot 1, 0..99 of slot 2 (180 pages).
  std::vector<PageRun> owed = {{10 * kPageSize, 80}, {1ull << 32, 100}};
  PostcopyBacklog backlog(slots, owed);
  EXPECT_EQ(backlog.total_pages(), 180u);
  // A request in slot 2 moves the hint there: the push continues after it.
  EXPECT_TRUE(backlog.Claim((1ull << 32) + 50 * kPageSize));
  EXPECT_FALSE(backlog.Claim((1ull << 32) + 50 * kPageSize));
  PageRun r;
  ASSERT_TRUE(backlog.Next(1024, &r));
  EXPECT_EQ(r.gpa, (1ull << 32) + 51 * kPageSize);
  std::set<uint64_t> seen = {(1ull << 32) + 50 * kPageSize};
  do {
    ASSERT_LE(r.pages, 64u);
    const MemorySlot* s = slots.FindByGpa(r.gpa);
    ASSERT_NE(s, nullptr);
    ASSERT_LE(r.gpa + r.pages * kPageSize, s->gpa_end()) << "a run crosses a slot's end";
    for (uint64_t p = 0; p < r.pages; ++p) ASSERT_TRUE(seen.insert(r.gpa + p * kPageSize).second);
  } while (backlog.Next(1024, &r));
  EXPECT_EQ(seen.size(), 180u);
  EXPECT_EQ(backlog.left(), 0u);
  EXPECT_EQ(backlog.requests(), 2u);
  // Reset: owed again (a recovery), and concurrent takers share it out.
  backlog.Reset(owed);
  std::atomic<uint64_t> taken{0};
  auto take = [&] {
    PageRun x;
    while (backlog.Next(7, &x)) taken += x.pages;
  };
  std::thread t1(take), t2(take);
  t1.join();
  t2.join();
  EXPECT_EQ(taken.load(), 180u);
  // A resume names a subset (what the target still lacks): exactly that is
  // owed, and the count at the switch stays.
  backlog.Reset(std::vector<PageRun>{{20 * kPageSize, 3}, {(1ull << 32) + 99 * kPageSize, 1}});
  EXPECT_EQ(backlog.left(), 4u);
  EXPECT_EQ(backlog.total_pages(), 180u);
  std::set<uint64_t> again;
  while (backlog.Next(1024, &r)) {
    for (uint64_t p = 0; p < r.pages; ++p) again.insert(r.gpa + p * kPageSize);
  }
  EXPECT_EQ(again, (std::set<uint64_t>{20 * kPageSize, 21 * kPageSize, 22 * kPageSize, (1ull << 32) + 99 * kPageSize}));
}

TEST(PostcopyBacklogTest, LinkStateCountsResumes) {
  SlotTable slots;
  ASSERT_TRUE(slots.Set({1, 0, reinterpret_cast<uint8_t*>(0x100000000000), 10 * kPageSize, 0}).ok());
  PostcopyBacklog backlog(slots, std::vector<PageRun>{{0, 10}});
  EXPECT_FALSE(backlog.link_down());
  backlog.SetLinkDown(false);  // up while up: no resume
  EXPECT_EQ(backlog.recoveries(), 0u);
  backlog.SetLinkDown(true);
  EXPECT_TRUE(backlog.link_down());
  EXPECT_EQ(backlog.recoveries(), 0u);
  backlog.SetLinkDown(false);
  EXPECT_FALSE(backlog.link_down());
  EXPECT_EQ(backlog.recoveries(), 1u);
}

}  // namespace
}  // namespace pmlmig::engine
