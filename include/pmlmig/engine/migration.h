// Live migration, as the engine sees it: the types and the two interfaces
// between the engine's migration logic and a transport.
//
//   source: engine::MigrationSource (rounds, convergence, stop-and-copy)
//             --> MigrationSink (transport/: gRPC client, N streams)
//   target: transport/ gRPC server (protocol state machine, batch checks)
//             --> MigrationTarget (engine: builds the VM, applies state,
//                 verifies, resumes)
//
// No protobuf type appears here; transport/ translates.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

class PageDigestTable;
class PostcopyBacklog;
class PostcopyMemory;

// How a migration ended. The string forms (OutcomeName) are for the edges:
// JSON, logs, the control API's wire.
enum class Outcome : uint8_t {
  kNone,       // not ended (or never started)
  kCompleted,  // the VM runs on the target
  kFailed,     // an error; the source VM runs on
  kCancelled,  // on request, a timeout or the switch-over policy; the source VM runs on
  kInDoubt,    // the source cannot learn whether the target runs the VM: it stays paused
  // Post-copy broke after the switch: the VM ran on the target, which could
  // not get every page and discards it. The source's paused copy is the
  // VM as of the switch (resuming it rolls the guest back to that moment);
  // it stays paused for the caller to decide.
  kPostcopyFailed,
};
// "none", "completed", "failed", "cancelled", "in-doubt", "postcopy-failed".
std::string_view OutcomeName(Outcome outcome);

// When a verifying migration compares the two sides' memory digests
// (memory_digest.h, source_digest.h).
//   kBeforeCommit  strict: the target compares at Final, before the VM runs;
//                  a mismatch fails the migration and the VM runs on here.
//   kAfterCommit   the target runs the VM at once and returns its digests;
//                  the source (its copy frozen) finishes its own digest and
//                  compares afterwards. A mismatch is reported with the
//                  ranges; the source keeps its paused copy for the caller.
enum class VerifyOrder : uint8_t { kBeforeCommit, kAfterCommit };
// "before-commit", "after-commit".
std::string_view VerifyOrderName(VerifyOrder order);

// A guest-physical range of guest RAM as both sides agree on it.
struct MemoryRange {
  uint32_t slot = 0;
  uint64_t gpa = 0;
  uint64_t size = 0;
};

// Guest memory behind a memslot as a range of a file (a memfd).
struct MemoryFile {
  int fd = -1;
  uint64_t offset = 0;  // of the slot's first byte in the file
};

// What the source says first. `vm_description` is opaque to the engine and
// the transport: the VMM on each side encodes and decodes it (for the test
// VM: the memory size, vCPUs, workload, fill).
struct MigrationSetup {
  std::string vm_description;
  std::vector<MemoryRange> memory;
  uint32_t vcpus = 0;
  bool verify = false;  // the two sides will compare memory digests (see VerifyOrder)
  VerifyOrder verify_order = VerifyOrder::kAfterCommit;
  // A same-host handover (MigrationSink::shares_memory): the file behind
  // each range of `memory`, in the same order. The target builds its VM
  // over these very pages (no page is sent) and must not write them before
  // Commit: until then the source may resume on them. Empty: the target's
  // memory is its own and the pages follow. The fds belong to whoever
  // received them (the transport); a target keeps its own references
  // (mmap, dup).
  std::vector<MemoryFile> shared_memory;
};

// A run of consecutive guest pages to send.
struct PageRun {
  uint64_t gpa = 0;
  uint64_t pages = 0;
};

// The pages of one round, shared by the sending streams: each stream takes
// the next chunk (at most `max_pages`, never across runs) until none is
// left. Thread-safe and lock-free: a chunk is claimed with one
// compare-and-swap on the index of the next page to hand out.
class PageList {
 public:
  explicit PageList(std::vector<PageRun> runs);
  // Next chunk of at most max_pages consecutive pages; false when empty.
  bool Next(uint64_t max_pages, PageRun* out);
  uint64_t total_pages() const { return total_pages_; }
  // Pages handed out so far (any thread; a relaxed count for progress).
  uint64_t taken() const { return std::min(next_.load(std::memory_order_relaxed), total_pages_); }

 private:
  std::vector<PageRun> runs_;     // immutable after construction
  std::vector<uint64_t> starts_;  // starts_[i]: index of runs_[i]'s first page among all pages
  uint64_t total_pages_ = 0;
  std::atomic<uint64_t> next_{0};  // index of the next page to hand out
};

// What the transport moved in one round (or in total).
struct TransferStats {
  uint64_t pages = 0;         // normal + zero
  uint64_t normal_pages = 0;  // sent with contents
  uint64_t zero_pages = 0;    // sent as a header only
  uint64_t payload_bytes = 0; // page bytes before compression
  uint64_t wire_bytes = 0;    // bytes of batch messages sent (after compression)
  uint64_t batches = 0;

