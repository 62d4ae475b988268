#include "pmlmig/engine/snapshot_restore.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

namespace pmlmig::engine {
namespace {

double MsFrom(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// The pages of each region that hold data in the file (SEEK_DATA/SEEK_HOLE):
// what a lazy restore owes; the holes read zero.
Result<std::vector<PageRun>> DataRuns(const SnapshotReader& r) {
  std::vector<PageRun> runs;
  for (const SnapshotRegion& g : r.regions()) {
    const off_t begin = static_cast<off_t>(g.file_offset), end = begin + static_cast<off_t>(g.size);
    off_t pos = begin;
    while (pos < end) {
      const off_t data = ::lseek(r.fd(), pos, SEEK_DATA);
      if (data < 0 && errno == ENXIO) break;
      if (data < 0) return Status::FromErrno(errno, "lseek(SEEK_DATA) " + r.path());
      if (data >= end) break;
      off_t hole = ::lseek(r.fd(), data, SEEK_HOLE);
      if (hole < 0 || hole > end) hole = end;
      const off_t first = data & ~static_cast<off_t>(kPageSize - 1);
      const off_t last = (hole + static_cast<off_t>(kPageSize) - 1) & ~static_cast<off_t>(kPageSize - 1);
      runs.push_back({g.gpa + static_cast<uint64_t>(first - begin), static_cast<uint64_t>(last - first) >> kPageShift});
      pos = last;
    }
  }
  return runs;
}

// The memory of the VM the factory built must be the file's layout.
Status CheckLayout(const SnapshotReader& r, const VmControl& vm) {
  const auto slots = vm.memory_slots().slots();
  const auto regions = r.regions();
  bool same = slots.size() == regions.size();
  for (size_t i = 0; same && i < slots.size(); ++i) {
    same = slots[i].slot == regions[i].slot && slots[i].gpa == regions[i].gpa && slots[i].size == regions[i].size;
  }
  if (!same) {
    return InvalidArgument(r.path() + ": the VM built from the snapshot's description does not have its memory "
                           "layout (" + std::to_string(regions.size()) + " regions)");
  }
  if (vm.vcpu_count() != r.vcpus()) {
    return InvalidArgument(r.path() + ": the VM built has " + std::to_string(vm.vcpu_count()) + " vCPUs, the "
                           "snapshot " + std::to_string(r.vcpus()));
  }
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<SnapshotRestore>> SnapshotRestore::Start(const std::string& path, const Factory& factory,
                                                                RestoreOptions options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.threads == 0) options.threads = 1;
  PMLMIG_ASSIGN_OR_RETURN(SnapshotReader reader, SnapshotReader::Open(path));
  std::unique_ptr<SnapshotRestore> r(new SnapshotRestore(std::move(reader), options));
  r->start_ = start;
  r->stats_.lazy = options.lazy;
  r->stats_.guest_bytes = r->reader_.guest_bytes();
  r->stats_.open_ms = MsFrom(start);
  MigrationSetup setup;
  setup.vm_description = r->reader_.description();
  setup.vcpus = r->reader_.vcpus();
  for (const SnapshotRegion& g : r->reader_.regions()) setup.memory.push_back({g.slot, g.gpa, g.size});
  auto vm = factory(setup);
  if (!vm.ok()) return vm.status().WithContext(path);
  r->vm_ = std::move(*vm);
  PMLMIG_RETURN_IF_ERROR(CheckLayout(r->reader_, *r->vm_));
  r->stats_.build_ms = MsFrom(start) - r->stats_.open_ms;
  if (options.lazy) {
    PMLMIG_ASSIGN_OR_RETURN(std::vector<PageRun> owed, DataRuns(r->reader_));
    r->stats_.data_extents = owed.size();
    const auto t = std::chrono::steady_clock::now();
    PMLMIG_RETURN_IF_ERROR(r->StartLazy(std::move(owed)));
    r->stats_.load_ms = MsFrom(t);  // lazy: arming the faults
  } else {
    const auto t = std::chrono::steady_clock::now();
    PMLMIG_ASSIGN_OR_RETURN(SnapshotLoadStats loaded, r->reader_.LoadInto(r->vm_->memory_slots(), options.threads));
    r->stats_.load_ms = MsFrom(t);
    r->stats_.bytes_read = loaded.bytes_read;
    r->stats_.data_extents = loaded.data_extents;
    r->stats_.verified = true;
    r->stats_.verify_detail = "all " + std::to_string(r->reader_.chunk_digests().size()) +
                              " chunk digests match, checked before the VM ran";
  }
  PMLMIG_RETURN_IF_ERROR(r->vm_->LoadState(r->reader_.state()).WithContext(path + ": restore the state"));
  PMLMIG_RETURN_IF_ERROR(r->vm_->Resume().WithContext("resume"));
  r->stats_.running_ms = MsFrom(start);
  if (!options.lazy) {
    r->stats_.complete_ms = r->stats_.running_ms;
    r->complete_ = true;
  }
  return r;
}

Status SnapshotRestore::StartLazy(std::vector<PageRun> owed) {
  PMLMIG_RETURN_IF_ERROR(PostcopyMemory::Available().WithContext("lazy restore"));
  const SlotTable& memory = vm_->memory_slots();
  std::vector<std::optional<MemoryFile>> files;
  for (const MemorySlot& s : memory.slots()) {
    const std::optional<VmControl::Backing> b = vm_->slot_backing(s.slot);
    files.push_back(b ? std::optional<MemoryFile>(MemoryFile{b->fd, b->offset}) : std::nullopt);
  }
  digests_ = std::make_unique<PageDigestTable>(memory, PageDigestTable::Initial::kZero, ZeroPages::kNull);
  PMLMIG_ASSIGN_OR_RETURN(memory_, PostcopyMemory::Arm(memory, files, owed, digests_.get()));
  backlog_ = std::make_unique<PostcopyBacklog>(memory, owed);
  memory_->Start([this](uint64_t gpa) {  // on the fault thread: must not block
    {
      std::lock_guard lock(mu_);
      requests_.push_back(gpa);
    }
    cv_.notify_all();
  });
  workers_.emplace_back([this] { ServeFaults(); });
  for (unsigned i = 0; i < options_.threads; ++i) workers_.emplace_back([this] { Fill(); });
  return Status::Ok();
}

Status SnapshotRestore::PlaceFromFile(const PageRun& run, PageBuffer& buffer) {
  const size_t bytes = run.pages << kPageShift;
  if (buffer.bytes < bytes) {  // page-aligned: the reader may then bypass the page cache
    buffer.data.reset(static_cast<uint8_t*>(std::aligned_alloc(kPageSize, bytes)));
    if (!buffer.data) return ResourceExhausted("lazy restore: no memory for a read buffer");
    buffer.bytes = bytes;
  }
  PMLMIG_RETURN_IF_ERROR(reader_.ReadPages(run.gpa, run.pages, buffer.data.get()));
  return memory_->Place(run.gpa, run.pages, buffer.data.get()).status();
}

void SnapshotRestore::ServeFaults() {
  PageBuffer buffer;
  for (;;) {
    uint64_t gpa;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_.load() || !requests_.empty(); });
      if (stop_.load()) return;
      gpa = requests_.front();
      requests_.pop_front();
    }
    const uint64_t page = gpa & ~(kPageSize - 1);
    // Claimed here, or already by a filler that places it soon.
    if (!backlog_->Claim(page)) continue;
    if (Status s = PlaceFromFile({page, 1}, buffer); !s.ok()) {
      std::lock_guard lock(mu_);
      if (worker_error_.ok()) worker_error_ = s;
      return;
    }
  }
}

