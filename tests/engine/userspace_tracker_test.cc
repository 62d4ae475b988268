// Tests for UserspaceWriteTracker against the running kernel. Guest memory is
// laid out the way a VMM maps it: slot 0 is a 64 MiB MAP_SHARED memfd mapping
// at gpa 0 (the guest RAM), slot 1 a 16 MiB anonymous private mapping at
// gpa 4 GiB. Half of each is populated before tracking starts, so writes hit
// both present pages and never-touched ones. Each mapping sits between
// PROT_NONE guard pages so that the kernel cannot merge it with a neighbour.
//
// The kernel mechanisms run for real; a test of a mechanism this kernel lacks
// skips and says what is missing (ProbeUffdWpAsync / ProbeSoftDirty).
//
// Exactness rule: every written page is reported by the next collection and
// no other page is, with one explained exception: in soft-dirty mode a
// transparent huge page mapped by a PMD is one soft-dirty unit, so an
// unwritten page may be reported when its 2 MiB-aligned block of host
// virtual addresses holds a written page (seen on Debian's 6.1 kernel with
// THP "always" in the anonymous slot). uffd-wp splits a protected huge PMD
// on the first write and stays exact.
#include "pmlmig/engine/userspace_tracker.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::engine {
namespace {

using Mode = UserspaceWriteTracker::Mode;

constexpr uint64_t kRamBytes = 64ull << 20;
constexpr uint64_t kHighBytes = 16ull << 20;
constexpr uint64_t kHighGpa = 4ull << 30;
constexpr uint64_t kRamPages = kRamBytes / kPageSize;
constexpr uint64_t kHighPages = kHighBytes / kPageSize;
constexpr uint64_t kTotalPages = kRamPages + kHighPages;
constexpr uint64_t kHugeBlock = 2ull << 20;

// Keeps test reads of guest memory from being optimized away.
volatile uint64_t g_sink = 0;

// Page index (0 .. kTotalPages) <-> gpa, across both slots.
uint64_t GpaOf(uint64_t index) {
  return index < kRamPages ? index * kPageSize : kHighGpa + (index - kRamPages) * kPageSize;
}
uint64_t IndexOf(uint64_t gpa) {
  return gpa < kHighGpa ? gpa / kPageSize : kRamPages + (gpa - kHighGpa) / kPageSize;
}

// A mapping between PROT_NONE guard pages; the reservation owns it all.
// `align` places it on that boundary (2 MiB for transparent huge pages).
struct GuardedMapping {
  Mapping reservation;
  uint8_t* data = nullptr;
};

GuardedMapping MapGuarded(uint64_t size, int flags, int fd, uint64_t align = kPageSize) {
  GuardedMapping g;
  auto r = Mapping::Map(size + kPageSize + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0,
                        "test guard reservation");
  EXPECT_TRUE(r.ok()) << r.status().message();
  if (!r.ok()) return g;
  g.reservation = std::move(r).value();
  const uintptr_t at = (reinterpret_cast<uintptr_t>(g.reservation.data()) + kPageSize + align - 1) & ~(align - 1);
  void* p = ::mmap(reinterpret_cast<void*>(at), size, PROT_READ | PROT_WRITE, flags | MAP_FIXED, fd, 0);
  EXPECT_NE(p, MAP_FAILED) << std::strerror(errno);
  g.data = static_cast<uint8_t*>(p);
  return g;
}

// Guest memory: the two slots, with random data in the first half of each.
// With `huge_high`, slot 1 is 2 MiB aligned and madvised MADV_HUGEPAGE, so
// that the kernel backs it with transparent huge pages where THP is enabled.
class GuestMemory {
 public:
  explicit GuestMemory(bool huge_high = false) {
    memfd_.Reset(::memfd_create("pmlmig-test-ram", MFD_CLOEXEC));
    EXPECT_TRUE(memfd_.valid());
    EXPECT_EQ(::ftruncate(memfd_.get(), static_cast<off_t>(kRamBytes)), 0);
    ram_ = MapGuarded(kRamBytes, MAP_SHARED, memfd_.get());
    high_ = MapGuarded(kHighBytes, MAP_PRIVATE | MAP_ANONYMOUS, -1, huge_high ? kHugeBlock : kPageSize);
    if (huge_high) {
      EXPECT_EQ(::madvise(high_.data, kHighBytes, MADV_HUGEPAGE), 0) << std::strerror(errno);
    }
    EXPECT_TRUE(table_.Set({0, 0, ram_.data, kRamBytes, 0}).ok());
    EXPECT_TRUE(table_.Set({1, kHighGpa, high_.data, kHighBytes, 0}).ok());
    std::mt19937_64 rng(42);
    auto fill = [&](uint8_t* p, uint64_t bytes) {
      for (uint64_t off = 0; off < bytes; off += sizeof(uint64_t)) {
        const uint64_t v = rng();
        std::memcpy(p + off, &v, sizeof v);
      }
    };
    fill(ram_.data, kRamBytes / 2);
    fill(high_.data, kHighBytes / 2);
  }

