// Workload specifications for the test guest, as users type them:
//   idle | seq[:fraction=F] | random | hotset:fraction=F,share=S
// each (but idle) with an optional rate=N; e.g. "random", "seq:rate=5000",
// "seq:fraction=0.01" (sweep only the first 1% of each vCPU's share, over and
// over), "hotset:fraction=0.05,share=0.9,rate=20000".
// rate is pages per second per vCPU (0 or absent: as fast as the guest runs).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"
#include "pmlmig/vmm/guest_abi.h"

namespace pmlmig::vmm {

struct WorkloadSpec {
  pmlmig_workload kind = PMLMIG_WORKLOAD_IDLE;
  // hotset: fraction of each vCPU's share that is hot; seq: fraction swept.
  // (0, 1]; default 0.1 for hotset, 1 for seq.
  double hot_fraction = 0.1;
  double hot_share = 0.9;     // hotset: share of writes that go to the hot pages, [0, 1]
  uint64_t rate = 0;          // pages per second per vCPU; 0 = unlimited

  std::string ToString() const;  // canonical form, parses back to the same spec
};

Result<WorkloadSpec> ParseWorkload(std::string_view text);

enum class FillMode { kRandom, kZero };
Result<FillMode> ParseFillMode(std::string_view text);
std::string_view FillModeName(FillMode mode);

}  // namespace pmlmig::vmm