  TransferStats& operator+=(const TransferStats& o) {
    pages += o.pages;
    normal_pages += o.normal_pages;
    zero_pages += o.zero_pages;
    payload_bytes += o.payload_bytes;
    wire_bytes += o.wire_bytes;
    batches += o.batches;
    return *this;
  }
};

// The end of a migration: the source's state blob and, verifying before
// Commit, its digests of guest memory at the pause point.
struct FinalState {
  std::vector<uint8_t> vm_state;  // VmControl::SaveState()
  bool has_digest = false;
  uint64_t memory_digest = 0;     // MemoryDigest() of the source at the pause point (= sum of chunk_digests)
  std::vector<uint64_t> chunk_digests;  // per ChunkLayout chunk; empty: only memory_digest (an older source)
  uint64_t chunk_bytes = 0;       // the layout's chunk size
  double source_paused_ms = 0;    // how long the source's vCPUs had been paused when it sent this
  // Post-copy: the target resumes without these pages (not yet sent, or
  // dirtied since they were) and they follow (MigrationSink::Postcopy).
  bool postcopy = false;
  std::vector<PageRun> postcopy_pages;
};

// What post-copy moved and measured: the target's figures (postcopy.h's
// PostcopyStats), the source's side, and verifying, the target's digests of
// the pages as they arrived.
struct PostcopyResult {
  uint64_t needed_pages = 0;
  uint64_t faults = 0;
  uint64_t requested_pages = 0;
  uint64_t background_pages = 0;
  uint64_t duplicate_pages = 0;
  uint64_t zero_faults = 0;
  double latency_p50_ms = 0;
  double latency_p99_ms = 0;
  double latency_max_ms = 0;
  double duration_ms = 0;          // target: resume to the last page placed
  uint64_t requests_served = 0;    // source: requests answered
  TransferStats pushed;            // source: the background push
  TransferStats answered;          // source: the answers to requests
  uint32_t recoveries = 0;         // source: broken links resumed (proto PostcopyResume)
  double link_down_ms = 0;         // source: time from each break to its resume, summed
  // Every page reached the target, but its PostcopyDone was lost with a
  // link (the figures above from the target, and its digests, are missing).
  bool done_lost = false;
  std::vector<uint64_t> chunk_digests;
  uint64_t chunk_bytes = 0;
};

// The target's answer to FinalState: the VM is restored (and verified) but
// does not run until Commit.
struct FinalReply {
  bool prepared = false;
  bool verified = false;          // the target compared digests (and ran its check), all matched
  std::string verify_detail;      // what was checked
  // Verifying: the target's chunk digests of what it holds at Final (the
  // source compares them too; after Commit it is the only comparison).
  std::vector<uint64_t> chunk_digests;
  uint64_t chunk_bytes = 0;
  double target_restore_ms = 0;   // from FinalState received to the VM ready to run
  double target_resume_ms = 0;    // from Commit received to vCPUs running (set once committed)
  double source_paused_ms = 0;    // FinalState::source_paused_ms, echoed
};

// How a switch-over ended, as the source knows it.
enum class CommitState {
  kCommitted,     // the VM runs on the target: the source must not resume it
  kNotCommitted,  // certain: the target does not run the VM and never will
  kInDoubt,       // the source cannot learn which: it must not resume either
};

struct CommitResult {
  CommitState state = CommitState::kInDoubt;
  Status detail;                 // why not committed or in doubt; OK when committed
  double target_resume_ms = 0;   // committed: from Commit received to vCPUs running
  bool resolved = false;         // the answer came from a Resolve after the reply was lost
};