  const SlotTable& table() const { return table_; }
  int memfd() const { return memfd_.get(); }
  uint8_t* Host(uint64_t gpa) const {
    return gpa < kHighGpa ? ram_.data + gpa : high_.data + (gpa - kHighGpa);
  }
  uint8_t* Page(uint64_t index) const { return Host(GpaOf(index)); }

 private:
  UniqueFd memfd_;
  GuardedMapping ram_;
  GuardedMapping high_;
  SlotTable table_;
};

// A store of `value` somewhere in page `index`, as a device model would make
// it. Atomic so that a concurrent copier reading the page is no data race.
void WritePage(const GuestMemory& g, uint64_t index, uint64_t value) {
  auto* words = reinterpret_cast<uint64_t*>(g.Page(index));
  std::atomic_ref<uint64_t>(words[value % (kPageSize / sizeof(uint64_t))]).store(value, std::memory_order_relaxed);
}

uint64_t ReadPage(const GuestMemory& g, uint64_t index) {
  auto* words = reinterpret_cast<uint64_t*>(g.Page(index));
  return std::atomic_ref<uint64_t>(words[index % 7]).load(std::memory_order_relaxed);
}

std::set<uint64_t> Take(DirtySet& d) {
  std::set<uint64_t> pages;
  d.TakeEach([&](uint64_t gpa) { pages.insert(IndexOf(gpa)); });
  return pages;
}

// Checks the file comment's exactness rule. Huge pages are aligned in the
// host's virtual address space, so the 2 MiB unit is a host-address block.
void ExpectExact(const GuestMemory& g, Mode mode, const std::set<uint64_t>& written,
                 const std::set<uint64_t>& reported) {
  auto host_block = [&](uint64_t page) { return reinterpret_cast<uintptr_t>(g.Page(page)) / kHugeBlock; };
  for (uint64_t p : written) {
    EXPECT_TRUE(reported.count(p)) << "written page " << p << " (gpa 0x" << std::hex << GpaOf(p) << ") not reported";
  }
  std::set<uint64_t> written_blocks;
  for (uint64_t p : written) written_blocks.insert(host_block(p));
  for (uint64_t p : reported) {
    if (written.count(p)) continue;
    const bool thp_unit = mode == Mode::kSoftDirty && written_blocks.count(host_block(p));
    EXPECT_TRUE(thp_unit) << "unwritten page " << p << " (gpa 0x" << std::hex << GpaOf(p) << ") reported";
  }
}

// AnonHugePages of this process, in kB; -1 if unknown.
long long AnonHugeKb() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return -1;
  char line[256];
  long long kb = -1;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::sscanf(line, "AnonHugePages: %lld kB", &kb) == 1) break;
  }
  std::fclose(f);
  return kb;
}

Status Probe(Mode mode) {
  switch (mode) {
    case Mode::kUffdWpAsync: return UserspaceWriteTracker::ProbeUffdWpAsync();
    case Mode::kSoftDirty: return UserspaceWriteTracker::ProbeSoftDirty();
    default: return Status::Ok();
  }
}

// ---------------------------------------------------------------------------
// Tests that run in every kernel mode (uffd-wp and soft-dirty).

class UserspaceTrackerKernelTest : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    Status s = Probe(GetParam());
    if (!s.ok()) GTEST_SKIP() << UserspaceWriteTracker::ModeName(GetParam()) << " unavailable: " << s.message();
  }
  UserspaceWriteTracker::Options Opts() const {
    UserspaceWriteTracker::Options o;
    o.mode = GetParam();
    return o;
  }
};

// Writes `pages` split over `threads` threads, all joined before returning.
void WriteFromThreads(const GuestMemory& g, const std::vector<uint64_t>& pages, int threads, uint64_t salt) {
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < pages.size(); i += static_cast<size_t>(threads)) {
        WritePage(g, pages[i], salt + i);
      }
    });
  }
  for (auto& w : workers) w.join();
}

