// Micro-benchmarks of the dirty-tracking hot paths, without KVM or system
// calls: the ring harvester over a synthetic ring in plain memory, and the
// dirty set's take-and-iterate per GiB of guest at several dirty fractions.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <vector>

#include "pmlmig/engine/dirty_ring.h"
#include "pmlmig/engine/dirty_set.h"

namespace {

using pmlmig::engine::DirtySet;
using pmlmig::engine::SlotTable;

SlotTable OneSlot(uint64_t bytes) {
  SlotTable t;
  // Geometry only: the harvester and the dirty set never touch guest memory.
  (void)t.Set({0, 0, reinterpret_cast<uint8_t*>(0x100000000000), bytes, 0});
  return t;
}

// Harvest of one full ring (KVM's maximum here, 65536 entries) of GFNs spread
// uniformly over a 1 GiB slot; per-entry time = time / items. Re-publishing
// the entries (what KVM would do) is outside the timed region.
void BM_RingHarvest(benchmark::State& state) {
  const uint32_t n = static_cast<uint32_t>(state.range(0));
  const uint64_t pages = (1ull << 30) >> 12;
  std::vector<kvm_dirty_gfn> ring(n);
  std::vector<uint64_t> offsets(n);
  std::mt19937_64 rng(1);
  for (auto& o : offsets) o = rng() % pages;
  DirtySet set(OneSlot(1ull << 30));
  pmlmig::engine::RingHarvester h(ring.data(), n);
  for (auto _ : state) {
    state.PauseTiming();
    for (uint32_t i = 0; i < n; ++i) {
      ring[i].slot = 0;
      ring[i].offset = offsets[i];
      ring[i].flags = 1;  // DIRTY
    }
    state.ResumeTiming();
    auto r = h.Harvest(set);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * n);
  state.counters["ns_per_entry"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * n, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_RingHarvest)->Arg(4096)->Arg(65536);

// Take-and-iterate of the dirty set of a 1 GiB guest with a given share of
// pages dirty (per mille: 1 = 0.1%, 10 = 1%, 100 = 10%, 1000 = 100%).
void BM_DirtySetTakeEach(benchmark::State& state) {
  const uint64_t bytes = 1ull << 30;
  const uint64_t pages = bytes >> 12;
  const uint64_t dirty = pages * static_cast<uint64_t>(state.range(0)) / 1000;
  DirtySet set(OneSlot(bytes));
  std::vector<uint64_t> which(pages);
  for (uint64_t i = 0; i < pages; ++i) which[i] = i;
  std::shuffle(which.begin(), which.end(), std::mt19937_64(2));
  which.resize(dirty);
  uint64_t sum = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (uint64_t p : which) set.MarkSlotPage(0, p);
    state.ResumeTiming();
    set.TakeEach([&](uint64_t gpa) { sum += gpa; });
  }
  benchmark::DoNotOptimize(sum);
  state.counters["dirty_pages"] = static_cast<double>(dirty);
  state.counters["GiB_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DirtySetTakeEach)->Arg(1)->Arg(10)->Arg(100)->Arg(1000)->Unit(benchmark::kMicrosecond);

// Marking, as the harvester does it: one atomic OR per page.
void BM_DirtySetMark(benchmark::State& state) {
  DirtySet set(OneSlot(1ull << 30));
  const uint64_t pages = (1ull << 30) >> 12;
  uint64_t p = 0;
  for (auto _ : state) {
    set.MarkSlotPage(0, p);
    p = (p + 7919) % pages;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()));
}
BENCHMARK(BM_DirtySetMark);

}  // namespace
