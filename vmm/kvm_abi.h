// Private to vmm/: the C ABI of the KVM ioctls whose argument structs end in a
// flexible array.
//
// Linux uapi headers before 6.5 (Debian 12 ships 6.1) declare those arrays with
// __DECLARE_FLEX_ARRAY, which wraps them in a struct beside an empty struct.
// An empty struct is 0 bytes in C but 1 in C++, so under C++ the structs grow
// and the ioctl numbers computed from sizeof() differ from the kernel's, which
// rejects them with EINVAL. These are the numbers and header layouts as C (and
// the kernel) see them; the static_asserts pin them to the kernel's values.
#pragma once

#include <linux/kvm.h>

#include <cstdint>

namespace pmlmig::vmm::abi {

struct CountHeader {  // kvm_msr_list before indices[]: just the count
  uint32_t n;
};
struct CountPadHeader {  // kvm_cpuid2 / kvm_msrs before their arrays
  uint32_t n;
  uint32_t pad;
};

constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, CountHeader);
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CountPadHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CountPadHeader);
static_assert(kGetMsrIndexList == 0xc004ae02);
static_assert(kGetSupportedCpuid == 0xc008ae05);
static_assert(kSetCpuid2 == 0x4008ae90);

// KVM_GET/SET_MSRS (header then 16-byte entries) and KVM_GET/SET_XSAVE(2)
// (a 4096-byte region in C; XSAVE2 may write more, sized by KVM_CAP_XSAVE2).
using KvmMsrsHeaderC = CountPadHeader;
struct KvmXsaveC {
  uint32_t region[1024];
};
constexpr unsigned long kKvmGetMsrs = _IOWR(KVMIO, 0x88, KvmMsrsHeaderC);
constexpr unsigned long kKvmSetMsrs = _IOW(KVMIO, 0x89, KvmMsrsHeaderC);
constexpr unsigned long kKvmGetXsave = _IOR(KVMIO, 0xa4, KvmXsaveC);
constexpr unsigned long kKvmSetXsave = _IOW(KVMIO, 0xa5, KvmXsaveC);
constexpr unsigned long kKvmGetXsave2 = _IOR(KVMIO, 0xcf, KvmXsaveC);
static_assert(kKvmGetMsrs == 0xc008ae88 && kKvmSetMsrs == 0x4008ae89);
static_assert(kKvmGetXsave == 0x9000aea4 && kKvmSetXsave == 0x5000aea5 && kKvmGetXsave2 == 0x9000aecf);

}  // namespace pmlmig::vmm::abi
