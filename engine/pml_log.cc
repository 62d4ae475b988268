#include "pmlmig/engine/pml_log.h"

#include <cstdio>
#include <vector>

namespace pmlmig::engine {

std::string_view PmlFormatName(PmlFormat format) {
  switch (format) {
    case PmlFormat::kVmx:
      return "vmx";
    case PmlFormat::kSvm:
      return "svm";
  }
  return "unknown";
}

Result<uint32_t> DrainPmlLog(PmlFormat format, std::span<const uint64_t, kPmlLogEntries> log, uint16_t index,
                             DirtySet& out, PmlDrainStats* stats) {
  constexpr uint64_t kPageMask = ~(kPageSize - 1);
  const std::vector<DirtySet::Slot>& slots = out.slots();
  const size_t nslots = slots.size();
  const uint32_t first = PmlFirstValidEntry(format, index);

  uint32_t marked = 0;
  uint32_t outside = 0;
  uint64_t first_outside = 0;
  // Consecutive entries that fall in the same bitmap word (a guest dirtying
  // a run of pages) are merged and ORed in with one atomic operation: on the
  // 2-core dev machine about 2.5 ns per entry instead of 9 for such runs, and
  // no slower for scattered ones (bench/pml_bench.cc).
  size_t run_slot = 0;
  uint64_t run_word = 0;
  uint64_t run_bits = 0;
  // The slot that held the previous entry (slot 0 before the first); guests
  // dirty pages in runs, so it usually holds this one too.
  size_t hint = 0;
  // Entry 511 first: the order the CPU wrote them (int, so the loop can end
  // below 0 when `first` is 0).
  for (int i = static_cast<int>(kPmlHeadIndex); i >= static_cast<int>(first); --i) {
    const uint64_t gpa = log[static_cast<size_t>(i)] & kPageMask;
    // Unsigned distance: a gpa below the slot base wraps to a huge value and
    // fails the bound, so one compare covers both ends.
    size_t s = hint;
    if (s >= nslots || ((gpa - slots[s].gpa) >> kPageShift) >= slots[s].pages) [[unlikely]] {
      for (s = 0; s < nslots; ++s) {
        if (((gpa - slots[s].gpa) >> kPageShift) < slots[s].pages) break;
      }
      if (s == nslots) {
        if (outside++ == 0) first_outside = gpa;
        continue;
      }
      hint = s;
    }
    const uint64_t page = (gpa - slots[s].gpa) >> kPageShift;  // < slots[s].pages: checked just above
    if (run_bits != 0 && (s != run_slot || (page >> 6) != run_word)) {
      out.OrWord(run_slot, run_word, run_bits);
      run_bits = 0;
    }
    run_slot = s;
    run_word = page >> 6;
    run_bits |= 1ull << (page & 63);
    ++marked;
  }
  if (run_bits != 0) out.OrWord(run_slot, run_word, run_bits);

  const uint32_t valid = kPmlLogEntries - first;
  if (stats != nullptr) {
    stats->valid = valid;
    stats->marked = marked;
    stats->outside = outside;
    stats->first_outside_gpa = first_outside;
  }
  if (outside != 0) [[unlikely]] {
    char buf[224];
    std::snprintf(buf, sizeof buf,
                  "%.*s PML log (index 0x%x): entry for gpa 0x%llx lies outside guest memory; %u of %u valid "
                  "entries outside every memslot, the other %u marked dirty",
                  static_cast<int>(PmlFormatName(format).size()), PmlFormatName(format).data(),
                  static_cast<unsigned>(index), static_cast<unsigned long long>(first_outside), outside, valid,
                  marked);
    return InvalidArgument(buf);
  }
  return marked;
}

}  // namespace pmlmig::engine
