// Tests of the PML log drain (pml_log.h) and of the software PML CPU and its
// tracker (pml_model.h), for both the VMX and the SVM index formats. No KVM
// and no VMX/SVM needed: the log pages are plain memory, and guest memory is
// an untouched MAP_NORESERVE mapping (only its geometry matters).
#include <sys/mman.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/pml_log.h"
#include "pmlmig/engine/pml_model.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {
namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;

// Guest memory geometry backed by one reserved host mapping.
struct Guest {
  Mapping host;
  SlotTable table;
};

// slots: (gpa, bytes); slot ids are 0, 1, 2... in the order given.
Guest MakeGuest(const std::vector<std::pair<uint64_t, uint64_t>>& slots) {
  Guest g;
  uint64_t total = 0;
  for (const auto& s : slots) total += s.second;
  auto m = Mapping::Map(total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0,
                        "test guest memory");
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  if (!m.ok()) return g;
  g.host = std::move(m).value();
  uint64_t off = 0;
  uint32_t id = 0;
  for (const auto& [gpa, size] : slots) {
    MemorySlot ms;
    ms.slot = id++;
    ms.gpa = gpa;
    ms.host = g.host.data() + off;
    ms.size = size;
    const Status st = g.table.Set(ms);
    EXPECT_TRUE(st.ok()) << st.ToString();
    off += size;
  }
  return g;
}

// The PC-like layout at small sizes: low memory at 0, high memory at 4 GiB.
Guest PcGuest() { return MakeGuest({{0, 64 * kMiB}, {4 * kGiB, 32 * kMiB}}); }

std::vector<uint64_t> Pages(const DirtySet& set) {
  std::vector<uint64_t> v;
  set.ForEach([&](uint64_t gpa) { v.push_back(gpa); });
  std::sort(v.begin(), v.end());
  return v;
}

// Fills a log as the CPU would: gpas[0] at entry 511, gpas[1] at 510, ...
// Returns the index the CPU would leave behind (wrapping 0 -> 0xFFFF).
uint16_t WriteLikeCpu(PmlLogPage& log, const std::vector<uint64_t>& gpas) {
  uint16_t index = kPmlHeadIndex;
  for (uint64_t gpa : gpas) {
    log.entries[index] = gpa;
    index = static_cast<uint16_t>(index - 1);
  }
  return index;
}

// A value that is outside the PC guest's memory: stale slots of the log hold
// it, so reading one would show up as an error.
constexpr uint64_t kPoison = 0xdead0000'0000'0000ull;

class PmlLogTest : public ::testing::TestWithParam<PmlFormat> {
 protected:
  PmlFormat format() const { return GetParam(); }
};

TEST_P(PmlLogTest, IndexHelpers) {
  const PmlFormat f = format();
  EXPECT_EQ(PmlEmptyIndex(f), 511);
  uint16_t index = 0xFFFF;
  ResetPmlIndex(f, index);
  EXPECT_EQ(index, 511);
  EXPECT_EQ(PmlValidEntries(f, 511), 0u);
  EXPECT_EQ(PmlValidEntries(f, 510), 1u);
  EXPECT_EQ(PmlValidEntries(f, 1), 510u);
  EXPECT_EQ(PmlValidEntries(f, 0), 511u);
  EXPECT_FALSE(PmlLogFull(f, 0));
  for (uint16_t wrapped : {uint16_t{0xFFFF}, uint16_t{512}, uint16_t{0x1000}, uint16_t{0x8000}}) {
    EXPECT_TRUE(PmlLogFull(f, wrapped)) << wrapped;
    EXPECT_EQ(PmlValidEntries(f, wrapped), 512u) << wrapped;
    EXPECT_EQ(PmlFirstValidEntry(f, wrapped), 0u) << wrapped;
  }
}

