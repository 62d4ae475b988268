// PopulateAhead: the receiver's worker threads that make the target's fresh
// memory resident just ahead of where round 0's data is arriving, so the
// streams copy into pages that are already there instead of taking a page
// fault per page. First-touching memory is the first cost of a target on a
// host that backs its memory lazily (a nested VM: docs/BENCHMARKS.md, issue
// 11), and it is latency more than work, so several threads faulting at once
// (MADV_POPULATE_WRITE on 2 MiB chunks) get through it faster than the
// streams' own faults.
//
// Only memory that data is arriving for is populated: Ahead(gpa, bytes) says
// a batch with `bytes` of page contents ended at gpa, and the chunks from
// there to 4x that much further (at most `lookahead`, within gpa's slot) are
// queued, each chunk at most once: a stream of full batches keeps the
// populated memory well ahead of itself, a few pages of data (an untouched
// guest's page tables) populate one chunk. A guest whose memory is zero
// (whose batches carry only zero runs) is never populated; a sparse one
// wastes at most `lookahead` after each region of data.
//
// Thread-safety: Ahead from any thread (the streams'); Stop (and the
// destructor) from any thread but the workers, once: it returns when no
// worker is inside madvise any more, which must hold before the target's
// memory is registered for post-copy (a populate there would wait on
// userfaultfd for a page nobody supplies).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pmlmig/engine/slot_table.h"

namespace pmlmig::transport {

class PopulateAhead {
 public:
  static constexpr uint64_t kChunkBytes = 2 << 20;

  // `memory` must outlive the object (the session's target owns it).
  PopulateAhead(const engine::SlotTable& memory, uint32_t threads, uint64_t lookahead_bytes);
  ~PopulateAhead() { Stop(); }
  PopulateAhead(const PopulateAhead&) = delete;
  PopulateAhead& operator=(const PopulateAhead&) = delete;

  // `bytes` of page data arrived, ending at guest-physical `gpa` (exclusive).
  void Ahead(uint64_t gpa, uint64_t bytes);
  // Drops what is queued and joins the workers; Ahead does nothing after it.
  void Stop();

  uint64_t populated_bytes() const { return populated_.load(std::memory_order_relaxed); }

 private:
  struct Chunk {
    uint8_t* host;
    uint64_t len;
  };
  void Work();

  const engine::SlotTable& memory_;
  const uint64_t lookahead_;
  // One flag per 2 MiB chunk of each slot: queued once. first_chunk_[i] is
  // the index of slot i's first chunk.
  std::vector<size_t> first_chunk_;
  std::unique_ptr<std::atomic<bool>[]> claimed_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;  // guarded by mu_
  bool stop_ = false;        // guarded by mu_
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> populated_{0};
  std::mutex join_mu_;  // Stop from several threads: one joins, the others wait for it
  std::vector<std::thread> workers_;  // guarded by join_mu_ once started
};

}  // namespace pmlmig::transport
