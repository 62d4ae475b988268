// Micro-benchmarks of the PML path: draining a hardware-format log into a
// DirtySet (per entry), and the software PML CPU's Write() (per page). No
// KVM, no system calls in the timed loops; guest memory is a reserved,
// untouched 1 GiB mapping since only its geometry matters.
#include <sys/mman.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <utility>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/pml_log.h"
#include "pmlmig/engine/pml_model.h"
#include "pmlmig/engine/slot_table.h"

namespace {

using pmlmig::engine::DirtySet;
using pmlmig::engine::kPageSize;
using pmlmig::engine::kPmlLogEntries;
using pmlmig::engine::PmlFormat;

constexpr uint64_t kSlotBytes = 1ull << 30;
constexpr uint64_t kSlotGpa = 1ull << 32;  // high memory, as on a PC
constexpr uint64_t kSlotPages = kSlotBytes / kPageSize;

// One 1 GiB slot at 4 GiB; false (and a skip) if the reservation fails.
bool MakeSlot(benchmark::State& state, pmlmig::Mapping& host, pmlmig::engine::SlotTable& table) {
  auto m = pmlmig::Mapping::Map(kSlotBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                                0, "bench guest memory");
  if (!m.ok()) {
    state.SkipWithError(m.status().ToString().c_str());
    return false;
  }
  host = std::move(m).value();
  pmlmig::engine::MemorySlot s;
  s.slot = 0;
  s.gpa = kSlotGpa;
  s.host = host.data();
  s.size = kSlotBytes;
  if (!table.Set(s).ok()) {
    state.SkipWithError("slot setup failed");
    return false;
  }
  return true;
}

// A full log (index wrapped to 0xFFFF) of 512 distinct pages spread at random
// over the 1 GiB slot, with junk in the low 12 bits that the drain must ignore.
void BM_PmlDrainFullLog(benchmark::State& state, PmlFormat format) {
  pmlmig::Mapping host;
  pmlmig::engine::SlotTable table;
  if (!MakeSlot(state, host, table)) return;
  DirtySet set(table);
  pmlmig::engine::PmlLogPage log;
  std::mt19937_64 rng(42);
  std::vector<uint64_t> pages(kSlotPages);
  for (uint64_t i = 0; i < kSlotPages; ++i) pages[i] = i;
  std::shuffle(pages.begin(), pages.end(), rng);
  for (uint32_t i = 0; i < kPmlLogEntries; ++i) log.entries[i] = kSlotGpa + pages[i] * kPageSize + (i & 0xFFF);
  const uint16_t index = 0xFFFF;
  for (auto _ : state) {
    auto r = pmlmig::engine::DrainPmlLog(format, log, index, set);
    benchmark::DoNotOptimize(r);
  }
  if (set.Count() != kPmlLogEntries) state.SkipWithError("drain marked the wrong number of pages");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kPmlLogEntries);
  // Seconds per entry, printed with an SI prefix (e.g. "2.1n" = 2.1 ns).
  state.counters["per_entry"] = benchmark::Counter(static_cast<double>(state.iterations()) * kPmlLogEntries,
                                                   benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK_CAPTURE(BM_PmlDrainFullLog, vmx, PmlFormat::kVmx);
BENCHMARK_CAPTURE(BM_PmlDrainFullLog, svm, PmlFormat::kSvm);

// The same drain when the guest dirtied 512 consecutive pages (a memcpy-like
// run): eight bitmap words, so most entries land in the word before them.
void BM_PmlDrainSequentialLog(benchmark::State& state, PmlFormat format) {
  pmlmig::Mapping host;
  pmlmig::engine::SlotTable table;
  if (!MakeSlot(state, host, table)) return;
  DirtySet set(table);
  pmlmig::engine::PmlLogPage log;
  // The CPU fills entry 511 first: page p of the run sits at entry 511 - p.
  for (uint32_t p = 0; p < kPmlLogEntries; ++p) log.entries[kPmlLogEntries - 1 - p] = kSlotGpa + (4096 + p) * kPageSize;
  for (auto _ : state) {
    auto r = pmlmig::engine::DrainPmlLog(format, log, 0xFFFF, set);
    benchmark::DoNotOptimize(r);
  }
  if (set.Count() != kPmlLogEntries) state.SkipWithError("drain marked the wrong number of pages");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kPmlLogEntries);
  state.counters["per_entry"] = benchmark::Counter(static_cast<double>(state.iterations()) * kPmlLogEntries,
                                                   benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK_CAPTURE(BM_PmlDrainSequentialLog, vmx, PmlFormat::kVmx);
BENCHMARK_CAPTURE(BM_PmlDrainSequentialLog, svm, PmlFormat::kSvm);

// Write() to a page not yet dirty: logs it, and every 512th such write takes
// a PML-full exit whose handler drains into a DirtySet (amortised here, as in
// a guest that dirties pages steadily). Walks the slot with a stride of 65
// pages so consecutive writes hit different bitmap words; after every page has
// been written once the dirty bits are cleared (re-protection) inside the
// timed loop, costing about 1/262144 of a pass.
void BM_PmlModelWriteNewPage(benchmark::State& state, PmlFormat format) {
  pmlmig::Mapping host;
  pmlmig::engine::SlotTable table;
  if (!MakeSlot(state, host, table)) return;
  pmlmig::engine::PmlModelTracker tracker(table, format);
  if (!tracker.Enable().ok()) {
    state.SkipWithError("enable failed");
    return;
  }
  pmlmig::engine::PmlModel& m = tracker.model();
  uint64_t page = 0, written = 0;
  for (auto _ : state) {
    pmlmig::Status s = m.Write(kSlotGpa + page * kPageSize);
    benchmark::DoNotOptimize(s);
    page = (page + 65) & (kSlotPages - 1);  // 65 is odd: visits every page once per pass
    if (++written == kSlotPages) {
      written = 0;
      m.ClearAllDirtyBits();
    }
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
  state.counters["full_exits"] = static_cast<double>(m.full_exits());
}
BENCHMARK_CAPTURE(BM_PmlModelWriteNewPage, vmx, PmlFormat::kVmx);
BENCHMARK_CAPTURE(BM_PmlModelWriteNewPage, svm, PmlFormat::kSvm);

// Write() to a page that is already dirty: the CPU logs nothing.
void BM_PmlModelWriteDirtyPage(benchmark::State& state, PmlFormat format) {
  pmlmig::Mapping host;
  pmlmig::engine::SlotTable table;
  if (!MakeSlot(state, host, table)) return;
  pmlmig::engine::PmlModelTracker tracker(table, format);
  if (!tracker.Enable().ok()) {
    state.SkipWithError("enable failed");
    return;
  }
  pmlmig::engine::PmlModel& m = tracker.model();
  for (uint64_t p = 0; p < 4096; ++p) (void)m.Write(kSlotGpa + p * kPageSize);
  uint64_t page = 0;
  for (auto _ : state) {
    pmlmig::Status s = m.Write(kSlotGpa + page * kPageSize);
    benchmark::DoNotOptimize(s);
    page = (page + 1) & 4095;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK_CAPTURE(BM_PmlModelWriteDirtyPage, vmx, PmlFormat::kVmx);
BENCHMARK_CAPTURE(BM_PmlModelWriteDirtyPage, svm, PmlFormat::kSvm);

}  // namespace