TEST_P(PmlLogTest, EmptyLogDrainsNothing) {
  Guest g = PcGuest();
  DirtySet set(g.table);
  PmlLogPage log;
  log.entries.fill(kPoison);  // nothing valid may be read
  PmlDrainStats st;
  auto r = DrainPmlLog(format(), log, PmlEmptyIndex(format()), set, &st);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 0u);
  EXPECT_EQ(st.valid, 0u);
  EXPECT_EQ(set.Count(), 0u);
}

TEST_P(PmlLogTest, PartialLogDrainsOnlyValidEntries) {
  Guest g = PcGuest();
  DirtySet set(g.table);
  PmlLogPage log;
  log.entries.fill(kPoison);
  const std::vector<uint64_t> gpas = {0x0, 0x5000, 4 * kGiB + 0x3000, 64 * kMiB - kPageSize, 4 * kGiB};
  const uint16_t index = WriteLikeCpu(log, gpas);
  ASSERT_EQ(index, 511 - gpas.size());
  auto r = DrainPmlLog(format(), log, index, set);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, gpas.size());
  std::vector<uint64_t> want = gpas;
  std::sort(want.begin(), want.end());
  EXPECT_EQ(Pages(set), want);
}

TEST_P(PmlLogTest, IndexZeroMeans511Entries) {
  Guest g = PcGuest();
  DirtySet set(g.table);
  PmlLogPage log;
  std::vector<uint64_t> gpas;
  for (uint64_t i = 0; i < 511; ++i) gpas.push_back(i * kPageSize);
  ASSERT_EQ(WriteLikeCpu(log, gpas), 0);
  log.entries[0] = kPoison;  // the next free entry: not valid yet
  auto r = DrainPmlLog(format(), log, 0, set);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, 511u);
  EXPECT_EQ(set.Count(), 511u);
}

TEST_P(PmlLogTest, FullAndWrappedLogDrainsAll512) {
  Guest g = PcGuest();
  PmlLogPage log;
  std::vector<uint64_t> gpas;
  for (uint64_t i = 0; i < 256; ++i) gpas.push_back(i * 3 * kPageSize);
  for (uint64_t i = 0; i < 256; ++i) gpas.push_back(4 * kGiB + i * 5 * kPageSize);
  const uint16_t left = WriteLikeCpu(log, gpas);
  EXPECT_EQ(left, 0xFFFF);  // the CPU's own wrap after entry 0
  for (uint16_t index : {left, uint16_t{512}, uint16_t{0x1FF0}, uint16_t{0x8000}}) {
    DirtySet set(g.table);
    PmlDrainStats st;
    auto r = DrainPmlLog(format(), log, index, set, &st);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(*r, 512u) << "index " << index;
    EXPECT_EQ(st.valid, 512u);
    EXPECT_EQ(set.Count(), 512u);
    EXPECT_TRUE(set.TestGpa(0));
    EXPECT_TRUE(set.TestGpa(4 * kGiB + 255 * 5 * kPageSize));
  }
}

TEST_P(PmlLogTest, LowTwelveBitsAreIgnored) {
  Guest g = PcGuest();
  DirtySet set(g.table);
  PmlLogPage log;
  const std::vector<uint64_t> gpas = {0x7123, 0x7FFF, 0x8001, 64 * kMiB - 1, 4 * kGiB + 32 * kMiB - 1, 4 * kGiB + 0xFFF};
  const uint16_t index = WriteLikeCpu(log, gpas);
  auto r = DrainPmlLog(format(), log, index, set);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, gpas.size());
  const std::vector<uint64_t> want = {0x7000, 0x8000, 64 * kMiB - kPageSize, 4 * kGiB,
                                      4 * kGiB + 32 * kMiB - kPageSize};
  EXPECT_EQ(Pages(set), want);
}

