// VmMigrationTarget: the engine's side of receiving a VM. Builds it through
// a factory (the VMM decodes its own vm_description), checks that its memory
// layout is the one announced, restores the state, verifies (memory digest
// against the source's, then an optional VMM-level check), and resumes the
// vCPUs only at OnCommit. Anything that fails leaves the VM unstarted;
// OnAbort discards a VM that never ran.
//
// Thread-safety: the transport calls OnSetup, OnFinal, OnCommit and OnAbort
// from its control thread, in that order; memory() may be read by data streams after
// OnSetup returned. TakeVm() after the migration ended.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/postcopy.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

class VmMigrationTarget final : public MigrationTarget {
 public:
  using Factory = std::function<Result<std::unique_ptr<VmControl>>(const MigrationSetup&)>;
  // Runs after the digests matched, before resuming, when verifying before
  // Commit (it needs the vCPUs paused, so it adds to the downtime): e.g. the
  // test VM's memory checker. Returns a description of what it checked, or
  // an error.
  using Check = std::function<Result<std::string>(VmControl&)>;

  explicit VmMigrationTarget(Factory factory, Check check = nullptr)
      : factory_(std::move(factory)), check_(std::move(check)) {}
  ~VmMigrationTarget() override;

  Status OnSetup(const MigrationSetup& setup) override;
  const SlotTable& memory() const override;
  PageDigestTable* digests() override { return digests_.get(); }
  std::optional<MemoryFile> memory_file(uint32_t slot) const override;
  Result<FinalReply> OnFinal(const FinalState& state) override;
  Result<double> OnCommit() override;
  void OnAbort(const std::string& why) override;
  Status PreparePostcopy(std::span<const PageRun> stale) override;
  Result<PostcopyMemory*> ArmPostcopy(std::span<const PageRun> owed) override;
  void EndPostcopy() override;
  std::vector<ProgressSample> postcopy_progress() const override;
  // How much work the guest has done (e.g. pages its workload wrote): with
  // it, post-copy samples the guest's progress every 50 ms. Before OnSetup.
  void SetProgressCounter(std::function<uint64_t(VmControl&)> counter) { counter_ = std::move(counter); }

  // The resumed VM (nullptr unless OnCommit resumed it), and when.
  std::unique_ptr<VmControl> TakeVm() override;
  std::chrono::steady_clock::time_point resumed_at() const { return resumed_at_; }

 private:
  Status Verify(const FinalState& state, FinalReply* reply);
  static Status CheckSharedMemory(const MigrationSetup& setup, const VmControl& vm);
  std::vector<std::optional<MemoryFile>> MemoryFiles() const;

  Factory factory_;
  Check check_;
  MigrationSetup setup_;
  std::unique_ptr<VmControl> vm_;
  std::unique_ptr<PageDigestTable> digests_;  // verifying: what memory() holds
  // Post-copy, armed until every page arrived. After vm_: destroyed first,
  // so vCPUs waiting on a fault are woken before the VM goes.
  std::unique_ptr<PostcopyMemory> postcopy_;
  std::unique_ptr<PageBits> punched_;  // PreparePostcopy to ArmPostcopy
  std::function<uint64_t(VmControl&)> counter_;
  std::thread sampler_;                      // post-copy, from OnCommit to EndPostcopy/OnAbort
  std::atomic<bool> sampling_{false};
  mutable std::mutex samples_mu_;
  std::vector<ProgressSample> samples_;      // guarded by samples_mu_
  void StopSampling();
  SlotTable empty_;
  bool prepared_ = false;
  bool resumed_ = false;
  bool shared_ = false;  // a handover: the VM runs on the source's own memory files
  std::chrono::steady_clock::time_point resumed_at_{};
};

}  // namespace pmlmig::engine
