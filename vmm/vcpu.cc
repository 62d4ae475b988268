#include "pmlmig/vmm/vcpu.h"

#include <sys/ioctl.h>

#include <atomic>
#include <cerrno>

namespace pmlmig::vmm {

Result<bool> Vcpu::Run() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) == 0) return true;
  if (errno == EINTR || errno == EAGAIN) return false;
  return Status::FromErrno(errno, "KVM_RUN (" + name_ + ")");
}

void Vcpu::SetImmediateExit(bool on) {
  std::atomic_ref<uint8_t> flag(run()->immediate_exit);
  flag.store(on ? 1 : 0, std::memory_order_seq_cst);
}

}  // namespace pmlmig::vmm
