// Workload specifications for the test guest, as users type them:
//   idle | seq[:fraction=F] | random | hotset:fraction=F,share=S
// each (but idle) with an optional rate=N; e.g. "random", "seq:rate=5000",
// "seq:fraction=0.01" (sweep only the first 1% of each vCPU's share, over and
// over), "hotset:fraction=0.05,share=0.9,rate=20000".
// rate is pages per second per vCPU (0 or absent: as fast as the guest runs).
// One spec is every vCPU's default; "N=SPEC" overrides (--vcpu-workload)
// give single vCPUs their own, e.g. "2=random:rate=1000".
#pragma once

#include <cstdint>
#include <map>
#include <span>
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

// One override, "N=SPEC": vCPU N runs SPEC instead of the VM's default.
struct VcpuWorkload {
  uint32_t vcpu = 0;
  WorkloadSpec spec;
};
// Refuses a missing '=', an N that is not a decimal number and a bad SPEC
// (with ParseWorkload's reason). Does not know the vCPU count.
Result<VcpuWorkload> ParseVcpuWorkload(std::string_view text);

// The overrides of one VM by vCPU index; a vCPU not in it runs the default.
using VcpuWorkloads = std::map<uint32_t, WorkloadSpec>;

// Parses every "N=SPEC" for a VM of `vcpus` vCPUs; also refuses N >= vcpus
// and the same N twice. Errors quote the offending text.
Result<VcpuWorkloads> ParseVcpuWorkloads(std::span<const std::string> texts, uint32_t vcpus);

// For people: "random", or "hotset:fraction=0.0625,share=0.9 (vcpu 2:
// random:rate=1000)" when some vCPUs run their own.
std::string DescribeWorkloads(const WorkloadSpec& all, const VcpuWorkloads& overrides);

enum class FillMode { kRandom, kZero };
Result<FillMode> ParseFillMode(std::string_view text);
std::string_view FillModeName(FillMode mode);

}  // namespace pmlmig::vmm
