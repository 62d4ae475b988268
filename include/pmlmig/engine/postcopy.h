// Post-copy: the VM runs on the target before all of its memory is there.
//
// At the switch the source pauses, sends the vCPU state and the list of
// pages the target does not hold yet (dirtied since they were sent, or never
// sent), and the target resumes at once. Then:
//   target  PostcopyMemory: the missing pages are holes registered with
//           userfaultfd (missing faults). A vCPU touching one blocks in the
//           kernel; the fault thread turns it into a page request. Pages
//           arriving (answers to requests, or the background push) are
//           placed with UFFDIO_COPY, which copies and maps a page in one
//           step and refuses (EEXIST) a page that is already there, so a
//           page is placed exactly once: a duplicate can never overwrite
//           what the guest wrote since.
//   source  PostcopyBacklog: the pages still to push, claimed by the
//           background sender from near the most recently requested
//           address, and by the request server for each request.
//
// Why missing faults and UFFDIO_COPY rather than minor faults and
// UFFDIO_CONTINUE (docs/ARCHITECTURE.md, "Post-copy", has the measurements,
// bench/uffd_bench.cc): with minor faults every page present in the memfd
// but not yet mapped in the guest's mapping faults to userspace on its
// first touch, i.e. nearly all of memory after pre-copy; missing faults
// come only for the holes, which are exactly the pages still owed.
//
// Thread-safety: PostcopyMemory::Place, remaining(), stats() and
// WaitComplete() from any thread; the requester runs on the fault thread.
// PostcopyBacklog is lock-free (one atomic word per 64 pages).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {

class PageDigestTable;

// What post-copy did, as the target measured it.
struct PostcopyStats {
  uint64_t needed_pages = 0;      // missing at the switch
  uint64_t faults = 0;            // distinct missing pages the guest touched (each one request)
  uint64_t requested_pages = 0;   // pages placed while a vCPU waited for them
  uint64_t background_pages = 0;  // pages placed before the guest touched them
  uint64_t duplicate_pages = 0;   // arrived after they were placed: dropped
  uint64_t zero_faults = 0;       // faults on never-written pages the source did not owe: zero-filled here
  double latency_p50_ms = 0;      // fault to page placed, over the requested pages
  double latency_p99_ms = 0;
  double latency_max_ms = 0;
  double duration_ms = 0;         // Start() to the last page placed
};

// The pages of a SlotTable numbered 0..total-1 in slot order (both sides
// keep one bit per page).
class PageIndex {
 public:
  explicit PageIndex(const SlotTable& memory);
  uint64_t total() const { return total_; }
  // The index of the page at `gpa`, or nullopt outside memory.
  std::optional<uint64_t> Of(uint64_t gpa) const;
  uint64_t GpaOf(uint64_t index) const;
  // The last index (exclusive) of the slot holding `index`.
  uint64_t SlotEnd(uint64_t index) const;

 private:
  struct Slot {
    uint64_t gpa, first, pages;
  };
  std::vector<Slot> slots_;
  uint64_t total_ = 0;
};

// One bit per page of a SlotTable, in PageIndex order: the target's pages
// already made missing before the switch (PostcopyMemory::Punch).
class PageBits {
 public:
  explicit PageBits(const SlotTable& memory) : index_(memory), words_((index_.total() + 63) / 64, 0) {}
  const PageIndex& index() const { return index_; }
  void Set(uint64_t index) { words_[index >> 6] |= uint64_t{1} << (index & 63); }
  bool Test(uint64_t index) const { return (words_[index >> 6] >> (index & 63)) & 1; }
  size_t words() const { return words_.size(); }
  uint64_t word(size_t w) const { return words_[w]; }

 private:
  PageIndex index_;
  std::vector<uint64_t> words_;
};

// A userfaultfd for missing faults on shared memory (UFFD_FEATURE_MISSING_SHMEM),
// non-blocking and close-on-exec; faults from the kernel too (KVM reading
// guest memory on a vCPU's behalf), which needs CAP_SYS_PTRACE where
// vm.unprivileged_userfaultfd is 0. Error kUnavailable, naming the reason.
Result<UniqueFd> OpenMissingFaultUffd();

// Target side.
class PostcopyMemory {
 public:
  // Called on the fault thread for each missing page the guest touched
  // (once per page); must not block.
  using Requester = std::function<void(uint64_t gpa)>;

  // Whether this host can serve post-copy into memory like `memory`
  // (userfaultfd with missing faults on shared memory).
  static Status Available();
  // Makes the pages of `needed` holes (punched out of their memfd, or
  // dropped from anonymous memory) and registers every slot of `memory`
  // for missing faults. `files[i]` is slot i's file (nullopt: anonymous).
  // With `digests` each placed page's value is set from the data placed.
  // Nothing is served until Start.
  // Pages in `punched` (Punch before the switch) are owed but not punched
  // again.
  static Result<std::unique_ptr<PostcopyMemory>> Arm(const SlotTable& memory,
                                                     const std::vector<std::optional<MemoryFile>>& files,
                                                     std::span<const PageRun> needed, PageDigestTable* digests,
                                                     const PageBits* punched = nullptr);
  // Before the switch, while the source still runs: makes the pages of
  // `runs` holes (as Arm does), skipping and recording them in `punched`.
  // Nothing may write them until Arm. One fallocate per run: the slow part
  // of arming when the owed pages are scattered (about 3.5 us a run here).
  static Status Punch(const SlotTable& memory, const std::vector<std::optional<MemoryFile>>& files,
                      std::span<const PageRun> runs, PageBits* punched);
  // Stops the fault thread and closes the userfaultfd: faults from then on
  // are served by the kernel (a hole reads as zero), so only destroy it
  // once every page is placed or when the VM is being discarded.
  ~PostcopyMemory();
  // What the destructor does, keeping the object (its counters) alive:
  // every waiting fault wakes and is served by the kernel from here on.
  // Place fails afterwards. Idempotent.
  void Release();

