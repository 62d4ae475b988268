// UffdFill: round 0's pages written into the target's fresh memory with
// UFFDIO_COPY, for a migration of several streams.
//
// UFFDIO_COPY allocates a missing page and copies into it in the kernel: no
// page fault per page, no zeroing pass before the copy, and no inode lock
// (pwritev holds the file's, so several writers of one memfd take turns).
// On a host that backs its memory lazily (a nested VM) first-touching the
// target's memory is a migration's first cost, and there a fresh 2 GiB memfd
// filled from 2 and 4 threads 1.3-1.6x faster this way than by copying
// through the mapping, at about 0.7x the CPU (docs/BENCHMARKS.md, issue 11).
// One stream keeps pwritev and populate-ahead (SlotFiles, PopulateAhead),
// which are as fast for a single writer.
//
// While it runs, the slots that have a memfd (tmpfs) are registered for
// missing faults. Place() fills pages that no one has written yet; a page
// that exists already is left to the caller to copy. Anything else touching
// a missing page meanwhile (a read of a hole, KVM) faults to the handler
// thread, which maps a zero page there, which is what a hole reads as, so
// the registration never changes what memory holds, only how fast it fills.
// Stop() unregisters the memory, making it ordinary again.
//
// Thread-safety: Place from any thread (the streams'); Stop from any thread,
// any number of times; it must come while the memory is still mapped, and
// before anything else registers it (post-copy) or vCPUs run on it. The
// userfaultfd is closed only by the destructor (which also unregisters
// whatever Stop did not), so a Place racing Stop finds the range no longer
// registered and returns, rather than using a closed, reused fd.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::transport {

class UffdFill {
 public:
  using SlotFile = std::pair<uint32_t, engine::MemoryFile>;  // slot id, its file
  // Registers each slot of `memory` whose file in `files` is on tmpfs (a
  // memfd; not hugetlbfs), and starts the handler. kUnavailable when
  // userfaultfd cannot be had here, or no slot could be registered (the
  // reason of the first refusal).
  static Result<std::shared_ptr<UffdFill>> Start(const engine::SlotTable& memory, std::span<const SlotFile> files);
  ~UffdFill();
  UffdFill(const UffdFill&) = delete;
  UffdFill& operator=(const UffdFill&) = delete;

  // Whether [host, host+len) lies in a registered slot and Stop has not come.
  bool Covers(const uint8_t* host, uint64_t len) const;
  // Places the `len` bytes (whole pages, page aligned, within one slot) at
  // `src` into memory at `dst`, where its pages are missing; a page already
  // there is copied through the mapping instead. Returns how many leading
  // bytes are in place: the caller copies the rest (after a Stop, or an
  // error other than EEXIST).
  uint64_t Place(uint8_t* dst, const uint8_t* src, uint64_t len);
  // Unregisters the memory (when it returns, no fault waits for the
  // handler, and Place does nothing) and tells the handler to end.
  void Stop();

  uint64_t placed_bytes() const { return placed_.load(std::memory_order_relaxed); }
  uint64_t zero_faults() const { return zero_faults_.load(std::memory_order_relaxed); }

 private:
  struct Range {
    uintptr_t start;
    uint64_t len;
  };
  UffdFill(UniqueFd uffd, UniqueFd wake, std::vector<Range> ranges);
  void Serve();  // the handler thread

  const UniqueFd uffd_;
  const UniqueFd wake_;  // eventfd: Stop wakes the handler through it
  const std::vector<Range> ranges_;
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> placed_{0};
  std::atomic<uint64_t> zero_faults_{0};
  std::mutex stop_mu_;        // Stop from several threads: one unregisters, the others wait for it
  bool unregistered_ = false;  // guarded by stop_mu_
  std::thread handler_;        // started by Start, joined by the destructor
};

}  // namespace pmlmig::transport
