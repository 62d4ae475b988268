// CVm: the embedder's VM as the engine sees it (an engine::VmControl over
// the C callback table of pmlmig_vm_ops), and the C ABI's shared helpers:
// errno from Status, per-thread and per-handle messages, sized structs.
// Private to capi/: nothing here is exported.
#pragma once

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/userspace_tracker.h"
#include "pmlmig/engine/vm_control.h"
#include "pmlmig/pmlmig.h"

namespace pmlmig::capi {

// The negative errno a Status becomes at the C ABI (pmlmig.h lists it).
int ErrnoOf(Code code);

// The message of the last failing call on this thread (pmlmig_last_error);
// also where a factory's or check's pmlmig_set_error lands.
void SetThreadError(std::string message);
const std::string& ThreadError();

// A message readable from any thread through a handle's *_last_error: the
// last failing call's on this handle, from any thread. c_str() hands out a
// copy owned by the calling thread, valid until that thread's next c_str()
// of any slot, so a concurrent Set never frees what a reader holds.
class ErrorSlot {
 public:
  void Set(std::string message) {
    std::lock_guard lock(mu_);
    message_ = std::move(message);
  }
  const char* c_str() const;

 private:
  mutable std::mutex mu_;
  std::string message_;  // guarded by mu_
};

// Lets a handle's destroy wait for the threads inside its blocking calls
// (pmlmig_source_wait, pmlmig_receiver_wait): each such call holds a
// Pass while it touches the handle; destroy wakes them by its own means,
// then Drain()s before it frees anything.
class CallGate {
 public:
  class Pass {
   public:
    explicit Pass(CallGate& g) : g_(g) {
      std::lock_guard lock(g_.mu_);
      ++g_.inside_;
    }
    ~Pass() {
      std::lock_guard lock(g_.mu_);
      if (--g_.inside_ == 0) g_.cv_.notify_all();
    }
    Pass(const Pass&) = delete;
    Pass& operator=(const Pass&) = delete;

   private:
    CallGate& g_;
  };
  void Drain() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return inside_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int inside_ = 0;  // guarded by mu_
};

// Records `s` in `slot` (if any) and on this thread; returns its errno (0 for OK).
int Fail(ErrorSlot* slot, const Status& s);

// Copies the caller's sized struct over `defaults`: only the bytes its
// `size` covers (at least the size field itself). A size below that of the
// size field, or a null pointer, is refused.
template <typename T>
Status ReadSized(const T* in, T* out, const char* what) {
  if (in == nullptr) return InvalidArgument(std::string(what) + ": NULL");
  if (in->size < sizeof(size_t)) return InvalidArgument(std::string(what) + ": size is " + std::to_string(in->size));
  std::memcpy(static_cast<void*>(out), static_cast<const void*>(in), std::min(in->size, sizeof(T)));
  out->size = sizeof(T);
  return Status::Ok();
}
// Runs a C entry point's `body` (returning int): no C++ exception leaves the
// C ABI; any becomes -EIO with its message.
template <typename Fn>
int Guard(ErrorSlot* slot, Fn&& body) noexcept {
  try {
    return body();
  } catch (const std::exception& e) {
    return Fail(slot, Internal(std::string("internal error: ") + e.what()));
  } catch (...) {
    return Fail(slot, Internal("internal error: unknown exception"));
  }
}

// Writes `full` into the caller's struct, as much of it as its size covers.
template <typename T>
void WriteSized(const T& full, T* out) {
  if (out == nullptr || out->size < sizeof(size_t)) return;
  const size_t n = std::min(out->size, sizeof(T));
  const size_t caller_size = out->size;
  std::memcpy(static_cast<void*>(out), static_cast<const void*>(&full), n);
  out->size = caller_size;
}

}  // namespace pmlmig::capi

// The handle type of pmlmig.h (global namespace, as the header declares it).
struct pmlmig_vm final : public pmlmig::engine::VmControl {
 public:
  // Checks and copies the config; the ops table is copied too.
  static pmlmig::Result<pmlmig_vm*> Create(const pmlmig_vm_config& config, const pmlmig_vm_ops& ops, void* opaque);
  ~pmlmig_vm() override;  // ops.release(opaque), if set

  // engine::VmControl, over the callbacks.
  const pmlmig::engine::SlotTable& memory_slots() const override { return slots_; }
  int vm_fd() const override { return vm_fd_; }
  uint32_t vcpu_count() const override { return static_cast<uint32_t>(vcpu_fds_.size()); }
  int vcpu_fd(uint32_t vcpu) const override { return vcpu < vcpu_fds_.size() ? vcpu_fds_[vcpu] : -1; }
  uint32_t dirty_ring_entries() const override { return ring_entries_; }
  std::optional<Backing> slot_backing(uint32_t slot) const override;
  pmlmig::Status SetDirtyLogging(bool on) override;
  pmlmig::Status Pause() override;
  pmlmig::Status Resume() override;
  pmlmig::Status KickAll() override;
  void SetDirtyRingFullHandler(std::function<pmlmig::Status(uint32_t vcpu)> handler) override;
  pmlmig::Result<std::vector<uint8_t>> SaveState() override;
  pmlmig::Status LoadState(std::span<const uint8_t> state) override;
  // With ops.kick_vcpu only: the hook is asked through pmlmig_vm_throttle_ns.
  bool SetVcpuThrottleHook(ThrottleHook hook) override;
  void KickVcpu(uint32_t vcpu) override;

  // The C entry points on a vCPU thread / any thread.
  int OnDirtyRingFull(uint32_t vcpu);
  uint64_t ThrottleNs(uint32_t vcpu);
  // The VMM's own writes (pmlmig_vm_mark_dirty), kept until a migration's
  // collection takes them: the source tracks the union of KVM's log and this.
  pmlmig::engine::UserspaceWriteTracker& marks() { return *marks_; }

  void* opaque() const { return opaque_; }
  const std::string& description() const { return description_; }
  pmlmig::capi::ErrorSlot& error() { return error_; }

 private:
  pmlmig_vm(const pmlmig_vm_ops& ops, void* opaque) : ops_(ops), opaque_(opaque) {}
  // A callback's result as a Status naming it ("pause callback: ...").
  pmlmig::Status Call(const char* what, int rc) const;

  pmlmig_vm_ops ops_{};
  void* opaque_ = nullptr;
  bool owns_opaque_ = false;  // Create succeeded: release(opaque_) at the end, even for a NULL opaque
  pmlmig::engine::SlotTable slots_;
  std::vector<pmlmig_region> regions_;
  std::vector<int> vcpu_fds_;
  int vm_fd_ = -1;
  uint32_t ring_entries_ = 0;
  std::string description_;
  std::mutex ring_mu_;
  std::function<pmlmig::Status(uint32_t)> ring_full_;  // guarded by ring_mu_
  // The throttle hook: vCPU threads ask it under a shared lock, so once
  // SetVcpuThrottleHook(nullptr) has the lock no call is left.
  std::shared_mutex throttle_mu_;
  ThrottleHook throttle_;                    // guarded by throttle_mu_
  std::atomic<bool> throttle_active_{false}; // skips the lock while there is no hook
  std::unique_ptr<pmlmig::engine::UserspaceWriteTracker> marks_;
  pmlmig::capi::ErrorSlot error_;
};

// The buffer save_state appends to (pmlmig_buffer_append).
struct pmlmig_buffer {
  static constexpr size_t kLimit = 1u << 30;  // a state blob beyond 1 GiB is a bug, not a VM
  std::vector<uint8_t> bytes;
};
