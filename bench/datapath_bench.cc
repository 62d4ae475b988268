// The receiver's and the sender's per-batch work, without the network:
// building a 4 MiB batch of random pages (copy, zero test, checksum) and
// checking and applying it into guest memory, with each checksum, and into
// fresh memory (a new memfd) through the mapping or through the file
// (pwritev). Bytes per second of page data; compare within one run.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <random>
#include <vector>

#include "batch_codec.h"
#include "pmlmig/base/unique_fd.h"

namespace {

using pmlmig::transport::BatchApplier;
using pmlmig::transport::BatchBuilder;
using pmlmig::transport::Checksum;
using pmlmig::transport::Compression;

constexpr uint64_t kBatchPages = 1024;
constexpr uint64_t kBatchBytes = kBatchPages * 4096;

// A memfd-backed guest memory of `bytes`, as the test VM has.
struct Memory {
  explicit Memory(uint64_t bytes) : size(bytes) {
    fd = pmlmig::UniqueFd(::memfd_create("datapath_bench", MFD_CLOEXEC));
    if (!fd.valid() || ::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) std::abort();
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) std::abort();
    host = static_cast<uint8_t*>(p);
    if (!slots.Set({0, 0, host, bytes, 0}).ok()) std::abort();
  }
  ~Memory() { ::munmap(host, size); }
  void FillRandom() {
    std::mt19937_64 rng(7);
    auto* w = reinterpret_cast<uint64_t*>(host);
    for (uint64_t i = 0; i < size / 8; ++i) w[i] = rng() | 1;
  }
  uint64_t size;
  pmlmig::UniqueFd fd;
  uint8_t* host = nullptr;
  pmlmig::engine::SlotTable slots;
};

class OneFile final : public pmlmig::engine::MigrationTarget {
 public:
  explicit OneFile(Memory& m) : m_(m) {}
  pmlmig::Status OnSetup(const pmlmig::engine::MigrationSetup&) override { return pmlmig::Status::Ok(); }
  const pmlmig::engine::SlotTable& memory() const override { return m_.slots; }
  std::optional<pmlmig::engine::MemoryFile> memory_file(uint32_t) const override {
    return pmlmig::engine::MemoryFile{m_.fd.get(), 0};
  }
  pmlmig::Result<pmlmig::engine::FinalReply> OnFinal(const pmlmig::engine::FinalState&) override { return pmlmig::engine::FinalReply{}; }
  pmlmig::Result<double> OnCommit() override { return 0.0; }
  void OnAbort(const std::string&) override {}
  std::unique_ptr<pmlmig::engine::VmControl> TakeVm() override { return nullptr; }

 private:
  Memory& m_;
};

Checksum ChecksumArg(int64_t a) { return a == 0 ? Checksum::kXxh64 : Checksum::kXxh3; }

void BM_BuildBatch(benchmark::State& state) {
  Memory src(kBatchBytes * 16);
  src.FillRandom();
  BatchBuilder builder(Compression::kNone);
  builder.set_checksum(ChecksumArg(state.range(0)));
  pmlmig::proto::PageBatch batch;
  uint64_t i = 0;
  for (auto _ : state) {
    if (!builder.Build(src.slots, (i++ % 16) * kBatchBytes, kBatchPages, {1, 0, 0, i}, &batch).ok()) std::abort();
    benchmark::DoNotOptimize(batch.checksum());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBatchBytes));
  state.SetLabel(state.range(0) == 0 ? "xxh64" : "xxh3");
}
BENCHMARK(BM_BuildBatch)->Arg(0)->Arg(1);

// Check and apply into resident memory: the cost of the receiver's passes.
void BM_ApplyResident(benchmark::State& state) {
  Memory src(kBatchBytes), dst(kBatchBytes * 16);
  src.FillRandom();
  std::memset(dst.host, 1, dst.size);
  BatchBuilder builder(Compression::kNone);
  builder.set_checksum(ChecksumArg(state.range(0)));
  pmlmig::proto::PageBatch batch;
  if (!builder.Build(src.slots, 0, kBatchPages, {1, 0, 0, 0}, &batch).ok()) std::abort();
  BatchApplier applier;
  applier.set_checksum(ChecksumArg(state.range(0)));
  uint64_t i = 0;
  for (auto _ : state) {
    // Same data to another place: re-target the run (checksum resealed off the clock).
    state.PauseTiming();
    batch.mutable_runs(0)->set_gpa((i++ % 16) * kBatchBytes);
    pmlmig::transport::PayloadHash h(ChecksumArg(state.range(0)));
    h.Update(batch.payload().data(), batch.payload().size());
    batch.set_checksum(pmlmig::transport::BatchChecksum(batch, h.Digest(), ChecksumArg(state.range(0))));
    state.ResumeTiming();
    if (!applier.Apply(batch, dst.slots).ok()) std::abort();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBatchBytes));
  state.SetLabel(state.range(0) == 0 ? "xxh64" : "xxh3");
}
BENCHMARK(BM_ApplyResident)->Arg(0)->Arg(1);