void RunRandomRounds(Mode mode, const UserspaceWriteTracker::Options& opts, int threads) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), opts);
  ASSERT_TRUE(tracker.Enable().ok());
  EXPECT_EQ(tracker.mode(), mode);
  DirtySet out(g.table());
  std::mt19937_64 rng(1234 + static_cast<uint64_t>(threads));
  uint64_t total = 0;
  for (int round = 0; round < 12; ++round) {
    std::set<uint64_t> written;
    const uint64_t n = 1 + rng() % 700;
    while (written.size() < n) written.insert(rng() % kTotalPages);
    // Reads of other pages (present or never touched) are not writes.
    uint64_t sink = 0;
    for (int i = 0; i < 300; ++i) {
      const uint64_t p = rng() % kTotalPages;
      if (!written.count(p)) sink += ReadPage(g, p);
    }
    g_sink = sink;
    std::vector<uint64_t> order(written.begin(), written.end());
    std::shuffle(order.begin(), order.end(), rng);
    WriteFromThreads(g, order, threads, static_cast<uint64_t>(round) << 32);
    ASSERT_TRUE(tracker.Collect(out).ok());
    ExpectExact(g, mode, written, Take(out));
    total += written.size();
  }
  // Nothing written since the last collection: nothing reported.
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u);
  const TrackerStats st = tracker.stats();
  EXPECT_EQ(st.collections, 13u);
  if (mode == Mode::kUffdWpAsync) {
    EXPECT_EQ(st.pages_collected, total);
  }
  EXPECT_GE(st.pages_collected, total);
  EXPECT_EQ(st.last_pages, 0u);
  EXPECT_GT(st.collect_ns_total, 0u);
  EXPECT_EQ(st.overflows, 0u);
  EXPECT_TRUE(tracker.Disable().ok());
}

TEST_P(UserspaceTrackerKernelTest, ReportsExactlyTheWrittenPagesOneWriter) {
  RunRandomRounds(GetParam(), Opts(), 1);
}

TEST_P(UserspaceTrackerKernelTest, ReportsExactlyTheWrittenPagesTwoWriters) {
  RunRandomRounds(GetParam(), Opts(), 2);
}

// A region array of 2 entries forces PAGEMAP_SCAN to stop early many times
// (every other page is written, so each page is its own region); the walk
// must resume at walk_end without losing or re-protecting unreported pages.
TEST_P(UserspaceTrackerKernelTest, PartialScanResultsLoseNothing) {
  UserspaceWriteTracker::Options o = Opts();
  o.scan_regions = 2;
  o.pagemap_batch = 7;
  RunRandomRounds(GetParam(), o, 1);

  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), o);
  ASSERT_TRUE(tracker.Enable().ok());
  DirtySet out(g.table());
  std::set<uint64_t> written;
  for (uint64_t p = 100; p < 700; p += 2) written.insert(p);
  for (uint64_t p = kRamPages + 1; p < kRamPages + 301; p += 3) written.insert(p);
  for (uint64_t p : written) WritePage(g, p, p);
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, GetParam(), written, Take(out));
  if (GetParam() == Mode::kUffdWpAsync) {
    // 300 one-page regions in slot 0 and 100 in slot 1, two per call: the
    // kernel stops early on all but the last call of each slot.
    EXPECT_EQ(tracker.scan_stats().partial_scans, (300 / 2 - 1) + (100 / 2 - 1));
    EXPECT_EQ(tracker.stats().entries_harvested, written.size());
  }
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u);
}

// Transparent huge pages in slot 1 (where THP is enabled at all): uffd-wp
// stays exact (a write splits the protected PMD), soft-dirty may report the
// whole 2 MiB unit (the rule in ExpectExact).
TEST_P(UserspaceTrackerKernelTest, TransparentHugePages) {
  GuestMemory g(/*huge_high=*/true);
  std::printf("[ THP ] AnonHugePages of this process: %lld kB (0: THP off here, the test is plain)\n",
              AnonHugeKb());
  UserspaceWriteTracker tracker(g.table(), Opts());
  ASSERT_TRUE(tracker.Enable().ok());
  DirtySet out(g.table());
  for (int round = 0; round < 3; ++round) {
    const std::set<uint64_t> written = {kRamPages + 3, kRamPages + 600 + static_cast<uint64_t>(round),
                                        kRamPages + kHighPages / 2 + 700};  // populated, populated, empty
    for (uint64_t p : written) WritePage(g, p, p);
    ASSERT_TRUE(tracker.Collect(out).ok());
    ExpectExact(g, GetParam(), written, Take(out));
  }
}

