#include "pmlmig/vmm/kvm.h"

#include <fcntl.h>

#include <cstring>
#include <memory>

#include "ioctl.h"
#include "kvm_abi.h"

namespace pmlmig::vmm {

Result<Kvm> Kvm::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    Status s = Status::FromErrno(err, "open " + path);
    if (err == ENOENT) {
      return Status(Code::kUnavailable, s.message() + " (KVM is not available on this host: load kvm or run where /dev/kvm exists)");
    }
    if (err == EACCES || err == EPERM) {
      return Status(Code::kPermissionDenied, s.message() + " (run as root or add the user to the 'kvm' group)");
    }
    return s;
  }
  Kvm kvm;
  kvm.fd_.Reset(fd);
  auto v = PMLMIG_KVM(fd, KVM_GET_API_VERSION, 0ul, path);
  if (!v.ok()) return v.status();
  if (*v != KVM_API_VERSION) {
    return Unavailable(path + ": KVM API version " + std::to_string(*v) + ", expected " +
                       std::to_string(KVM_API_VERSION));
  }
  kvm.api_version_ = *v;
  return kvm;
}

int Kvm::CheckExtension(long cap) const {
  int r = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap);
  return r < 0 ? 0 : r;
}

Result<size_t> Kvm::VcpuMmapSize() const {
  auto r = PMLMIG_KVM(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, "/dev/kvm");
  if (!r.ok()) return r.status();
  return static_cast<size_t>(*r);
}

Result<std::vector<kvm_cpuid_entry2>> Kvm::SupportedCpuid() const {
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(abi::CountPadHeader) + n * sizeof(kvm_cpuid_entry2));
    const abi::CountPadHeader h{n, 0};
    std::memcpy(buf.data(), &h, sizeof h);
    int r = ::ioctl(fd_.get(), abi::kGetSupportedCpuid, buf.data());
    if (r < 0 && errno == E2BIG) continue;
    if (r < 0) return Status::FromErrno(errno, "KVM_GET_SUPPORTED_CPUID (/dev/kvm)");
    abi::CountPadHeader got;
    std::memcpy(&got, buf.data(), sizeof got);
    std::vector<kvm_cpuid_entry2> entries(got.n);
    std::memcpy(entries.data(), buf.data() + sizeof got, got.n * sizeof(kvm_cpuid_entry2));
    return entries;
  }
  return Internal("KVM_GET_SUPPORTED_CPUID (/dev/kvm): more than 4096 entries");
}

Result<std::vector<uint32_t>> Kvm::MsrIndexList() const {
  // First ask with room for none: KVM answers E2BIG and the count.
  abi::CountHeader probe{0};
  int r = ::ioctl(fd_.get(), abi::kGetMsrIndexList, &probe);
  if (r < 0 && errno != E2BIG) return Status::FromErrno(errno, "KVM_GET_MSR_INDEX_LIST (/dev/kvm)");
  std::vector<uint8_t> buf(sizeof(abi::CountHeader) + probe.n * sizeof(uint32_t));
  std::memcpy(buf.data(), &probe, sizeof probe);
  auto r2 = KvmIoctl(fd_.get(), abi::kGetMsrIndexList, buf.data(), "KVM_GET_MSR_INDEX_LIST", "/dev/kvm");
  if (!r2.ok()) return r2.status();
  abi::CountHeader got;
  std::memcpy(&got, buf.data(), sizeof got);
  std::vector<uint32_t> indices(got.n);
  std::memcpy(indices.data(), buf.data() + sizeof got, got.n * sizeof(uint32_t));
  return indices;
}

}  // namespace pmlmig::vmm