  // Starts the fault thread; the VM may run from here.
  void Start(Requester request);
  // Places `pages` pages from `gpa` (inside one slot): `data` (pages * 4096
  // bytes), or zero pages when null. Pages not owed any more are skipped.
  // Returns how many were placed now.
  Result<uint64_t> Place(uint64_t gpa, uint64_t pages, const uint8_t* data);
  uint64_t remaining() const { return remaining_.load(std::memory_order_acquire); }
  // Waits until every page is placed (true) or `timeout` passes.
  bool WaitComplete(std::chrono::milliseconds timeout);
  // The pages still missing, as runs (for a report, or a recovery).
  std::vector<PageRun> Missing() const;
  // The missing pages vCPUs are waiting for now (each requested once, and
  // to be requested again after a broken link), as gpas.
  std::vector<uint64_t> Waiting() const;
  PostcopyStats stats() const;

 private:
  PostcopyMemory(const SlotTable& memory, PageDigestTable* digests);
  void FaultLoop();
  void OnFault(uint64_t address);
  bool Owed(uint64_t index) const {
    return (owed_[index >> 6].load(std::memory_order_acquire) >> (index & 63)) & 1;
  }
  // One UFFDIO_COPY/ZEROPAGE of `pages` pages at index `first`; returns the
  // pages placed and sets *exists when the next one was already there.
  Result<uint64_t> PlaceRun(uint64_t first, uint64_t pages, const uint8_t* data, bool* exists);
  void Placed(uint64_t first, uint64_t pages, const uint8_t* data);

  SlotTable memory_;
  PageIndex index_;
  PageDigestTable* const digests_;
  UniqueFd uffd_;
  UniqueFd stop_;  // eventfd: the fault thread's stop
  std::unique_ptr<std::atomic<uint64_t>[]> owed_;  // bit per page: not placed yet
  std::atomic<uint64_t> remaining_{0};
  uint64_t needed_ = 0;
  std::thread faults_;
  Requester request_;
  std::chrono::steady_clock::time_point started_{};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, std::chrono::steady_clock::time_point> waiting_;  // guarded by mu_: index -> fault
  std::vector<double> latencies_ms_;   // guarded by mu_
  PostcopyStats counts_;               // guarded by mu_ (the counters)
  std::chrono::steady_clock::time_point last_placed_{};  // guarded by mu_
};

// Source side: the pages the target still lacks.
class PostcopyBacklog {
 public:
  PostcopyBacklog(const SlotTable& memory, std::span<const PageRun> owed);
  // The next run of at most max_pages owed pages (inside one slot), claimed
  // from the hint onwards (wrapping around); false when none is left.
  bool Next(uint64_t max_pages, PageRun* out);
  // Claims the page at `gpa` for a request (false if it was claimed
  // already) and moves the hint just past it: the background push goes on
  // near what the guest touches.
  bool Claim(uint64_t gpa);
  // Exactly `owed` owed again (after a broken connection: the target says
  // what it still lacks). total_pages() stays the count at the switch.
  void Reset(std::span<const PageRun> owed);
  uint64_t total_pages() const { return total_; }
  uint64_t left() const { return left_.load(std::memory_order_relaxed); }
  // Claim() calls so far: the requests answered.
  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }

  // Pages Next() handed out so far: the background push.
  uint64_t pushed() const { return pushed_.load(std::memory_order_relaxed); }

  // What the sink learns of the post-copy in progress, for progress
  // reports (set by the sink, read by any thread): the link is down between
  // a break and a resume, recoveries() counts the resumes; the target's
  // request latency so far (ms; 0 until it reports one).
  void SetLinkDown(bool down);
  bool link_down() const { return link_down_.load(std::memory_order_relaxed); }
  uint32_t recoveries() const { return recoveries_.load(std::memory_order_relaxed); }
  void SetTargetLatency(double p50_ms, double p99_ms) {
    latency_p50_ms_.store(p50_ms, std::memory_order_relaxed);
    latency_p99_ms_.store(p99_ms, std::memory_order_relaxed);
  }
  double latency_p50_ms() const { return latency_p50_ms_.load(std::memory_order_relaxed); }
  double latency_p99_ms() const { return latency_p99_ms_.load(std::memory_order_relaxed); }

 private:
  PageIndex index_;
  uint64_t words_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> bits_;
  std::atomic<uint64_t> hint_{0};  // page index
  std::atomic<uint64_t> left_{0};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> pushed_{0};
  std::atomic<bool> link_down_{false};
  std::atomic<uint32_t> recoveries_{0};
  std::atomic<double> latency_p50_ms_{0};
  std::atomic<double> latency_p99_ms_{0};
  uint64_t total_ = 0;
};

}  // namespace pmlmig::engine