void SnapshotRestore::Fill() {
  PageBuffer buffer;
  PageRun run;
  constexpr uint64_t kFillPages = 64;  // 256 KiB: a vCPU's fault never waits behind much
  while (!stop_.load(std::memory_order_relaxed) && backlog_->Next(kFillPages, &run)) {
    if (Status s = PlaceFromFile(run, buffer); !s.ok()) {
      std::lock_guard lock(mu_);
      if (worker_error_.ok()) worker_error_ = s;
      return;
    }
  }
}

void SnapshotRestore::StopWorkers() {
  stop_.store(true);
  cv_.notify_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
}

Status SnapshotRestore::WaitComplete(std::chrono::milliseconds timeout) {
  if (complete_) return Status::Ok();
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (!memory_->WaitComplete(std::chrono::milliseconds(100))) {
    {
      std::lock_guard lock(mu_);
      if (!worker_error_.ok()) return worker_error_.WithContext("lazy restore");
    }
    if (std::chrono::steady_clock::now() >= until) return Unavailable("lazy restore: pages still missing");
  }
  stats_.complete_ms = MsFrom(start_);
  StopWorkers();
  const PostcopyStats pc = memory_->stats();
  stats_.faults = pc.faults;
  stats_.requested_pages = pc.requested_pages;
  stats_.background_pages = pc.background_pages;
  stats_.latency_p50_ms = pc.latency_p50_ms;
  stats_.latency_p99_ms = pc.latency_p99_ms;
  stats_.latency_max_ms = pc.latency_max_ms;
  stats_.bytes_read = (pc.requested_pages + pc.background_pages) << kPageShift;
  memory_.reset();  // every page is in: the VM runs on its own memory from here
  complete_ = true;
  const DigestMismatch m = CompareChunkDigests(digests_->layout(), digests_->Snapshot(), reader_.chunk_digests());
  if (!m.empty()) {
    stats_.verify_detail = "the memory read from the file does not match its digests: " + m.Describe();
    return DataLoss(reader_.path() + ": " + stats_.verify_detail + " (the guest has run on it)");
  }
  stats_.verified = true;
  stats_.verify_detail = "all " + std::to_string(reader_.chunk_digests().size()) +
                         " chunk digests match, checked once every page was in";
  return Status::Ok();
}

RestoreStats SnapshotRestore::stats() const { return stats_; }

uint64_t SnapshotRestore::remaining() const { return memory_ ? memory_->remaining() : 0; }

std::unique_ptr<VmControl> SnapshotRestore::TakeVm() { return complete_ ? std::move(vm_) : nullptr; }

void SnapshotRestore::Abandon() {
  if (memory_) memory_->Release();
  StopWorkers();
  if (vm_) (void)vm_->Pause();
}

SnapshotRestore::~SnapshotRestore() {
  if (memory_) memory_->Release();  // vCPUs waiting on a fault wake (and read zero) so the VM can stop
  StopWorkers();
  memory_.reset();
}

}  // namespace pmlmig::engine