TEST_P(PmlLogTest, GpaOutsideSlotsIsAnErrorAndTheRestIsStillDrained) {
  // Slot 2 has 5 pages: its bitmap word has 59 bits past the end that a wild
  // write could hit.
  Guest g = MakeGuest({{0, 64 * kMiB}, {4 * kGiB, 32 * kMiB}, {8 * kGiB, 5 * kPageSize}});
  DirtySet set(g.table);
  PmlLogPage log;
  const std::vector<uint64_t> gpas = {
      0x1000,                             // ok
      64 * kMiB,                          // the hole above low memory: first bad entry
      4 * kGiB + 0x2000,                  // ok
      4 * kGiB + 32 * kMiB,               // one page past slot 1
      8 * kGiB + 4 * kPageSize,           // ok: slot 2's last page
      8 * kGiB + 5 * kPageSize,           // one page past slot 2 (inside its bitmap word)
      0xFFF0'0000'0000'0000ull,           // bits above any physical address width
      4 * kGiB - kPageSize,               // just below slot 1
  };
  const uint16_t index = WriteLikeCpu(log, gpas);
  PmlDrainStats st;
  auto r = DrainPmlLog(format(), log, index, set, &st);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("0x4000000"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find(std::string(PmlFormatName(format()))), std::string::npos);
  EXPECT_EQ(st.valid, gpas.size());
  EXPECT_EQ(st.outside, 5u);
  EXPECT_EQ(st.marked, 3u);
  EXPECT_EQ(st.first_outside_gpa, 64 * kMiB);
  const std::vector<uint64_t> want = {0x1000, 4 * kGiB + 0x2000, 8 * kGiB + 4 * kPageSize};
  EXPECT_EQ(Pages(set), want);
  // Nothing landed in the bits past slot 2's end.
  EXPECT_EQ(set.slots()[2].bits[0].load(), 1ull << 4);
}

// The drain merges consecutive entries that hit one bitmap word; the merge
// must break at word boundaries, at slot changes (same word number, other
// slot) and around bad entries, and duplicates must still count as drained.
TEST_P(PmlLogTest, RunsAcrossWordsSlotsAndDuplicates) {
  Guest g = MakeGuest({{0, 64 * kMiB}, {4 * kGiB, 32 * kMiB}, {8 * kGiB, 5 * kPageSize}});
  DirtySet set(g.table);
  PmlLogPage log;
  std::vector<uint64_t> gpas;
  for (uint64_t p = 60; p < 70; ++p) gpas.push_back(p * kPageSize);  // crosses word 0 -> 1
  gpas.push_back(4 * kGiB + 3 * kPageSize);  // slot 1, word 0
  gpas.push_back(2 * kPageSize);             // back to slot 0, word 0
  gpas.push_back(4 * kGiB + 3 * kPageSize);  // duplicate
  gpas.push_back(64 * kMiB);                 // bad, between two entries of one word
  gpas.push_back(4 * kGiB + 4 * kPageSize);
  for (uint64_t p = 0; p < 5; ++p) gpas.push_back(8 * kGiB + p * kPageSize);  // all of slot 2
  const uint16_t index = WriteLikeCpu(log, gpas);
  PmlDrainStats st;
  auto r = DrainPmlLog(format(), log, index, set, &st);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(st.outside, 1u);
  EXPECT_EQ(st.marked, gpas.size() - 1);
  std::vector<uint64_t> want;
  for (uint64_t p = 60; p < 70; ++p) want.push_back(p * kPageSize);
  want.push_back(2 * kPageSize);
  want.push_back(4 * kGiB + 3 * kPageSize);
  want.push_back(4 * kGiB + 4 * kPageSize);
  for (uint64_t p = 0; p < 5; ++p) want.push_back(8 * kGiB + p * kPageSize);
  std::sort(want.begin(), want.end());
  EXPECT_EQ(Pages(set), want);
  EXPECT_EQ(set.slots()[2].bits[0].load(), 0x1Full);
}

TEST_P(PmlLogTest, NoSlotsEverythingIsOutside) {
  SlotTable empty;
  DirtySet set(empty);
  PmlLogPage log;
  const uint16_t index = WriteLikeCpu(log, {0x1000, 0x2000});
  PmlDrainStats st;
  auto r = DrainPmlLog(format(), log, index, set, &st);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(st.outside, 2u);
  EXPECT_EQ(st.marked, 0u);
}