// Batches of random pages (XXH3) that together cover [0, bytes) once.
std::vector<pmlmig::proto::PageBatch> BatchesCovering(uint64_t bytes) {
  Memory src(kBatchBytes);
  src.FillRandom();
  BatchBuilder builder(Compression::kNone);
  builder.set_checksum(Checksum::kXxh3);
  std::vector<pmlmig::proto::PageBatch> batches(bytes / kBatchBytes);
  for (size_t b = 0; b < batches.size(); ++b) {
    if (!builder.Build(src.slots, 0, kBatchPages, {1, 0, 0, b}, &batches[b]).ok()) std::abort();
    batches[b].mutable_runs(0)->set_gpa(b * kBatchBytes);
    pmlmig::transport::PayloadHash h(Checksum::kXxh3);
    h.Update(batches[b].payload().data(), batches[b].payload().size());
    batches[b].set_checksum(pmlmig::transport::BatchChecksum(batches[b], h.Digest(), Checksum::kXxh3));
  }
  return batches;
}

// Apply 256 MiB into a fresh memfd, through the mapping (0) or the file (1).
void BM_ApplyFresh(benchmark::State& state) {
  constexpr uint64_t kBytes = 256ull << 20;
  const std::vector<pmlmig::proto::PageBatch> batches = BatchesCovering(kBytes);
  BatchApplier applier;
  applier.set_checksum(Checksum::kXxh3);
  for (auto _ : state) {
    state.PauseTiming();
    auto dst = std::make_unique<Memory>(kBytes);
    OneFile target(*dst);
    if (state.range(0) >= 3) (void)::madvise(dst->host, kBytes, MADV_POPULATE_WRITE);
    const pmlmig::transport::SlotFiles files =
        state.range(0) == 4 ? pmlmig::transport::SlotFiles() :
        state.range(0) >= 1 ? pmlmig::transport::SlotFiles::Of(target) : pmlmig::transport::SlotFiles();
    state.ResumeTiming();
    // 2: a second thread allocates the file's pages ahead (fallocate, 16 MiB at a time).
    std::atomic<uint64_t> applied{0};
    std::thread ahead;
    if (state.range(0) == 2) {
      ahead = std::thread([&] {
        for (uint64_t off = 0; off < kBytes; off += 16 << 20) {
          (void)::fallocate(dst->fd.get(), 0, static_cast<off_t>(off), 16 << 20);
        }
      });
    }
    for (const auto& b : batches) {
      if (!applier.Apply(b, dst->slots, nullptr, &files).ok()) std::abort();
      applied.fetch_add(kBatchBytes, std::memory_order_relaxed);
    }
    if (ahead.joinable()) ahead.join();
    state.PauseTiming();
    dst.reset();
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBytes));
  static const char* const kLabels[] = {"through the mapping", "through the file (pwritev)",
                                       "through the file, fallocated ahead by a second thread",
                                       "resident (populated first), through the file",
                                       "resident (populated first), through the mapping"};
  state.SetLabel(kLabels[state.range(0)]);
}
BENCHMARK(BM_ApplyFresh)->DenseRange(0, 4)->Unit(benchmark::kMillisecond)->Iterations(4)->UseRealTime();

// Two threads apply 256 MiB into one fresh memfd, each half the batches
// (as two streams do): through the mapping (0), through the file (1: the
// writes hold the file's inode lock, one at a time), or with the run made
// resident first by MADV_POPULATE_WRITE and then copied (2).
void BM_ApplyFreshTwoStreams(benchmark::State& state) {
  constexpr uint64_t kBytes = 256ull << 20;
  const std::vector<pmlmig::proto::PageBatch> batches = BatchesCovering(kBytes);
  for (auto _ : state) {
    state.PauseTiming();
    auto dst = std::make_unique<Memory>(kBytes);
    OneFile target(*dst);
    const pmlmig::transport::SlotFiles files =
        state.range(0) == 1 ? pmlmig::transport::SlotFiles::Of(target) : pmlmig::transport::SlotFiles();
    state.ResumeTiming();
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t) {
      threads.emplace_back([&, t] {
        BatchApplier applier;
        applier.set_checksum(Checksum::kXxh3);
        for (size_t b = static_cast<size_t>(t); b < batches.size(); b += 2) {
          if (state.range(0) == 2) (void)::madvise(dst->host + b * kBatchBytes, kBatchBytes, 23);
          if (!applier.Apply(batches[b], dst->slots, nullptr, &files).ok()) std::abort();
        }
      });
    }
    for (auto& th : threads) th.join();
    state.PauseTiming();
    dst.reset();
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kBytes));
  static const char* const kLabels[] = {"through the mapping", "through the file (pwritev)",
                                       "populated per run, then copied"};
  state.SetLabel(kLabels[state.range(0)]);
}
BENCHMARK(BM_ApplyFreshTwoStreams)->DenseRange(0, 2)->Unit(benchmark::kMillisecond)->Iterations(4)->UseRealTime();

}  // namespace
