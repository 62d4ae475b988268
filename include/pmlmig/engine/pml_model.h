// A software CPU that logs guest writes exactly as PML hardware does, and a
// DirtyTracker built on it. Neither machine here has VMX or SVM (REFERENCE
// §1), so this model is how the engine's PML path (pml_log.h) is exercised
// end to end: tests use it for no-miss checks, benchmarks for per-write cost.
//
// What the model reproduces (pml_log.h describes the log format):
//   - One EPT/NPT-style dirty bit per guest page, sized from a SlotTable.
//     A write to a page whose dirty bit is set logs nothing: the CPU logs
//     only when it changes a dirty bit from 0 to 1.
//   - A write to a clean page with logging enabled: if the index says full,
//     a PML-full exit happens first (the handler drains and resets the
//     index), then the page-aligned GPA is stored at log[index], the index is
//     decremented with 16-bit wrap (0 becomes 0xFFFF, i.e. full), and the
//     dirty bit is set.
//   - With logging disabled, writes still set dirty bits (EPT A/D stays on),
//     as on hardware when the PML enable control is clear.
// What it leaves out: TLBs (clearing a dirty bit here takes effect at once;
// real hypervisors must flush), multiple vCPUs, huge pages.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/dirty_set.h"
#include "pmlmig/engine/pml_log.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/engine/tracker.h"

namespace pmlmig::engine {

// Thread-safety: one thread at a time, like one vCPU and the hypervisor code
// that runs on it between guest entries. Write() is "guest mode"; everything
// else is the owner's work and must not overlap a Write().
class PmlModel {
 public:
  // Called from Write() on a PML-full exit. It must drain log() (normally
  // with DrainPmlLog) and reset the index (ResetLog or set_index); if it
  // fails or leaves the log full, Write() returns an error without logging
  // or setting the dirty bit (the hardware would not resume the write).
  using FullExitHandler = std::function<Status(PmlModel&)>;

  PmlModel(const SlotTable& slots, PmlFormat format);
  PmlModel(const PmlModel&) = delete;
  PmlModel& operator=(const PmlModel&) = delete;

  void set_full_exit_handler(FullExitHandler handler) { on_full_ = std::move(handler); }
  // The PML enable control (VMX secondary control / SVM nested_ctl bit 11).
  void set_logging(bool on) { logging_ = on; }
  bool logging() const { return logging_; }

  // A guest write to any byte of the page holding `gpa`. Errors: `gpa` is
  // outside every slot (nothing is written), or the PML-full handler failed.
  Status Write(uint64_t gpa) {
    Region* r = Find(gpa);
    if (r == nullptr) [[unlikely]] return OutsideGuestMemory(gpa);
    const uint64_t page = (gpa - r->gpa) >> kPageShift;
    uint64_t& word = dirty_[r->first_word + (page >> 6)];
    const uint64_t bit = 1ull << (page & 63);
    if ((word & bit) != 0) return Status::Ok();  // already dirty: the CPU logs nothing
    if (logging_) {
      if (PmlLogFull(format_, index_)) [[unlikely]] {
        Status s = TakeFullExit();
        if (!s.ok()) return s;
      }
      log_->entries[index_] = gpa & ~(kPageSize - 1);
      index_ = static_cast<uint16_t>(index_ - 1);  // 0 wraps to 0xFFFF: full
      ++entries_logged_;
    }
    word |= bit;
    return Status::Ok();
  }

  // Owner operations (the vCPU is out of guest mode).
  // Empties the log: the index becomes PmlEmptyIndex(format).
  void ResetLog() { ResetPmlIndex(format_, index_); }
  // Clears every dirty bit (write-protects all of guest memory for logging).
  void ClearAllDirtyBits();
  // Clears the dirty bit of the page holding `gpa` (re-protects it), so the
  // next write to it is logged again. False if `gpa` is outside every slot.
  bool ClearDirtyBit(uint64_t gpa);
  bool DirtyBit(uint64_t gpa) const;
  uint64_t CountDirtyBits() const;

