// Boot of the test guest: where things live in guest-physical memory (see
// guest_abi.h), the host-side fill, the page tables, the boot parameters and
// the long-mode entry registers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/vmm/guest_abi.h"
#include "pmlmig/vmm/guest_memory.h"
#include "pmlmig/vmm/vcpu.h"
#include "pmlmig/vmm/workload.h"

namespace pmlmig::vmm {

// What the test VM is: everything a receiver needs to rebuild it.
struct TestGuestConfig {
  uint64_t memory_bytes = 0;
  uint32_t vcpus = 1;
  WorkloadSpec workload;  // every vCPU's, unless vcpu_workloads names it (default: idle)
  // Per-vCPU overrides (--vcpu-workload N=SPEC): only the vCPUs that differ
  // from `workload`. Every key must be below `vcpus` (PrepareTestGuest and
  // the description decoder refuse others). Default: none.
  VcpuWorkloads vcpu_workloads;
  FillMode fill = FillMode::kRandom;
  uint64_t seed = 0x706d6c6d6967ull;  // fill and workload seed

  // vCPU `vcpu`'s workload: its override, else the default.
  const WorkloadSpec& WorkloadOf(uint32_t vcpu) const;
};

struct VcpuShare {
  uint64_t first_page = 0;  // index into the workload area
  uint64_t pages = 0;
};

// The workload area and each vCPU's share of it, derived from the memory size
// and the vCPU count alone (so a checker on another host recomputes it).
struct GuestLayout {
  uint64_t workload_start = 0;  // gpa
  uint32_t page_directories = 0;
  std::vector<pmlmig_range> ranges;
  uint64_t total_pages = 0;
  std::vector<VcpuShare> shares;

  // gpa of workload page `index` (< total_pages).
  uint64_t PageGpa(uint64_t index) const;
};

Result<GuestLayout> ComputeGuestLayout(const GuestMemory& memory, uint32_t vcpus);

// How many pages of a share of `share_pages` the workload `spec` writes into:
// the first ones for seq:fraction, none for idle, else all of them.
uint64_t PagesWrittenInto(const WorkloadSpec& spec, uint64_t share_pages);

// Writes the fill into the workload area (in parallel), then the page tables,
// GDT, boot parameters and the guest image. Memory must be fresh (all zero).
Status PrepareTestGuest(const GuestMemory& memory, const TestGuestConfig& config);

// Long-mode entry state for vCPU `id`: registers as documented in guest_abi.h.
Status SetBootRegisters(const Vcpu& vcpu);

// The embedded flat guest image.
std::span<const uint8_t> GuestImage();

}  // namespace pmlmig::vmm