// Runs of pages across 64-page words, and the first and last page of each
// slot.
TEST_P(UserspaceTrackerKernelTest, RunsAndSlotEdges) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), Opts());
  ASSERT_TRUE(tracker.Enable().ok());
  DirtySet out(g.table());
  std::set<uint64_t> written = {0, kRamPages - 1, kRamPages, kTotalPages - 1};
  for (uint64_t p = 60; p < 260; ++p) written.insert(p);                        // populated half
  for (uint64_t p = kRamPages / 2 + 10; p < kRamPages / 2 + 80; ++p) written.insert(p);  // never touched
  for (uint64_t p : written) WritePage(g, p, p + 1);
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, GetParam(), written, Take(out));
}

// Writes the kernel makes on the process's behalf (read(2) into guest
// memory, as a vhost or block backend would) go through the same page
// tables and are tracked too.
TEST_P(UserspaceTrackerKernelTest, KernelWritesIntoGuestMemoryAreTracked) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), Opts());
  ASSERT_TRUE(tracker.Enable().ok());
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  UniqueFd rd(fds[0]), wr(fds[1]);
  const char msg[] = "written by the kernel";
  for (uint64_t p : {uint64_t{5}, kRamPages - 2, kRamPages + 9}) {
    ASSERT_EQ(::write(wr.get(), msg, sizeof msg), static_cast<ssize_t>(sizeof msg));
    ASSERT_EQ(::read(rd.get(), g.Page(p) + 100, sizeof msg), static_cast<ssize_t>(sizeof msg));
  }
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, GetParam(), {5, kRamPages - 2, kRamPages + 9}, Take(out));
}

// MarkDirty adds to what the kernel reports; each page is reported once.
TEST_P(UserspaceTrackerKernelTest, ExplicitMarksJoinKernelReports) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), Opts());
  ASSERT_TRUE(tracker.Enable().ok());
  WritePage(g, 10, 1);
  WritePage(g, 11, 1);
  ASSERT_TRUE(tracker.MarkDirty(GpaOf(11), 1).ok());       // also written
  ASSERT_TRUE(tracker.MarkDirty(GpaOf(500) + 7, 10).ok());  // not written (e.g. a DMA the kernel cannot see)
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, GetParam(), {10, 11, 500}, Take(out));
  if (GetParam() == Mode::kUffdWpAsync) {
    EXPECT_EQ(tracker.stats().last_pages, 3u);
  }
}

TEST_P(UserspaceTrackerKernelTest, DisableStopsTrackingAndEnableRestarts) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), Opts());
  ASSERT_TRUE(tracker.Enable().ok());
  EXPECT_FALSE(tracker.Enable().ok());  // already enabled
  WritePage(g, 3, 1);
  ASSERT_TRUE(tracker.Disable().ok());
  EXPECT_EQ(tracker.mode(), GetParam());
  EXPECT_TRUE(tracker.Disable().ok());  // idempotent
  // Unprotected again: writes proceed (a leftover protection would be
  // harmless with WP_ASYNC, but the range must be unregistered).
  for (uint64_t p = 0; p < 64; ++p) WritePage(g, p, 2);
  DirtySet out(g.table());
  EXPECT_FALSE(tracker.Collect(out).ok());  // not enabled

  ASSERT_TRUE(tracker.Enable().ok());
  WritePage(g, kRamPages + 4, 3);
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, GetParam(), {kRamPages + 4}, Take(out));
}

// ---------------------------------------------------------------------------
// Writes racing collections, checked like a migration: after every
// collection the reported pages are copied to a destination; at the end
// (writers stopped, one final collection and copy) destination == source.
// Each write is also logged with the number of completed collections seen
// before and after it (c0, c1): it must be reported by a collection numbered
// in [c0 + 1, c1 + 2], i.e. by the one running during the write or the next.
// Writer 0 writes in short bursts with pauses (many collections with few
// dirty pages, writes landing inside Collect); writer 1, when present, writes
// flat out (most pages dirty every round, write faults racing every scan).

struct WriteRecord {
  uint32_t page;
  uint32_t c0;
  uint32_t c1;
  bool during;  // a collection started before the write and had not completed before it
};

