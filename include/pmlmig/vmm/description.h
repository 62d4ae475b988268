// The test VM's description: the opaque bytes a source sends in its migration
// Setup (engine::MigrationSetup::vm_description) so that the receiver builds
// the same VM, and the receiver's factory that builds it. The engine and the
// transport never look inside; this is the test VMM's own format.
//
// Format (version 1): a JSON object
//   {"format": "pmlmig-test-vm", "version": 1, "memory_bytes": N, "vcpus": N,
//    "workload": "<WorkloadSpec::ToString()>", "fill": "random"|"zero",
//    "seed": N, "irqchip": true|false}
// Version 2 (only for a VM with per-vCPU workloads, so that a VM without them
// still reaches receivers that read only version 1): the same fields plus
//    "vcpu_workloads": {"<vCPU index>": "<WorkloadSpec::ToString()>", ...}
// naming just the vCPUs that do not run "workload".
// Decoding reads versions 1 and 2 and rejects another format or version, a
// missing or mistyped field, "vcpu_workloads" in version 1, and values the
// test VM cannot run (memory layout, vCPU count, a workload, an override's
// index at or above vcpus or given twice), naming the field.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/vmm/kvm.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::vmm {

// Only `guest` and `irqchip` travel; the rest is the receiver's choice.
std::string EncodeTestVmDescription(const MachineOptions& options);
Result<MachineOptions> DecodeTestVmDescription(std::string_view bytes);

struct TestVmFactoryOptions {
  // Refuse a source that does not send a memory digest. Default off.
  bool require_verify = false;
  // Run the page checker on the restored VM before it resumes. Default on.
  bool check_memory = true;
  // Make the new VM's memory resident before the transfer (MADV_POPULATE_WRITE),
  // to measure a transfer without first-touch costs. Default off.
  bool prefault = false;
  // Called with each VM's options once it is built (e.g. to log it).
  std::function<void(const MachineOptions&)> on_build;
};

// Builds test VMs for a receiver (one migration at a time): the factory and
// check an engine::VmMigrationTarget takes. It remembers the last VM it
// built, so the receiving command reads that VM's counters without a cast.
//
// Thread-safety: MakeTarget and what it returns run on the transport's
// control thread; the accessors from any thread.
class TestVmFactory {
 public:
  TestVmFactory(const Kvm& kvm, TestVmFactoryOptions options) : kvm_(kvm), options_(std::move(options)) {}

  std::unique_ptr<engine::MigrationTarget> MakeTarget();
  // The VM a setup describes (memory zeroed, or the memory handed over), as
  // a target's factory builds it; also for a snapshot's restore.
  Result<std::unique_ptr<engine::VmControl>> BuildVm(const engine::MigrationSetup& setup);

  // The last VM built (owned by its target, then by whoever took it), its
  // options, and its vCPUs' counters when the checker ran (empty if none ran).
  Machine* last_built() const;
  MachineOptions last_options() const;
  std::vector<uint64_t> counters_at_check() const;

 private:
  Result<std::string> Check();

  const Kvm& kvm_;
  const TestVmFactoryOptions options_;
  mutable std::mutex mu_;
  Machine* last_ = nullptr;          // guarded by mu_
  MachineOptions last_options_;      // guarded by mu_
  std::vector<uint64_t> at_check_;   // guarded by mu_
};

// The pages each vCPU has written, in vCPU order.
std::vector<uint64_t> PagesWritten(const Machine& machine);

}  // namespace pmlmig::vmm