// ---- the software PML CPU ----

TEST_P(PmlLogTest, ModelLogsOnlyCleanToDirtyTransitions) {
  Guest g = PcGuest();
  PmlModel m(g.table, format());
  m.set_logging(true);
  ASSERT_TRUE(m.Write(0x5123).ok());
  EXPECT_EQ(m.index(), 510);
  EXPECT_EQ(m.log().entries[511], 0x5000u);
  EXPECT_TRUE(m.DirtyBit(0x5000));
  ASSERT_TRUE(m.Write(0x5FF8).ok());  // same page, already dirty: not logged
  EXPECT_EQ(m.index(), 510);
  ASSERT_TRUE(m.Write(4 * kGiB + 0x10).ok());
  EXPECT_EQ(m.index(), 509);
  EXPECT_EQ(m.log().entries[510], 4 * kGiB);
  EXPECT_EQ(m.entries_logged(), 2u);
  // Re-protecting the page makes the next write log it again.
  EXPECT_TRUE(m.ClearDirtyBit(0x5000));
  ASSERT_TRUE(m.Write(0x5000).ok());
  EXPECT_EQ(m.index(), 508);
  EXPECT_EQ(m.log().entries[509], 0x5000u);
}

TEST_P(PmlLogTest, ModelWithLoggingOffSetsDirtyBitsOnly) {
  Guest g = PcGuest();
  PmlModel m(g.table, format());
  ASSERT_TRUE(m.Write(0x3000).ok());
  EXPECT_TRUE(m.DirtyBit(0x3000));
  EXPECT_EQ(m.index(), kPmlHeadIndex);
  EXPECT_EQ(m.entries_logged(), 0u);
}

TEST_P(PmlLogTest, ModelRejectsWritesOutsideGuestMemory) {
  Guest g = PcGuest();
  PmlModel m(g.table, format());
  m.set_logging(true);
  const Status s = m.Write(64 * kMiB + 0x10);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("0x4000010"), std::string::npos) << s.message();
  EXPECT_EQ(m.index(), kPmlHeadIndex);
  EXPECT_EQ(m.CountDirtyBits(), 0u);
}

TEST_P(PmlLogTest, ModelTakesAFullExitOnThe513thPage) {
  Guest g = PcGuest();
  PmlModel m(g.table, format());
  DirtySet drained(g.table);
  int calls = 0;
  uint16_t index_at_exit = 0;
  m.set_full_exit_handler([&](PmlModel& cpu) -> Status {
    ++calls;
    index_at_exit = cpu.index();
    auto r = DrainPmlLog(cpu.format(), cpu.log(), cpu.index(), drained);
    if (!r.ok()) return r.status();
    if (*r != kPmlLogEntries) return Internal("expected a full log");
    cpu.ResetLog();
    return Status::Ok();
  });
  m.set_logging(true);
  for (uint64_t p = 0; p < 512; ++p) ASSERT_TRUE(m.Write(p * kPageSize).ok());
  EXPECT_EQ(m.index(), 0xFFFF);  // wrapped: full, but no exit until the next logging write
  EXPECT_EQ(calls, 0);
  ASSERT_TRUE(m.Write(0).ok());  // already dirty: logs nothing, no exit
  EXPECT_EQ(calls, 0);
  ASSERT_TRUE(m.Write(512 * kPageSize).ok());
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(m.full_exits(), 1u);
  EXPECT_EQ(index_at_exit, 0xFFFF);
  EXPECT_EQ(drained.Count(), 512u);
  EXPECT_EQ(m.index(), 510);
  EXPECT_EQ(m.log().entries[511], 512 * kPageSize);
}