void RunConcurrent(Mode mode, int writers) {
  GuestMemory g;
  UserspaceWriteTracker::Options o;
  o.mode = mode;
  UserspaceWriteTracker tracker(g.table(), o);
  ASSERT_TRUE(tracker.Enable().ok());

  std::atomic<uint32_t> started{0};
  std::atomic<uint32_t> completed{0};
  std::atomic<bool> stop{false};
  // Soft-dirty loses a write that lands between its pagemap read and its
  // clear_refs (see the header), so its documented rule applies: writers
  // pause while Collect runs. uffd-wp needs no such rule.
  const bool pause_writers = mode == Mode::kSoftDirty;
  std::shared_mutex collect_gate;
  constexpr size_t kMaxLog = 1u << 20;
  std::vector<std::vector<WriteRecord>> logs(static_cast<size_t>(writers));
  std::vector<std::thread> threads;
  for (int w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(77 + static_cast<uint64_t>(w));
      std::vector<WriteRecord>& log = logs[static_cast<size_t>(w)];
      log.reserve(kMaxLog);
      uint64_t seq = static_cast<uint64_t>(w + 1) << 48;
      while (!stop.load(std::memory_order_relaxed)) {
        std::shared_lock<std::shared_mutex> lock(collect_gate, std::defer_lock);
        if (pause_writers) lock.lock();
        for (int burst = 0; burst < (w == 0 ? 16 : 64); ++burst) {
          const uint32_t c0 = completed.load(std::memory_order_acquire);
          const auto page = static_cast<uint32_t>(rng() % kTotalPages);
          WritePage(g, page, ++seq);
          const uint32_t s1 = started.load(std::memory_order_acquire);
          const uint32_t c1 = completed.load(std::memory_order_acquire);
          if (log.size() < kMaxLog) log.push_back({page, c0, c1, s1 > c0});
        }
        if (lock.owns_lock()) lock.unlock();
        if (w == 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    });
  }

  // Pass 0: the bulk copy, made after Enable while the writers run.
  std::vector<uint8_t> dst(kTotalPages * kPageSize);
  auto copy_page = [&](uint64_t index) {
    const auto* src = reinterpret_cast<const uint64_t*>(g.Page(index));
    auto* to = reinterpret_cast<uint64_t*>(dst.data() + index * kPageSize);
    for (size_t i = 0; i < kPageSize / sizeof(uint64_t); ++i) {
      to[i] = std::atomic_ref<const uint64_t>(src[i]).load(std::memory_order_relaxed);
    }
  };
  for (uint64_t p = 0; p < kTotalPages; ++p) copy_page(p);

  std::vector<std::vector<uint32_t>> reported(kTotalPages);
  DirtySet out(g.table());
  auto collect_and_copy = [&](uint32_t number) {
    {
      std::unique_lock<std::shared_mutex> lock(collect_gate, std::defer_lock);
      if (pause_writers) lock.lock();
      started.store(number, std::memory_order_release);
      ASSERT_TRUE(tracker.Collect(out).ok());
    }
    out.TakeEach([&](uint64_t gpa) {
      const uint64_t index = IndexOf(gpa);
      reported[index].push_back(number);
      copy_page(index);
    });
    completed.store(number, std::memory_order_release);
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(400);
  uint32_t number = 0;
  // At least 20 rounds however slow the machine (sanitizers), at most 400.
  while ((std::chrono::steady_clock::now() < deadline || number < 20) && number < 400) {
    collect_and_copy(++number);
    if (::testing::Test::HasFatalFailure()) break;
  }
  stop.store(true, std::memory_order_relaxed);
  for (auto& t : threads) t.join();
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  collect_and_copy(++number);  // the final pass, with the writers stopped

  size_t mismatched = 0;
  for (uint64_t p = 0; p < kTotalPages; ++p) {
    if (std::memcmp(dst.data() + p * kPageSize, g.Page(p), kPageSize) != 0) ++mismatched;
  }
  EXPECT_EQ(mismatched, 0u) << "pages whose last write no collection reported";

  size_t writes = 0, late = 0, during = 0;
  for (const auto& log : logs) {
    for (const WriteRecord& r : log) {
      ++writes;
      if (r.during) ++during;
      const auto& hits = reported[r.page];
      auto it = std::lower_bound(hits.begin(), hits.end(), r.c0 + 1);
      if (it == hits.end() || *it > r.c1 + 2) ++late;
    }
  }
  EXPECT_EQ(late, 0u) << "writes not reported by the collection during or after them";
  EXPECT_GT(number, 20u);
  EXPECT_GT(writes, 1000u);
  if (!pause_writers) {
    EXPECT_GT(during, 0u) << "no write overlapped a collection; the race went untested";
  }
  ::testing::Test::RecordProperty("collections", static_cast<int>(number));
  ::testing::Test::RecordProperty("writes_checked", static_cast<int>(writes));
  std::printf("[ %s ] %u collections (%.1f ms in Collect), %zu logged writes (%zu during a collection), %llu pages reported\n",
              std::string(UserspaceWriteTracker::ModeName(mode)).c_str(), number,
              static_cast<double>(tracker.stats().collect_ns_total) / 1e6, writes, during,
              static_cast<unsigned long long>(tracker.stats().pages_collected));
}

TEST_P(UserspaceTrackerKernelTest, WritesDuringCollectionAreNeverLostOneWriter) { RunConcurrent(GetParam(), 1); }

TEST_P(UserspaceTrackerKernelTest, WritesDuringCollectionAreNeverLostTwoWriters) { RunConcurrent(GetParam(), 2); }

std::string ModeTestName(const ::testing::TestParamInfo<Mode>& param) {
  return param.param == Mode::kUffdWpAsync ? "UffdWpAsync" : "SoftDirty";
}

INSTANTIATE_TEST_SUITE_P(Userspace, UserspaceTrackerKernelTest, ::testing::Values(Mode::kUffdWpAsync, Mode::kSoftDirty),
                         ModeTestName);

// ---------------------------------------------------------------------------
// Mode selection, explicit marking and errors.

TEST(UserspaceTrackerTest, AutoPicksUffdThenSoftDirty) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table());
  EXPECT_EQ(tracker.mode(), Mode::kAuto);
  EXPECT_EQ(tracker.name(), "userspace/auto");
  const Status uffd = UserspaceWriteTracker::ProbeUffdWpAsync();
  const Status soft = UserspaceWriteTracker::ProbeSoftDirty();
  Status s = tracker.Enable();
  if (uffd.ok()) {
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(tracker.mode(), Mode::kUffdWpAsync);
    EXPECT_EQ(tracker.name(), "userspace/uffd-wp");
  } else if (soft.ok()) {
    ASSERT_TRUE(s.ok()) << s.message();
    EXPECT_EQ(tracker.mode(), Mode::kSoftDirty);
  } else {
    EXPECT_EQ(s.code(), Code::kUnavailable);
    EXPECT_NE(s.message().find("uffd-wp: "), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("soft-dirty: "), std::string::npos) << s.message();
    return;
  }
  WritePage(g, 77, 1);
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  ExpectExact(g, tracker.mode(), {77}, Take(out));
  ASSERT_TRUE(tracker.Disable().ok());
  EXPECT_EQ(tracker.mode(), Mode::kAuto);
}