  PmlFormat format() const { return format_; }
  const PmlLogPage& log() const { return *log_; }
  uint16_t index() const { return index_; }
  void set_index(uint16_t index) { index_ = index; }  // like VMWRITE / a VMCB store
  uint64_t full_exits() const { return full_exits_; }
  uint64_t entries_logged() const { return entries_logged_; }
  uint64_t total_pages() const { return total_pages_; }

 private:
  struct Region {
    uint64_t gpa = 0;
    uint64_t pages = 0;
    uint64_t first_word = 0;  // index of this slot's first word in dirty_
  };

  // The region holding `gpa`, trying the last hit first; nullptr if none.
  Region* Find(uint64_t gpa) {
    Region& r = regions_[hint_];
    // Unsigned distance: below the base wraps high and fails the bound too.
    if (((gpa - r.gpa) >> kPageShift) < r.pages) [[likely]] return &r;
    return FindSlow(gpa);
  }
  Region* FindSlow(uint64_t gpa);
  const Region* FindConst(uint64_t gpa) const;
  Status TakeFullExit();
  Status OutsideGuestMemory(uint64_t gpa) const;

  PmlFormat format_;
  bool logging_ = false;
  uint16_t index_ = kPmlHeadIndex;
  std::vector<Region> regions_;  // sorted by gpa; never empty (a sentinel when there are no slots)
  size_t hint_ = 0;
  std::vector<uint64_t> dirty_;  // the dirty bits, one per guest page
  std::unique_ptr<PmlLogPage> log_;
  FullExitHandler on_full_;
  uint64_t full_exits_ = 0;
  uint64_t entries_logged_ = 0;
  uint64_t total_pages_ = 0;
};

// A DirtyTracker whose "hardware" is a PmlModel it owns, wired the way a
// hypervisor that owns PML buffers would do it:
//   PML-full exit  drains the full log into `pending_` and resets the index.
//   Enable()       clears every dirty bit, empties the log and `pending_`,
//                  enables logging.
//   Collect(out)   (the vCPU is out of guest mode, as after a kick) drains the
//                  partial log into `pending_` and resets the index, then for
//                  each page taken from `pending_`: marks it in `out` and
//                  clears its dirty bit. Every page with a set dirty bit was
//                  logged exactly once since its bit was last cleared, and
//                  every logged page is now in `pending_`, so this clears the
//                  dirty bits of exactly the pages reported: a later write to
//                  any of them is logged again, and no page stays dirty
//                  unreported (which would hide its next write). The bits are
//                  cleared before Collect returns, so the caller's reads of
//                  page contents come after re-protection (REFERENCE §2).
//                  A self-check counts dirty bits left set; any would mean a
//                  lost log entry, so Collect then reports every page and
//                  counts an overflow.
//   Disable()      disables logging and drops `pending_`.
//
// Stats: entries_harvested counts log entries drained (at full exits and at
// Collect); background_harvests counts PML-full exits drained between
// collections.
//
// Thread-safety: as DirtyTracker, and additionally Write() on model() must
// not overlap Enable/Collect/Disable (the model is one CPU).
class PmlModelTracker final : public DirtyTracker {
 public:
  PmlModelTracker(const SlotTable& slots, PmlFormat format);
  PmlModelTracker(const PmlModelTracker&) = delete;
  PmlModelTracker& operator=(const PmlModelTracker&) = delete;

  PmlModel& model() { return model_; }

  std::string_view name() const override { return "pml-model"; }
  Status Enable() override;
  Status Collect(DirtySet& out) override;
  Status Disable() override;
  TrackerStats stats() const override;

 private:
  Status OnFullExit(PmlModel& m);
  // Drains the current log into pending_ and resets the index.
  Status DrainIntoPending();

  PmlModel model_;
  DirtySet pending_;  // drained since the last Collect
  bool enabled_ = false;
  Status error_;      // first drain error since the last Collect

  // Statistics: written on the model's thread, read by stats() from any thread.
  TrackerCounters counters_;  // background_harvests: PML-full exits drained
};

}  // namespace pmlmig::engine