TEST_P(PmlLogTest, ModelFailsTheWriteWhenTheHandlerLeavesTheLogFull) {
  Guest g = PcGuest();
  PmlModel m(g.table, format());
  m.set_full_exit_handler([](PmlModel&) { return Status::Ok(); });  // forgets to reset
  m.set_logging(true);
  for (uint64_t p = 0; p < 512; ++p) ASSERT_TRUE(m.Write(p * kPageSize).ok());
  const Status s = m.Write(600 * kPageSize);
  EXPECT_FALSE(s.ok());
  EXPECT_FALSE(m.DirtyBit(600 * kPageSize));
  EXPECT_EQ(m.entries_logged(), 512u);
}

// ---- the tracker built on the model ----

TEST_P(PmlLogTest, TrackerRejectsCollectBeforeEnableAndForeignGeometry) {
  Guest g = PcGuest();
  PmlModelTracker t(g.table, format());
  DirtySet out(g.table);
  EXPECT_FALSE(t.Collect(out).ok());
  ASSERT_TRUE(t.Enable().ok());
  Guest other = MakeGuest({{0, 64 * kMiB}});
  DirtySet wrong(other.table);
  EXPECT_FALSE(t.Collect(wrong).ok());
  EXPECT_TRUE(t.Collect(out).ok());
}

TEST_P(PmlLogTest, TrackerReportsAPageOncePerRoundAndAgainAfterReprotection) {
  Guest g = PcGuest();
  PmlModelTracker t(g.table, format());
  ASSERT_TRUE(t.Enable().ok());
  PmlModel& m = t.model();
  ASSERT_TRUE(m.Write(0x2000).ok());
  ASSERT_TRUE(m.Write(0x2008).ok());
  ASSERT_TRUE(m.Write(4 * kGiB).ok());
  EXPECT_EQ(m.entries_logged(), 2u);
  DirtySet out(g.table);
  ASSERT_TRUE(t.Collect(out).ok());
  EXPECT_EQ(Pages(out), (std::vector<uint64_t>{0x2000, 4 * kGiB}));
  EXPECT_FALSE(m.DirtyBit(0x2000));  // re-protected
  EXPECT_EQ(m.index(), kPmlHeadIndex);

  DirtySet out2(g.table);
  ASSERT_TRUE(t.Collect(out2).ok());
  EXPECT_EQ(out2.Count(), 0u);

  ASSERT_TRUE(m.Write(0x2010).ok());
  DirtySet out3(g.table);
  ASSERT_TRUE(t.Collect(out3).ok());
  EXPECT_EQ(Pages(out3), (std::vector<uint64_t>{0x2000}));
  EXPECT_EQ(t.stats().entries_harvested, 3u);
  EXPECT_EQ(t.stats().overflows, 0u);
}