// On a kernel built without CONFIG_MEM_SOFT_DIRTY (this project's reference
// host), clear_refs "4" succeeds but the bit never sets: Enable must notice.
TEST(UserspaceTrackerTest, SoftDirtyWithoutKernelSupportIsUnavailable) {
  const Status probe = UserspaceWriteTracker::ProbeSoftDirty();
  if (probe.ok()) GTEST_SKIP() << "this kernel tracks soft-dirty; nothing to check";
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kSoftDirty});
  Status s = tracker.Enable();
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.message();
  EXPECT_NE(s.message().find("soft-dirty"), std::string::npos) << s.message();
  EXPECT_EQ(tracker.mode(), Mode::kSoftDirty);
}

TEST(UserspaceTrackerTest, OneSoftDirtyTrackerPerProcess) {
  const Status probe = UserspaceWriteTracker::ProbeSoftDirty();
  if (!probe.ok()) GTEST_SKIP() << "soft-dirty unavailable: " << probe.message();
  GuestMemory g;
  UserspaceWriteTracker first(g.table(), {.mode = Mode::kSoftDirty});
  UserspaceWriteTracker second(g.table(), {.mode = Mode::kSoftDirty});
  ASSERT_TRUE(first.Enable().ok());
  Status s = second.Enable();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("process"), std::string::npos) << s.message();
  EXPECT_FALSE(UserspaceWriteTracker::ProbeSoftDirty().ok());
  ASSERT_TRUE(first.Disable().ok());
  EXPECT_TRUE(second.Enable().ok());
}

