// The host-side memory checker: proves that the test guest's memory holds
// exactly what the workload and the fill can explain. For every page of the
// workload area:
//   - either the whole page equals the seeded fill (never written), or
//   - it starts with a valid stamp (magic, a vCPU that owns this page, this
//     page's own GFN, 1 <= sequence <= that vCPU's pages_written counter, a
//     page that vCPU's own workload writes: not beyond a seq:fraction sweep,
//     none for idle) and the rest of the page still equals the fill, or
//   - it is a vCPU's write in progress: a stamp is two stores, and a pause
//     between them leaves a valid first word with the fill's second word; at
//     most one such page per vCPU.
// Run it with the vCPUs paused (or stopped). Used by tests now and by
// migration verification on the receiving host.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/vmm/boot.h"
#include "pmlmig/vmm/guest_memory.h"

namespace pmlmig::vmm {

struct CheckReport {
  uint64_t pages_checked = 0;
  uint64_t pages_stamped = 0;
  uint64_t pages_bad = 0;
  uint64_t pages_in_flight = 0;          // half-written stamps (counted in pages_stamped)
  std::vector<uint32_t> in_flight_vcpus; // whose
  uint64_t first_bad_gfn = 0;  // valid when pages_bad > 0
  std::string first_problem;   // "gfn 0x1234: stamp names gfn 0x1235", ...
  bool ok() const { return pages_bad == 0; }
  // Status::Ok() or DataLoss naming the first bad GFN and the count.
  Status ToStatus() const;
};

// `counters[i]` is vCPU i's pages_written (read from the statistics page by
// the caller, e.g. Machine::Stats()).
CheckReport CheckGuestMemory(const GuestMemory& memory, const TestGuestConfig& config,
                             const std::vector<uint64_t>& counters);

}  // namespace pmlmig::vmm
