// Private to vmm/: the one place a KVM ioctl's failure becomes a Status.
// Messages name the ioctl, the object and errno:
//   "KVM_SET_USER_MEMORY_REGION (slot 1, gpa 0x100000000, 1 GiB): Invalid argument"
#pragma once

#include <sys/ioctl.h>

#include <cerrno>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"

namespace pmlmig::vmm {

// ioctl() retried on EINTR; returns the ioctl's non-negative result or a
// Status naming `name` and `object`.
Result<int> KvmIoctl(int fd, unsigned long request, void* arg, std::string_view name,
                     std::string_view object);

inline Result<int> KvmIoctl(int fd, unsigned long request, unsigned long arg,
                            std::string_view name, std::string_view object) {
  return KvmIoctl(fd, request, reinterpret_cast<void*>(arg), name, object);
}

}  // namespace pmlmig::vmm

// PMLMIG_KVM(fd, KVM_GET_REGS, &regs, "vcpu 0") -> Result<int>; the ioctl's
// name comes from the macro argument so messages cannot drift from the code.
#define PMLMIG_KVM(fd, req, arg, object) ::pmlmig::vmm::KvmIoctl((fd), (req), (arg), #req, (object))

// Same, returning the Status from the enclosing function on failure.
#define PMLMIG_KVM_OR_RETURN(fd, req, arg, object)              \
  do {                                                          \
    auto pmlmig_r_ = ::pmlmig::vmm::KvmIoctl((fd), (req), (arg), #req, (object)); \
    if (!pmlmig_r_.ok()) return pmlmig_r_.status();             \
  } while (0)