TEST(UserspaceTrackerTest, ExplicitOnlyReportsMarksNotWrites) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kExplicitOnly});
  ASSERT_TRUE(tracker.Enable().ok());
  EXPECT_EQ(tracker.mode(), Mode::kExplicitOnly);
  EXPECT_EQ(tracker.name(), "userspace/explicit");
  WritePage(g, 1, 1);  // the kernel tracks nothing in this mode
  ASSERT_TRUE(tracker.MarkDirty(0x2fff, 2).ok());                     // straddles pages 2 and 3
  ASSERT_TRUE(tracker.MarkDirty(kHighGpa + 64 * kPageSize, 130 * kPageSize).ok());  // 130 pages over 3 words
  ASSERT_TRUE(tracker.MarkDirty(kRamBytes - 1, 1).ok());              // last byte of slot 0
  ASSERT_TRUE(tracker.MarkDirty(12345, 0).ok());                      // empty: nothing
  std::set<uint64_t> expect = {2, 3, kRamPages - 1};
  for (uint64_t p = 0; p < 130; ++p) expect.insert(kRamPages + 64 + p);
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(Take(out), expect);
  EXPECT_EQ(tracker.stats().last_pages, expect.size());
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u);
}

TEST(UserspaceTrackerTest, MarkDirtyOutsideTheSlotsFailsAndMarksNothing) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kExplicitOnly});
  ASSERT_TRUE(tracker.Enable().ok());
  Status s = tracker.MarkDirty(kRamBytes, kPageSize);  // the hole after slot 0
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("[gpa 0x4000000, +0x1000)"), std::string::npos) << s.message();
  s = tracker.MarkDirty(kRamBytes - kPageSize, 2 * kPageSize);  // runs off the end of slot 0
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("gpa 0x4000000 lies outside"), std::string::npos) << s.message();
  s = tracker.MarkDirty(kHighGpa + kHighBytes - kPageSize, 2 * kPageSize);  // off the end of slot 1
  EXPECT_NE(s.message().find("0x101000000"), std::string::npos) << s.message();
  s = tracker.MarkDirty(~0ull - 10, 100);  // wraps
  EXPECT_NE(s.message().find("wraps"), std::string::npos) << s.message();
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u) << "a rejected range marked pages";
}

// Slots that touch in guest-physical space: one range may span both.
TEST(UserspaceTrackerTest, MarkDirtySpansAdjacentSlots) {
  GuestMemory g;
  SlotTable t;
  ASSERT_TRUE(t.Set({3, 0, g.Page(0), 1ull << 20, 0}).ok());
  ASSERT_TRUE(t.Set({4, 1ull << 20, g.Page(kRamPages), 1ull << 20, 0}).ok());
  UserspaceWriteTracker tracker(t, {.mode = Mode::kExplicitOnly});
  ASSERT_TRUE(tracker.Enable().ok());
  ASSERT_TRUE(tracker.MarkDirty((1ull << 20) - 2 * kPageSize, 4 * kPageSize).ok());
  DirtySet out(t);
  ASSERT_TRUE(tracker.Collect(out).ok());
  std::vector<uint64_t> gpas;
  out.TakeEach([&](uint64_t gpa) { gpas.push_back(gpa); });
  EXPECT_EQ(gpas, (std::vector<uint64_t>{0xfe000, 0xff000, 0x100000, 0x101000}));
}

// MarkDirty from several threads while the controlling thread collects:
// every mark is reported exactly once overall.
TEST(UserspaceTrackerTest, MarkDirtyFromManyThreadsDuringCollections) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kExplicitOnly});
  // Marks before Enable wait for the first collection.
  ASSERT_TRUE(tracker.MarkDirty(GpaOf(kTotalPages - 1), 1).ok());
  ASSERT_TRUE(tracker.Enable().ok());
  constexpr int kThreads = 4;
  constexpr uint64_t kPerThread = 4000;
  std::atomic<int> done{0};
  std::vector<std::thread> markers;
  for (int t = 0; t < kThreads; ++t) {
    markers.emplace_back([&, t] {
      // Thread t marks pages p with p % kThreads == t: each page once.
      for (uint64_t i = 0; i < kPerThread; ++i) {
        const uint64_t p = i * kThreads + static_cast<uint64_t>(t);
        EXPECT_TRUE(tracker.MarkDirty(GpaOf(p), 1).ok());
      }
      done.fetch_add(1);
    });
  }
  DirtySet out(g.table());
  std::vector<int> seen(kTotalPages, 0);
  auto drain = [&] {
    ASSERT_TRUE(tracker.Collect(out).ok());
    out.TakeEach([&](uint64_t gpa) { ++seen[IndexOf(gpa)]; });
  };
  while (done.load() < kThreads) drain();
  for (auto& m : markers) m.join();
  drain();
  for (uint64_t p = 0; p < kTotalPages; ++p) {
    const int want = (p < kThreads * kPerThread || p == kTotalPages - 1) ? 1 : 0;
    ASSERT_EQ(seen[p], want) << "page " << p;
  }
  EXPECT_EQ(tracker.stats().pages_collected, kThreads * kPerThread + 1);
}

