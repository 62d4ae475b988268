// Micro-benchmarks of the host-side work that scales with guest memory: the
// seeded fill and the memory checker. Per-page costs, no KVM needed.
#include <benchmark/benchmark.h>

#include <vector>

#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/fill.h"

namespace {

void BM_FillPage(benchmark::State& state) {
  alignas(64) uint8_t page[4096];
  uint64_t gfn = 0;
  for (auto _ : state) {
    pmlmig::vmm::FillPage(1, gfn++, page);
    benchmark::DoNotOptimize(page);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 4096);
}
BENCHMARK(BM_FillPage);

void BM_CheckGuestMemory(benchmark::State& state) {
  const uint64_t bytes = static_cast<uint64_t>(state.range(0)) << 20;
  pmlmig::vmm::TestGuestConfig config;
  config.memory_bytes = bytes;
  config.vcpus = 1;
  config.workload = *pmlmig::vmm::ParseWorkload("random");
  auto mem = pmlmig::vmm::GuestMemory::Create({bytes, false});
  if (!mem.ok() || !pmlmig::vmm::PrepareTestGuest(*mem, config).ok()) {
    state.SkipWithError("guest memory setup failed");
    return;
  }
  for (auto _ : state) {
    auto r = pmlmig::vmm::CheckGuestMemory(*mem, config, {0});
    benchmark::DoNotOptimize(r);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_CheckGuestMemory)->Arg(64)->Arg(256)->Unit(benchmark::kMillisecond);

}  // namespace
