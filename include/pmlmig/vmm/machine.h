// Machine: a running test VM. Owns the Vm, the guest memory, the vCPUs and
// one thread per vCPU, and drives each vCPU through an explicit state machine:
//
//   kCreated --Start--> kRunning <--Pause/Resume--> kPaused
//       \                  |                          |
//        +-----------------+---- Stop / guest error --+--> kStopped
//
// Pause() returns only when every vCPU is out of KVM_RUN and parked (which is
// also what flushes PML buffers into dirty rings), so state can be saved and
// dirty logs collected completely. A vCPU is kicked out of KVM_RUN with a
// signal plus kvm_run::immediate_exit.
//
// Thread-safety: Start/Pause/Resume/Stop/SaveState/RestoreState from one
// controlling thread (not a vCPU thread). Stats(), error() and
// console_output() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/vm_control.h"
#include "pmlmig/vmm/boot.h"
#include "pmlmig/vmm/exit.h"
#include "pmlmig/vmm/guest_memory.h"
#include "pmlmig/vmm/kvm.h"
#include "pmlmig/vmm/vcpu_state.h"
#include "pmlmig/vmm/vm.h"

namespace pmlmig::vmm {

enum class VcpuRunState { kCreated, kRunning, kPaused, kStopped };
std::string_view VcpuRunStateName(VcpuRunState s);

struct MachineOptions {
  TestGuestConfig guest;
  bool irqchip = true;            // in-kernel irqchip (LAPIC state is then migrated)
  bool huge_pages = false;        // THP for guest RAM
  uint32_t dirty_ring_bytes = 0;  // enable KVM's dirty ring with this many bytes per vCPU
  uint32_t slot_flags = 0;        // initial memslot flags (e.g. KVM_MEM_LOG_DIRTY_PAGES)
  bool echo_console = false;      // copy guest console lines to stderr
  // CreateForRestore only: the guest's RAM is this existing memfd (a VM
  // handed over by another process on this host), mapped and never written
  // before the state is restored. -1: new, zeroed memory. Not described.
  int memory_fd = -1;
};

struct VcpuStats {
  uint64_t pages_written = 0;
  uint64_t loops = 0;
  bool started = false;
};

class Machine final : public engine::VmControl, private ExitHandler {
 public:
  // Builds the VM and boots the test guest (fill, page tables, registers).
  static Result<std::unique_ptr<Machine>> Create(const Kvm& kvm, const MachineOptions& options);
  // Builds the VM with zeroed memory and no boot: the caller writes memory
  // and calls RestoreState() before Start().
  static Result<std::unique_ptr<Machine>> CreateForRestore(const Kvm& kvm, const MachineOptions& options);
  ~Machine() override;

  Status Start();
  Status Pause() override;
  Status Resume() override;
  Status KickAll() override;
  // Stops and joins every vCPU thread; idempotent.
  void Stop();

  // Requires every vCPU created or paused.
  Result<MachineState> CaptureState();
  Status RestoreState(const MachineState& state);

  // engine::VmControl
  const engine::SlotTable& memory_slots() const override { return vm_->slots(); }
  int vm_fd() const override { return vm_->fd(); }
  uint32_t vcpu_count() const override { return static_cast<uint32_t>(vcpus_.size()); }
  int vcpu_fd(uint32_t i) const override { return vcpus_[i]->vcpu->fd(); }
  uint32_t dirty_ring_entries() const override { return options_.dirty_ring_bytes / sizeof(kvm_dirty_gfn); }
  Status SetDirtyLogging(bool on) override;
  std::optional<Backing> slot_backing(uint32_t slot) const override;
  void SetDirtyRingFullHandler(std::function<Status(uint32_t)> handler) override;
  bool SetVcpuThrottleHook(ThrottleHook hook) override;
  void KickVcpu(uint32_t vcpu) override;
  Result<std::vector<uint8_t>> SaveState() override;  // CaptureState, encoded
  Status LoadState(std::span<const uint8_t> state) override;

  const MachineOptions& options() const { return options_; }
  const GuestMemory& memory() const { return memory_; }
  Vm& vm() { return *vm_; }
  Vcpu& vcpu(uint32_t i) { return *vcpus_[i]->vcpu; }
  VcpuRunState state(uint32_t i) const;

  // Reads the guest's statistics page.
  std::vector<VcpuStats> Stats() const;
  // The first vCPU error, or OK while every vCPU is healthy.
  Status error() const;
  std::string console_output() const;


 private:
  enum class Request : int { kRun, kPause, kStop };
  struct VcpuThread {
    std::unique_ptr<Vcpu> vcpu;
    std::thread thread;
    std::atomic<pthread_t> handle{};
    std::atomic<Request> request{Request::kPause};  // pairs with the thread's loads in Loop
    VcpuRunState state = VcpuRunState::kCreated;     // guarded by mu_
    bool io_pending = false;                          // vCPU thread only
    std::chrono::steady_clock::time_point pace_start; // vCPU thread only
    uint64_t paced_pages = 0;                         // vCPU thread only
    std::string console_line;                         // vCPU thread only
    uint64_t kick_ack = 0;                            // guarded by mu_: last KickAll generation seen out of KVM_RUN
  };

  Machine() = default;
  static Result<std::unique_ptr<Machine>> Build(const Kvm& kvm, const MachineOptions& options);
  void Loop(VcpuThread& t);
  void Kick(VcpuThread& t);
  std::chrono::nanoseconds ThrottleHold(uint32_t vcpu);  // the hook's answer (0 without one)
  void Fail(const Status& s);
  void WaitAll(std::unique_lock<std::mutex>& lock, VcpuRunState a, VcpuRunState b);

  ExitAction OnPortOut(uint32_t vcpu, uint16_t port, uint8_t size, uint64_t value) override;
  ExitAction OnHalt(uint32_t vcpu) override;
  ExitAction OnDirtyRingFull(uint32_t vcpu) override;

  MachineOptions options_;
  std::vector<uint32_t> msr_indices_;
  size_t xsave_size_ = 0;
  size_t run_size_ = 0;
  GuestMemory memory_;
  std::unique_ptr<Vm> vm_;
  std::vector<std::unique_ptr<VcpuThread>> vcpus_;
  std::function<Status(uint32_t)> dirty_ring_full_;  // guarded by mu_
  // The throttle hook: vCPU threads call it under a shared lock, so that once
  // SetVcpuThrottleHook(nullptr) holds the lock exclusively no call is left.
  std::shared_mutex throttle_mu_;
  ThrottleHook throttle_hook_;               // guarded by throttle_mu_
  std::atomic<bool> throttle_active_{false}; // skips the lock while there is no hook
  std::atomic<uint64_t> kick_gen_{0};  // KickAll generation; vCPU threads ack it after KVM_RUN returns

  mutable std::mutex mu_;
  std::condition_variable cv_;  // vCPU state changes and requests
  Status error_;                // guarded by mu_
  std::string console_;         // guarded by mu_
  bool started_ = false;
};

}  // namespace pmlmig::vmm