TEST(UserspaceTrackerTest, CollectNeedsEnableAndMatchingGeometry) {
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kExplicitOnly});
  DirtySet out(g.table());
  EXPECT_EQ(tracker.Collect(out).code(), Code::kInvalidArgument);
  ASSERT_TRUE(tracker.Enable().ok());
  SlotTable other;
  ASSERT_TRUE(other.Set({0, 0, g.Page(0), kPageSize * 64, 0}).ok());
  DirtySet wrong(other);
  Status s = tracker.Collect(wrong);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("other slots"), std::string::npos) << s.message();
}

// A slot whose host range is partly unmapped is refused up front in every
// kernel mode (neither mechanism would notice the hole), naming the slot and
// its host range; kAuto must not hide it behind the fallback.
TEST(UserspaceTrackerTest, UnmappedSlotMemoryIsRejected) {
  auto m = Mapping::Map(3 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "test");
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(::munmap(m->data() + kPageSize, kPageSize), 0);  // a hole in the middle
  SlotTable t;
  ASSERT_TRUE(t.Set({7, 0x100000, m->data(), 3 * kPageSize, 0}).ok());
  char host[40];
  std::snprintf(host, sizeof host, "host [%p, ", static_cast<void*>(m->data()));
  for (Mode mode : {Mode::kAuto, Mode::kUffdWpAsync, Mode::kSoftDirty}) {
    UserspaceWriteTracker tracker(t, {.mode = mode});
    Status s = tracker.Enable();
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.message();
    EXPECT_NE(s.message().find("msync(MS_ASYNC) slot 7 (gpa 0x100000, 12 KiB) "), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(host), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("Cannot allocate memory"), std::string::npos) << s.message();
    EXPECT_EQ(tracker.mode(), mode);
  }
}

// One uffd tracker per range: a second registration fails, and the error
// names the ioctl, the slot, its host range and errno. kAuto reports it
// instead of falling back.
TEST(UserspaceTrackerTest, UffdSecondTrackerOnTheSameRangeFails) {
  const Status probe = UserspaceWriteTracker::ProbeUffdWpAsync();
  if (!probe.ok()) GTEST_SKIP() << "uffd-wp async unavailable: " << probe.message();
  GuestMemory g;
  UserspaceWriteTracker first(g.table(), {.mode = Mode::kUffdWpAsync});
  ASSERT_TRUE(first.Enable().ok());
  char host[40];
  std::snprintf(host, sizeof host, "host [%p, ", static_cast<void*>(g.Page(0)));
  for (Mode mode : {Mode::kUffdWpAsync, Mode::kAuto}) {
    UserspaceWriteTracker second(g.table(), {.mode = mode});
    Status s = second.Enable();
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find("UFFDIO_REGISTER (mode WP) slot 0 (gpa 0x0, 64 MiB) "), std::string::npos)
        << s.message();
    EXPECT_NE(s.message().find(host), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("Device or resource busy"), std::string::npos) << s.message();
  }
  // The failed attempts left the first tracker's registration alone.
  WritePage(g, 42, 1);
  DirtySet out(g.table());
  ASSERT_TRUE(first.Collect(out).ok());
  ExpectExact(g, Mode::kUffdWpAsync, {42}, Take(out));
}

// Documented limit: writes that bypass the registered mapping (pwrite to the
// memfd) change guest memory without touching its page tables.
TEST(UserspaceTrackerTest, UffdDoesNotSeeWritesThroughTheFile) {
  const Status probe = UserspaceWriteTracker::ProbeUffdWpAsync();
  if (!probe.ok()) GTEST_SKIP() << "uffd-wp async unavailable: " << probe.message();
  GuestMemory g;
  UserspaceWriteTracker tracker(g.table(), {.mode = Mode::kUffdWpAsync});
  ASSERT_TRUE(tracker.Enable().ok());
  const uint64_t v = 0x1234;
  ASSERT_EQ(::pwrite(g.memfd(), &v, sizeof v, 8 * kPageSize), static_cast<ssize_t>(sizeof v));
  ASSERT_EQ(std::memcmp(g.Page(8), &v, sizeof v), 0);  // the mapping sees the data...
  DirtySet out(g.table());
  ASSERT_TRUE(tracker.Collect(out).ok());
  EXPECT_EQ(out.Count(), 0u);  // ...but no pte was written: callers MarkDirty such writes
}

}  // namespace
}  // namespace pmlmig::engine