// Source side: implemented by the transport. One controlling thread calls
// these in order: Begin, SendPages (per round), Finish; Abort at any time
// from any thread (it unblocks the others).
class MigrationSink {
 public:
  virtual ~MigrationSink() = default;
  // Hello and setup; returns when the target has built the VM.
  virtual Status Begin(const MigrationSetup& setup, const SlotTable& source_memory) = 0;
  // Sends every page of `pages` (read from source memory at send time) over
  // the streams; returns when the target has applied them all.
  virtual Result<TransferStats> SendPages(uint32_t round, PageList& pages) = 0;
  // Sends the final state; returns the target's reply once it has restored
  // (and verified) the VM, which does not run yet. Any error: the target
  // will not run the VM (the source may resume its own).
  virtual Result<FinalReply> Finish(const FinalState& state) = 0;
  // After a successful Finish: tells the target to run the VM. Never fails
  // silently: if the answer is lost it finds out (or reports kInDoubt).
  virtual CommitResult Commit() = 0;
  // Tells the target to discard everything (best effort) and fails any call
  // in progress. Not after Commit.
  virtual void Abort(const std::string& why) = 0;
  // Everything sent so far, including the part of a round that failed.
  virtual TransferStats totals() const { return {}; }
  // After Begin: whether the target can take a post-copy switch.
  virtual bool can_postcopy() const { return false; }
  // A same-host handover: the target maps the source's own guest memory
  // (Begin's setup carries MigrationSetup::shared_memory), so no page is
  // sent; the source pauses, Finish carries the state, and after Commit the
  // source never touches the memory again.
  virtual bool shares_memory() const { return false; }
  // The target is a copy, not a new home (a snapshot file): after Commit
  // the VM resumes here and the migration still completes.
  virtual bool keeps_source() const { return false; }
  // Post-copy, before the switch (the VM still runs here; no page is sent
  // between this and Finish): the pages of `stale` will be owed, and the
  // target may make them missing now, the slow part of arming post-copy,
  // outside the downtime. Finish's postcopy_pages include them. Default:
  // nothing (the target does it all at Finish).
  virtual Status PreparePostcopy(std::span<const PageRun> stale) {
    (void)stale;
    return Status::Ok();
  }
  // Post-copy, after a committed Finish of a FinalState with postcopy set:
  // answers the target's page requests and pushes the rest of `backlog`
  // (read from source memory, which must stay paused and mapped) until the
  // target says it holds every page. An error: the target may have run
  // the VM and cannot finish it; the source's paused copy is the only
  // complete one as of the switch.
  virtual Result<PostcopyResult> Postcopy(PostcopyBacklog& backlog) {
    (void)backlog;
    return Unavailable("this transport has no post-copy");
  }
};

// Target side: implemented by the engine, called by the transport's server
// after its own checks (order, version, checksums, sizes).
class MigrationTarget {
 public:
  virtual ~MigrationTarget() = default;
  // Builds the VM (its memory zeroed) from the setup. Error: refuse.
  virtual Status OnSetup(const MigrationSetup& setup) = 0;
  // Guest memory of the VM built by OnSetup: the transport writes pages
  // straight into it after checking each against these slots.
  virtual const SlotTable& memory() const = 0;
  // Verifying: the digest table the transport updates after writing pages
  // into memory() (Update for data, SetZero for zero pages); else nullptr.
  virtual PageDigestTable* digests() { return nullptr; }
  // The file behind slot `slot` of memory(), when there is one (a memfd):
  // the transport then writes pages with pwrite(2) instead of through the
  // mapping, so fresh memory takes no page-table fault per page (about
  // twice as fast on this kind of host; see docs/BENCHMARKS.md). The fd
  // stays open as long as memory(). nullopt: write through the mapping.
  virtual std::optional<MemoryFile> memory_file(uint32_t slot) const {
    (void)slot;
    return std::nullopt;
  }
  // Restores state and verifies if asked; the VM does not run yet.
  virtual Result<FinalReply> OnFinal(const FinalState& state) = 0;
  // After OnFinal: resumes the vCPUs. Returns the milliseconds it took.
  virtual Result<double> OnCommit() = 0;
  // The source went away or aborted before Commit: discard the VM.
  virtual void OnAbort(const std::string& why) = 0;
  // After OnCommit succeeded: the running VM, handed to whoever received it
  // (once; nullptr afterwards or if it never resumed).
  virtual std::unique_ptr<VmControl> TakeVm() = 0;
  // Post-copy, before the switch (MigrationSink::PreparePostcopy): the
  // pages of `stale` will be owed; a target may make them missing now and
  // skip them in ArmPostcopy. No page is written into memory() between the
  // two. Default: nothing.
  virtual Status PreparePostcopy(std::span<const PageRun> stale) {
    (void)stale;
    return Status::Ok();
  }
  // Post-copy (before OnFinal of a post-copy FinalState): makes `owed`
  // missing in memory() and returns what serves the faults (owned by the
  // target; the transport starts it before OnCommit and places the pages
  // that arrive). Error: this target cannot (the default).
  virtual Result<PostcopyMemory*> ArmPostcopy(std::span<const PageRun> owed) {
    (void)owed;
    return Unavailable("this target has no post-copy");
  }
  // Every owed page is placed: userfaultfd is released and the VM runs on
  // its own memory. (OnAbort while post-copy is armed discards the VM even
  // though it ran: it cannot go on without the pages.)
  virtual void EndPostcopy() {}
  // The guest's progress while post-copy ran, sampled (empty when the
  // target does not sample): for reports and plots.
  struct ProgressSample {
    double ms = 0;             // since the VM resumed
    uint64_t pages_written = 0;  // the VMM's own counter of the guest's work
    uint64_t pages_missing = 0;  // owed pages not yet placed
  };
  virtual std::vector<ProgressSample> postcopy_progress() const { return {}; }
};

// 64-bit digest of all guest memory in `slots` (page by page, in parallel;
// the same on both sides for the same contents): the sum of the chunk
// digests of memory_digest.h.
uint64_t MemoryDigest(const SlotTable& slots);

}  // namespace pmlmig::engine
