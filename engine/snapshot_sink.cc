#include "pmlmig/engine/snapshot_sink.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace pmlmig::engine {
namespace {

alignas(64) const uint8_t kZeroPage[kPageSize] = {};

bool IsZero(const uint8_t* page) { return std::memcmp(page, kZeroPage, kPageSize) == 0; }

}  // namespace

Result<std::unique_ptr<SnapshotSink>> SnapshotSink::Create(SnapshotSinkOptions options) {
  if (options.path.empty()) return InvalidArgument("snapshot: no file name");
  if (options.threads == 0 || options.threads > 16) return InvalidArgument("snapshot: 1..16 writer threads");
  return std::unique_ptr<SnapshotSink>(new SnapshotSink(std::move(options)));
}

Status SnapshotSink::Begin(const MigrationSetup& setup, const SlotTable& source_memory) {
  std::vector<SnapshotRegion> regions;
  for (const MemoryRange& r : setup.memory) regions.push_back({r.slot, r.gpa, r.size, 0});
  PMLMIG_ASSIGN_OR_RETURN(SnapshotWriter w,
                          SnapshotWriter::Create(options_.path, regions, setup.vcpus, setup.vm_description));
  std::lock_guard lock(mu_);
  if (aborted_.load()) return Aborted("snapshot: " + abort_why_);
  writer_.emplace(std::move(w));
  source_ = &source_memory;
  return Status::Ok();
}

Status SnapshotSink::WriteRun(uint32_t round, const PageRun& run, TransferStats* sent) {
  const uint8_t* host = source_->HostAddress(run.gpa, run.pages << kPageShift);
  if (host == nullptr) return Internal("snapshot: a run outside guest memory");
  // Consecutive pages of one kind go out in one call.
  uint64_t p = 0;
  while (p < run.pages) {
    const bool zero = IsZero(host + (p << kPageShift));
    uint64_t n = 1;
    while (p + n < run.pages && IsZero(host + ((p + n) << kPageShift)) == zero) ++n;
    const uint64_t gpa = run.gpa + (p << kPageShift);
    if (!zero) {
      PMLMIG_RETURN_IF_ERROR(writer_->WritePages(gpa, n, host + (p << kPageShift)));
      sent->normal_pages += n;
      sent->wire_bytes += n << kPageShift;
    } else {
      if (round > 0) PMLMIG_RETURN_IF_ERROR(writer_->WriteZeroPages(gpa, n));  // round 0: a hole already
      sent->zero_pages += n;
    }
    sent->pages += n;
    sent->payload_bytes += n << kPageShift;
    p += n;
  }
  return Status::Ok();
}

Result<TransferStats> SnapshotSink::SendPages(uint32_t round, PageList& pages) {
  {
    std::lock_guard lock(mu_);
    if (aborted_.load()) return Aborted("snapshot: " + abort_why_);
    if (!writer_) return Internal("snapshot: pages before Begin");
    sending_ = true;
  }
  constexpr uint64_t kChunkPages = 512;  // 2 MiB a write (a digest chunk: the writer cuts there anyway)
  const unsigned workers =
      static_cast<unsigned>(std::clamp<uint64_t>((pages.total_pages() + kChunkPages - 1) / kChunkPages, 1, options_.threads));
  std::vector<TransferStats> sent(workers);
  std::vector<Status> errors(workers);
  auto work = [&](unsigned w) {
    PageRun run;
    while (!aborted_.load(std::memory_order_relaxed) && pages.Next(kChunkPages, &run)) {
      if (Status s = WriteRun(round, run, &sent[w]); !s.ok()) {
        errors[w] = s;
        aborted_.store(true);  // the others stop too; this round failed
        return;
      }
      ++sent[w].batches;
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (std::thread& t : pool) t.join();
  TransferStats round_total;
  for (const TransferStats& t : sent) round_total += t;
  std::lock_guard lock(mu_);
  sending_ = false;
  totals_ += round_total;
  for (const Status& s : errors) {
    if (!s.ok()) {
      if (abort_why_.empty()) abort_why_ = s.message();
      AbandonLocked();
      return s;
    }
  }
  if (aborted_.load()) {
    AbandonLocked();
    return Aborted("snapshot: " + abort_why_);
  }
  return round_total;
}

Result<FinalReply> SnapshotSink::Finish(const FinalState& state) {
  {
    std::lock_guard lock(mu_);
    if (aborted_.load()) return Aborted("snapshot: " + abort_why_);
    if (!writer_) return Internal("snapshot: final state before Begin");
    if (state.postcopy) return InvalidArgument("a snapshot has no post-copy");
    sending_ = true;  // an Abort meanwhile waits for the end of Finish
  }
  const auto start = std::chrono::steady_clock::now();
  // The file is complete (and in place) once this returns.
  Status finished = writer_->Finish(state.vm_state);
  {
    std::lock_guard lock(mu_);
    sending_ = false;
    if (!finished.ok() || aborted_.load()) {
      AbandonLocked();
      return finished.ok() ? Aborted("snapshot: " + abort_why_) : finished;
    }
  }
  FinalReply reply;
  reply.prepared = true;
  reply.verify_detail = "the file carries its own chunk digests, checked when it is restored";
  reply.target_restore_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  reply.source_paused_ms = state.source_paused_ms;
  return reply;
}

CommitResult SnapshotSink::Commit() {
  std::lock_guard lock(mu_);
  committed_ = true;
  CommitResult r;
  r.state = CommitState::kCommitted;  // the snapshot is written; the VM resumes here
  return r;
}

void SnapshotSink::AbandonLocked() {
  if (writer_ && !committed_) writer_->Abandon();
}

void SnapshotSink::Abort(const std::string& why) {
  std::lock_guard lock(mu_);
  if (abort_why_.empty()) abort_why_ = why;
  aborted_.store(true);
  if (!sending_) AbandonLocked();
}

TransferStats SnapshotSink::totals() const {
  std::lock_guard lock(mu_);
  return totals_;
}

uint64_t SnapshotSink::file_allocated_bytes() const {
  struct stat st{};
  if (::stat(options_.path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace pmlmig::engine
