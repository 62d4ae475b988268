// Vcpu: the one owner of a vCPU fd and of its kvm_run mapping. It knows
// nothing about threads; the Machine runs each Vcpu on its own thread.
//
// Thread-safety: Run() and the state ioctls from the vCPU's own thread, or
// from any thread while that thread is parked. RequestImmediateExit() from any
// thread.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <string>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::vmm {

class Vcpu {
 public:
  Vcpu(uint32_t id, UniqueFd fd, Mapping run) : id_(id), fd_(std::move(fd)), run_(std::move(run)) {}

  uint32_t id() const { return id_; }
  int fd() const { return fd_.get(); }
  kvm_run* run() const { return reinterpret_cast<kvm_run*>(run_.data()); }
  const std::string& name() const { return name_; }

  // KVM_RUN. Returns true when the vCPU exited with a reason to decode, false
  // when it returned early (EINTR: a kick or immediate_exit), or an error.
  Result<bool> Run();

  // immediate_exit is read by KVM at the start of KVM_RUN; with a signal it
  // closes the race between "decide to enter" and "enter". Seq-cst so the
  // store is ordered against the caller's request flag (see Machine::Kick).
  void SetImmediateExit(bool on);

 private:
  uint32_t id_;
  UniqueFd fd_;
  Mapping run_;
  std::string name_ = "vcpu " + std::to_string(id_);
};

}  // namespace pmlmig::vmm
