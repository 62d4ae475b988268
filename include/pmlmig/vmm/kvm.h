// Kvm: the one owner of the /dev/kvm system fd, and the system-level ioctls
// (API version, extension checks, CPUID and MSR lists). Thread-safe after
// Open(): every method is a read-only ioctl on the system fd.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::vmm {

class Kvm {
 public:
  // Opens `path` O_RDWR|O_CLOEXEC and checks KVM_GET_API_VERSION == 12.
  // Errors name the device and say what to do (missing, no permission).
  static Result<Kvm> Open(const std::string& path = "/dev/kvm");

  int fd() const { return fd_.get(); }
  int api_version() const { return api_version_; }

  // KVM_CHECK_EXTENSION on the system fd; 0 when unsupported or on error.
  int CheckExtension(long cap) const;
  // Size of the per-vCPU kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
  Result<size_t> VcpuMmapSize() const;
  // KVM_GET_SUPPORTED_CPUID.
  Result<std::vector<kvm_cpuid_entry2>> SupportedCpuid() const;
  // KVM_GET_MSR_INDEX_LIST: the MSRs KVM reports as saveable.
  Result<std::vector<uint32_t>> MsrIndexList() const;

 private:
  UniqueFd fd_;
  int api_version_ = 0;
};

}  // namespace pmlmig::vmm