// The no-miss test. Rules: the model is one CPU that is stopped while
// Collect() runs (as a kicked vCPU is), so there is no write inside the
// harvest-to-re-protect window (REFERENCE §2); every write is either before a
// Collect() or after it returns. Then, exactly:
//   - every page written since the previous Collect() is in this one's
//     result, and no other page is;
//   - each such page was logged exactly once (a write to a page that is
//     already dirty logs nothing until Collect() re-protects it);
//   - the PML-full exits between collections are exactly those the hardware
//     would take: (L - 1) / 512 for L > 0 entries logged since the last flush.
TEST_P(PmlLogTest, ModelTrackerNoMiss) {
  Guest g = PcGuest();
  PmlModelTracker t(g.table, format());
  ASSERT_TRUE(t.Enable().ok());
  PmlModel& m = t.model();

  std::vector<uint64_t> all_pages;
  for (const MemorySlot& s : g.table.slots()) {
    for (uint64_t p = 0; p < s.pages(); ++p) all_pages.push_back(s.gpa + p * kPageSize);
  }
  std::mt19937_64 rng(0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(format()));
  std::uniform_int_distribution<size_t> any_page(0, all_pages.size() - 1);
  std::uniform_int_distribution<size_t> hot_page(0, 299);  // a hot set: many repeated writes
  std::uniform_int_distribution<uint64_t> offset(0, kPageSize - 1);
  std::uniform_int_distribution<int> coin(0, 99);
  std::uniform_int_distribution<int> round_length(1, 6000);

  constexpr int kWrites = 400000;
  std::set<uint64_t> expected;  // pages written since the previous Collect
  uint64_t checked = 0, collections = 0, logged_before = 0, exits_before = 0, max_round_exits = 0;
  int next_collect = round_length(rng);
  auto collect_and_check = [&] {
    DirtySet out(g.table);
    ASSERT_TRUE(t.Collect(out).ok());
    const std::vector<uint64_t> got = Pages(out);
    ASSERT_EQ(got, std::vector<uint64_t>(expected.begin(), expected.end())) << "collection " << collections;
    const uint64_t logged = m.entries_logged() - logged_before;
    ASSERT_EQ(logged, expected.size()) << "a page was logged twice or not at all";
    const uint64_t exits = m.full_exits() - exits_before;
    ASSERT_EQ(exits, logged == 0 ? 0 : (logged - 1) / kPmlLogEntries);
    ASSERT_EQ(m.CountDirtyBits(), 0u);
    max_round_exits = std::max(max_round_exits, exits);
    checked += got.size();
    ++collections;
    expected.clear();
    logged_before = m.entries_logged();
    exits_before = m.full_exits();
  };
  for (int w = 0; w < kWrites; ++w) {
    const uint64_t page = coin(rng) < 40 ? all_pages[hot_page(rng)] : all_pages[any_page(rng)];
    ASSERT_TRUE(m.Write(page + offset(rng)).ok());
    expected.insert(page);
    if (--next_collect == 0) {
      collect_and_check();
      if (HasFatalFailure()) return;
      next_collect = round_length(rng);
    }
  }
  collect_and_check();
  if (HasFatalFailure()) return;

  const TrackerStats st = t.stats();
  EXPECT_EQ(st.collections, collections);
  EXPECT_EQ(st.pages_collected, checked);
  EXPECT_EQ(st.entries_harvested, checked);
  EXPECT_EQ(st.background_harvests, m.full_exits());
  EXPECT_EQ(st.overflows, 0u);
  EXPECT_GT(m.full_exits(), 100u);
  EXPECT_GE(max_round_exits, 5u);  // some rounds spanned several PML-full exits
  std::printf("[ pml no-miss %s ] %d writes, %llu collections, %llu pages checked, %llu PML-full exits "
              "(up to %llu in one round), 0 missed, 0 extra\n",
              std::string(PmlFormatName(format())).c_str(), kWrites, static_cast<unsigned long long>(collections),
              static_cast<unsigned long long>(checked), static_cast<unsigned long long>(m.full_exits()),
              static_cast<unsigned long long>(max_round_exits));
}

// A dirty bit set behind the tracker's back (logging switched off by hand)
// would hide that page's next write; the tracker's self-check reports every
// page instead of missing one.
TEST_P(PmlLogTest, TrackerReportsEverythingWhenADirtyBitWasNeverLogged) {
  Guest g = PcGuest();
  PmlModelTracker t(g.table, format());
  ASSERT_TRUE(t.Enable().ok());
  t.model().set_logging(false);
  ASSERT_TRUE(t.model().Write(0x9000).ok());
  t.model().set_logging(true);
  DirtySet out(g.table);
  ASSERT_TRUE(t.Collect(out).ok());
  EXPECT_EQ(out.Count(), out.total_pages());
  EXPECT_EQ(t.stats().overflows, 1u);
  EXPECT_EQ(t.model().CountDirtyBits(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Pml, PmlLogTest, ::testing::Values(PmlFormat::kVmx, PmlFormat::kSvm),
                         [](const ::testing::TestParamInfo<PmlFormat>& p) {
                           return std::string(PmlFormatName(p.param));
                         });

}  // namespace
}  // namespace pmlmig::engine
