// Tests for vmm/vcpu_state.cc: the machine-state wire format (round trip,
// truncation, corruption, limits) without KVM, and a capture -> encode ->
// decode -> restore -> capture round trip between two real VMs where /dev/kvm
// exists (the tests named *Kvm*, skipped elsewhere).
#include "pmlmig/base/units.h"
#include "pmlmig/vmm/vcpu_state.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "pmlmig/base/unique_fd.h"
#include "pmlmig/vmm/kvm.h"

namespace pmlmig::vmm {
namespace {

// ----------------------------------------------------------------------------
// Field-by-field equality. Padding and reserved fields are not part of the
// format and are not compared.

#define EXPECT_FIELD(a, b, f) EXPECT_EQ((a).f, (b).f) << what << "." #f

void ExpectSegmentEq(const kvm_segment& a, const kvm_segment& b, const std::string& what) {
  EXPECT_FIELD(a, b, base);
  EXPECT_FIELD(a, b, limit);
  EXPECT_FIELD(a, b, selector);
  EXPECT_FIELD(a, b, type);
  EXPECT_FIELD(a, b, present);
  EXPECT_FIELD(a, b, dpl);
  EXPECT_FIELD(a, b, db);
  EXPECT_FIELD(a, b, s);
  EXPECT_FIELD(a, b, l);
  EXPECT_FIELD(a, b, g);
  EXPECT_FIELD(a, b, avl);
  EXPECT_FIELD(a, b, unusable);
}

void ExpectRegsEq(const kvm_regs& a, const kvm_regs& b, const std::string& what) {
  EXPECT_FIELD(a, b, rax); EXPECT_FIELD(a, b, rbx); EXPECT_FIELD(a, b, rcx);
  EXPECT_FIELD(a, b, rdx); EXPECT_FIELD(a, b, rsi); EXPECT_FIELD(a, b, rdi);
  EXPECT_FIELD(a, b, rsp); EXPECT_FIELD(a, b, rbp); EXPECT_FIELD(a, b, r8);
  EXPECT_FIELD(a, b, r9);  EXPECT_FIELD(a, b, r10); EXPECT_FIELD(a, b, r11);
  EXPECT_FIELD(a, b, r12); EXPECT_FIELD(a, b, r13); EXPECT_FIELD(a, b, r14);
  EXPECT_FIELD(a, b, r15); EXPECT_FIELD(a, b, rip); EXPECT_FIELD(a, b, rflags);
}

void ExpectSregsEq(const kvm_sregs& a, const kvm_sregs& b, const std::string& what) {
  ExpectSegmentEq(a.cs, b.cs, what + ".cs");
  ExpectSegmentEq(a.ds, b.ds, what + ".ds");
  ExpectSegmentEq(a.es, b.es, what + ".es");
  ExpectSegmentEq(a.fs, b.fs, what + ".fs");
  ExpectSegmentEq(a.gs, b.gs, what + ".gs");
  ExpectSegmentEq(a.ss, b.ss, what + ".ss");
  ExpectSegmentEq(a.tr, b.tr, what + ".tr");
  ExpectSegmentEq(a.ldt, b.ldt, what + ".ldt");
  EXPECT_FIELD(a, b, gdt.base); EXPECT_FIELD(a, b, gdt.limit);
  EXPECT_FIELD(a, b, idt.base); EXPECT_FIELD(a, b, idt.limit);
  EXPECT_FIELD(a, b, cr0); EXPECT_FIELD(a, b, cr2); EXPECT_FIELD(a, b, cr3);
  EXPECT_FIELD(a, b, cr4); EXPECT_FIELD(a, b, cr8); EXPECT_FIELD(a, b, efer);
  EXPECT_FIELD(a, b, apic_base);
  for (int i = 0; i < 4; ++i) EXPECT_FIELD(a, b, interrupt_bitmap[i]) << "[" << i << "]";
}

void ExpectFpuEq(const kvm_fpu& a, const kvm_fpu& b, const std::string& what) {
  EXPECT_EQ(0, std::memcmp(a.fpr, b.fpr, sizeof(a.fpr))) << what << ".fpr";
  EXPECT_FIELD(a, b, fcw); EXPECT_FIELD(a, b, fsw); EXPECT_FIELD(a, b, ftwx);
  EXPECT_FIELD(a, b, last_opcode); EXPECT_FIELD(a, b, last_ip); EXPECT_FIELD(a, b, last_dp);
  EXPECT_EQ(0, std::memcmp(a.xmm, b.xmm, sizeof(a.xmm))) << what << ".xmm";
  EXPECT_FIELD(a, b, mxcsr);
}

void ExpectEventsEq(const kvm_vcpu_events& a, const kvm_vcpu_events& b, const std::string& what) {
  EXPECT_FIELD(a, b, exception.injected); EXPECT_FIELD(a, b, exception.nr);
  EXPECT_FIELD(a, b, exception.has_error_code); EXPECT_FIELD(a, b, exception.pending);
  EXPECT_FIELD(a, b, exception.error_code);
  EXPECT_FIELD(a, b, interrupt.injected); EXPECT_FIELD(a, b, interrupt.nr);
  EXPECT_FIELD(a, b, interrupt.soft); EXPECT_FIELD(a, b, interrupt.shadow);
  EXPECT_FIELD(a, b, nmi.injected); EXPECT_FIELD(a, b, nmi.pending); EXPECT_FIELD(a, b, nmi.masked);
  EXPECT_FIELD(a, b, sipi_vector); EXPECT_FIELD(a, b, flags);
  EXPECT_FIELD(a, b, smi.smm); EXPECT_FIELD(a, b, smi.pending);
  EXPECT_FIELD(a, b, smi.smm_inside_nmi); EXPECT_FIELD(a, b, smi.latched_init);
  EXPECT_FIELD(a, b, triple_fault.pending);
  EXPECT_FIELD(a, b, exception_has_payload); EXPECT_FIELD(a, b, exception_payload);
}

void ExpectDebugregsEq(const kvm_debugregs& a, const kvm_debugregs& b, const std::string& what) {
  for (int i = 0; i < 4; ++i) EXPECT_FIELD(a, b, db[i]) << "[" << i << "]";
  EXPECT_FIELD(a, b, dr6); EXPECT_FIELD(a, b, dr7); EXPECT_FIELD(a, b, flags);
}

void ExpectXcrsEq(const kvm_xcrs& a, const kvm_xcrs& b, const std::string& what) {
  EXPECT_FIELD(a, b, nr_xcrs);
  EXPECT_FIELD(a, b, flags);
  for (uint32_t i = 0; i < a.nr_xcrs && i < b.nr_xcrs && i < KVM_MAX_XCRS; ++i) {
    EXPECT_FIELD(a, b, xcrs[i].xcr) << "[" << i << "]";
    EXPECT_FIELD(a, b, xcrs[i].value) << "[" << i << "]";
  }
}

void ExpectMsrsEq(const std::vector<kvm_msr_entry>& a, const std::vector<kvm_msr_entry>& b,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what << " count";
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_FIELD(a[i], b[i], index) << "[" << i << "]";
    EXPECT_FIELD(a[i], b[i], data) << "[" << i << "]";
  }
}

void ExpectIrqchipEq(const kvm_irqchip& a, const kvm_irqchip& b, const std::string& what) {
  EXPECT_FIELD(a, b, chip_id);
  EXPECT_EQ(0, std::memcmp(a.chip.dummy, b.chip.dummy, sizeof(a.chip.dummy))) << what << ".chip";
}

void ExpectVcpuEq(const VcpuState& a, const VcpuState& b, const std::string& what) {
  EXPECT_FIELD(a, b, id);
  ExpectRegsEq(a.regs, b.regs, what + ".regs");
  ExpectSregsEq(a.sregs, b.sregs, what + ".sregs");
  ExpectFpuEq(a.fpu, b.fpu, what + ".fpu");
  EXPECT_EQ(a.xsave, b.xsave) << what << ".xsave";
  EXPECT_FIELD(a, b, has_xcrs);
  if (a.has_xcrs && b.has_xcrs) ExpectXcrsEq(a.xcrs, b.xcrs, what + ".xcrs");
  ExpectMsrsEq(a.msrs, b.msrs, what + ".msrs");
  ASSERT_EQ(a.lapic.has_value(), b.lapic.has_value()) << what << ".lapic";
  if (a.lapic) {
    EXPECT_EQ(0, std::memcmp(a.lapic->regs, b.lapic->regs, sizeof(a.lapic->regs)))
        << what << ".lapic";
  }
  ExpectEventsEq(a.events, b.events, what + ".events");
  EXPECT_FIELD(a, b, mp_state.mp_state);
  ExpectDebugregsEq(a.debugregs, b.debugregs, what + ".debugregs");
}

void ExpectMachineStateEq(const MachineState& a, const MachineState& b) {
  const std::string what = "vm";
  EXPECT_FIELD(a, b, vm.clock.clock);
  EXPECT_FIELD(a, b, vm.clock.flags);
  EXPECT_FIELD(a, b, vm.clock.realtime);
  EXPECT_FIELD(a, b, vm.clock.host_tsc);
  EXPECT_FIELD(a, b, vm.tsc_khz);
  EXPECT_FIELD(a, b, vm.irqchip);
  if (a.vm.irqchip && b.vm.irqchip) {
    ExpectIrqchipEq(a.vm.pic_master, b.vm.pic_master, "vm.pic_master");
    ExpectIrqchipEq(a.vm.pic_slave, b.vm.pic_slave, "vm.pic_slave");
    ExpectIrqchipEq(a.vm.ioapic, b.vm.ioapic, "vm.ioapic");
  }
  ASSERT_EQ(a.vcpus.size(), b.vcpus.size());
  for (size_t i = 0; i < a.vcpus.size(); ++i) {
    ExpectVcpuEq(a.vcpus[i], b.vcpus[i], "vcpus[" + std::to_string(i) + "]");
  }
}

#undef EXPECT_FIELD

// ----------------------------------------------------------------------------
// Pseudo-random states.

class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  uint64_t Next() { return g_(); }
  uint64_t Below(uint64_t n) { return g_() % n; }
  // Whole structs are filled, padding included: the format must carry every
  // real field and the comparison ignores the rest.
  void Fill(void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(g_());
  }

 private:
  std::mt19937_64 g_;
};

VcpuState RandomVcpu(Rng& rng, uint32_t id, bool lapic, size_t xsave_bytes, bool xcrs) {
  VcpuState v;
  v.id = id;
  rng.Fill(&v.regs, sizeof(v.regs));
  rng.Fill(&v.sregs, sizeof(v.sregs));
  rng.Fill(&v.fpu, sizeof(v.fpu));
  v.xsave.resize(xsave_bytes);
  rng.Fill(v.xsave.data(), v.xsave.size());
  v.has_xcrs = xcrs;
  if (xcrs) {
    rng.Fill(&v.xcrs, sizeof(v.xcrs));
    v.xcrs.nr_xcrs = 1 + static_cast<uint32_t>(rng.Below(KVM_MAX_XCRS));
  }
  v.msrs.resize(1 + rng.Below(64));
  for (auto& e : v.msrs) rng.Fill(&e, sizeof(e));
  if (lapic) {
    kvm_lapic_state l;
    rng.Fill(&l, sizeof(l));
    v.lapic = l;
  }
  rng.Fill(&v.events, sizeof(v.events));
  rng.Fill(&v.mp_state, sizeof(v.mp_state));
  rng.Fill(&v.debugregs, sizeof(v.debugregs));
  return v;
}

MachineState RandomState(uint64_t seed, bool irqchip) {
  Rng rng(seed);
  MachineState s;
  rng.Fill(&s.vm.clock, sizeof(s.vm.clock));
  s.vm.tsc_khz = static_cast<uint32_t>(rng.Next());
  s.vm.irqchip = irqchip;
  if (irqchip) {
    rng.Fill(&s.vm.pic_master, sizeof(kvm_irqchip));
    rng.Fill(&s.vm.pic_slave, sizeof(kvm_irqchip));
    rng.Fill(&s.vm.ioapic, sizeof(kvm_irqchip));
    s.vm.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    s.vm.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    s.vm.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
  }
  // Two vCPUs that differ in every optional part: XSAVE2-sized vs legacy or
  // absent XSAVE, with and without XCRs.
  s.vcpus.push_back(RandomVcpu(rng, 0, irqchip, irqchip ? 4096 + 64 * 9 : 4096, true));
  s.vcpus.push_back(RandomVcpu(rng, 7, irqchip, irqchip ? 4096 : 0, false));
  return s;
}

std::string DecodeError(std::span<const uint8_t> bytes) {
  auto r = DecodeMachineState(bytes);
  if (r.ok()) return "";
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().message();
  EXPECT_FALSE(r.status().message().empty());
  return r.status().message();
}

// ----------------------------------------------------------------------------
// Format tests.

TEST(VcpuStateFormat, RoundTripWithIrqchip) {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    MachineState s = RandomState(seed, true);
    std::vector<uint8_t> bytes = EncodeMachineState(s);
    auto d = DecodeMachineState(bytes);
    ASSERT_TRUE(d.ok()) << d.status().message();
    ExpectMachineStateEq(s, *d);
    EXPECT_EQ(EncodeMachineState(*d), bytes) << "re-encoding differs";
  }
}

TEST(VcpuStateFormat, RoundTripWithoutIrqchip) {
  for (uint64_t seed = 11; seed <= 15; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    MachineState s = RandomState(seed, false);
    std::vector<uint8_t> bytes = EncodeMachineState(s);
    auto d = DecodeMachineState(bytes);
    ASSERT_TRUE(d.ok()) << d.status().message();
    ExpectMachineStateEq(s, *d);
    EXPECT_FALSE(d->vcpus[0].lapic.has_value());
    EXPECT_TRUE(d->vcpus[1].xsave.empty());
  }
}

TEST(VcpuStateFormat, EmptyMachineRoundTrips) {
  MachineState s;
  auto d = DecodeMachineState(EncodeMachineState(s));
  ASSERT_TRUE(d.ok()) << d.status().message();
  ExpectMachineStateEq(s, *d);
}

TEST(VcpuStateFormat, EveryTruncationIsRejected) {
  for (bool irqchip : {true, false}) {
    std::vector<uint8_t> bytes = EncodeMachineState(RandomState(21, irqchip));
    for (size_t len = 0; len < bytes.size(); ++len) {
      std::string err = DecodeError(std::span<const uint8_t>(bytes.data(), len));
      ASSERT_NE(err.find("truncated"), std::string::npos)
          << "length " << len << " of " << bytes.size() << ": '" << err << "'";
      ASSERT_NE(err.find("offset"), std::string::npos) << err;
    }
  }
}

TEST(VcpuStateFormat, BadMagicIsRejected) {
  std::vector<uint8_t> bytes = EncodeMachineState(RandomState(3, true));
  bytes[2] ^= 0x20;
  std::string err = DecodeError(bytes);
  EXPECT_NE(err.find("magic"), std::string::npos) << err;
  EXPECT_NE(err.find("offset 0"), std::string::npos) << err;
}

TEST(VcpuStateFormat, UnknownVersionIsRejected) {
  std::vector<uint8_t> bytes = EncodeMachineState(RandomState(3, true));
  bytes[8] = 2;  // version, u32 LE at offset 8
  std::string err = DecodeError(bytes);
  EXPECT_NE(err.find("version 2"), std::string::npos) << err;
  EXPECT_NE(err.find("offset 8"), std::string::npos) << err;
}

TEST(VcpuStateFormat, ReservedHeaderFlagsAreRejected) {
  std::vector<uint8_t> bytes = EncodeMachineState(MachineState{});
  bytes[12] = 1;
  std::string err = DecodeError(bytes);
  EXPECT_NE(err.find("flags"), std::string::npos) << err;
}

TEST(VcpuStateFormat, TrailingBytesAreRejected) {
  std::vector<uint8_t> bytes = EncodeMachineState(RandomState(4, false));
  size_t end = bytes.size();
  bytes.push_back(0);
  bytes.push_back(0);
  std::string err = DecodeError(bytes);
  EXPECT_NE(err.find("trailing"), std::string::npos) << err;
  EXPECT_NE(err.find("offset " + std::to_string(end)), std::string::npos) << err;
}

TEST(VcpuStateFormat, InvalidBooleanIsRejected) {
  std::vector<uint8_t> bytes = EncodeMachineState(MachineState{});
  // Header 16 + clock 28 + tsc_khz 4: vm.irqchip is the byte at offset 48.
  ASSERT_EQ(bytes[48], 0);
  bytes[48] = 2;
  std::string err = DecodeError(bytes);
  EXPECT_NE(err.find("boolean"), std::string::npos) << err;
  EXPECT_NE(err.find("offset 48"), std::string::npos) << err;
  EXPECT_NE(err.find("irqchip"), std::string::npos) << err;
}

TEST(VcpuStateFormat, TooManyVcpusIsRejected) {
  MachineState s;
  for (uint32_t i = 0; i <= 1024; ++i) {
    VcpuState v;
    v.id = i;
    s.vcpus.push_back(v);
  }
  std::string err = DecodeError(EncodeMachineState(s));
  EXPECT_NE(err.find("vCPU count 1025"), std::string::npos) << err;

  s.vcpus.pop_back();  // exactly 1024 is fine
  auto d = DecodeMachineState(EncodeMachineState(s));
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->vcpus.size(), 1024u);
}

TEST(VcpuStateFormat, TooManyMsrsIsRejected) {
  MachineState s;
  s.vcpus.push_back(VcpuState{});
  s.vcpus[0].msrs.resize(4097);
  std::string err = DecodeError(EncodeMachineState(s));
  EXPECT_NE(err.find("MSR count 4097"), std::string::npos) << err;
  EXPECT_NE(err.find("vcpu[0]"), std::string::npos) << err;
}

TEST(VcpuStateFormat, BadXsaveSizesAreRejected) {
  for (size_t size : {size_t{100}, size_t{4095}, size_t{(1 << 20) + 4}}) {
    MachineState s;
    s.vcpus.push_back(VcpuState{});
    s.vcpus[0].xsave.resize(size);
    std::string err = DecodeError(EncodeMachineState(s));
    EXPECT_NE(err.find("XSAVE size " + std::to_string(size)), std::string::npos) << err;
  }
  MachineState ok;
  ok.vcpus.push_back(VcpuState{});
  ok.vcpus[0].xsave.resize(1 << 20);
  EXPECT_TRUE(DecodeMachineState(EncodeMachineState(ok)).ok());
}

TEST(VcpuStateFormat, DuplicateVcpuIdsAreRejected) {
  MachineState s = RandomState(5, false);
  s.vcpus[1].id = s.vcpus[0].id;
  std::string err = DecodeError(EncodeMachineState(s));
  EXPECT_NE(err.find("duplicate"), std::string::npos) << err;
}

TEST(VcpuStateFormat, IrqchipWithoutLapicIsRejected) {
  MachineState s = RandomState(6, true);
  s.vcpus[1].lapic.reset();
  std::string err = DecodeError(EncodeMachineState(s));
  EXPECT_NE(err.find("LAPIC"), std::string::npos) << err;
}

TEST(VcpuStateFormat, CorruptedEncodingsNeverCrash) {
  std::vector<uint8_t> good = EncodeMachineState(RandomState(8, true));
  Rng rng(99);
  int rejected = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<uint8_t> bytes = good;
    int flips = 1 + static_cast<int>(rng.Below(4));
    for (int f = 0; f < flips; ++f) {
      // Bias toward the header and the count/size fields near its start.
      size_t at = rng.Below(4) == 0 ? rng.Below(64) : rng.Below(bytes.size());
      bytes[at] = static_cast<uint8_t>(rng.Next());
    }
    if (rng.Below(8) == 0) bytes.resize(rng.Below(bytes.size()));
    auto r = DecodeMachineState(bytes);
    if (!r.ok()) ++rejected;
  }
  EXPECT_GT(rejected, 0);
  // Pure noise behind a valid header.
  for (int iter = 0; iter < 500; ++iter) {
    std::vector<uint8_t> bytes(good.begin(), good.begin() + 16);
    bytes.resize(16 + rng.Below(8192));
    rng.Fill(bytes.data() + 16, bytes.size() - 16);
    (void)DecodeMachineState(bytes);
  }
}

// Without a device the ioctl layer still names the ioctl, the object and errno.
TEST(VcpuStateIoctl, ErrorsNameIoctlObjectAndErrno) {
  auto c = CaptureVcpuState(-1, 7, {}, false, 0);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("KVM_GET_REGS (vcpu 7)"), std::string::npos)
      << c.status().message();
  EXPECT_NE(c.status().message().find(std::strerror(EBADF)), std::string::npos)
      << c.status().message();

  VcpuState three;
  three.id = 3;
  Status s = RestoreVcpuState(-1, three);
  EXPECT_NE(s.message().find("KVM_SET_REGS (vcpu 3)"), std::string::npos) << s.message();

  Status v = RestoreVmState(-1, VmState{});
  EXPECT_NE(v.message().find("KVM_SET_CLOCK (vm)"), std::string::npos) << v.message();
}

// ----------------------------------------------------------------------------
// KVM round trip: two real VMs.

constexpr uint32_t kMsrTsc = 0x10;
constexpr uint32_t kMsrSysenterCs = 0x174;
constexpr uint32_t kMsrStar = 0xc0000081;
constexpr uint32_t kMsrLstar = 0xc0000082;
constexpr uint32_t kMsrSfmask = 0xc0000084;
constexpr uint32_t kMsrKernelGsBase = 0xc0000102;
constexpr uint32_t kMsrTscDeadline = 0x6e0;
constexpr uint32_t kLapicLvtt = 0x320;
constexpr uint32_t kLvttTscDeadline = 2u << 17;


// The system ioctls below are issued with their C ABI. Under C++, Linux < 6.5
// uapi headers (Debian 12 ships 6.1) make every struct that ends in a
// __DECLARE_FLEX_ARRAY bigger than in C and move the array (an empty struct
// is 1 byte in C++), so KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2,
// KVM_GET_MSR_INDEX_LIST and KVM_SET_MSRS from <linux/kvm.h> carry the wrong
// size in their number and the kernel rejects them (EINVAL). Kvm::
// SupportedCpuid() and Kvm::MsrIndexList() fail for that reason when built
// against those headers; the test does not depend on them.
struct Header8C {  // kvm_cpuid2 / kvm_msrs as C sees them, before the array
  uint32_t n;
  uint32_t pad;
};
struct Header4C {  // kvm_msr_list as C sees it, before the array
  uint32_t n;
};
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, Header8C);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, Header8C);
constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, Header4C);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, Header8C);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, Header8C);
static_assert(kGetSupportedCpuid == 0xc008ae05 && kSetCpuid2 == 0x4008ae90);
static_assert(kGetMsrIndexList == 0xc004ae02 && kGetMsrs == 0xc008ae88 &&
              kSetMsrs == 0x4008ae89);

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// KVM_GET_SUPPORTED_CPUID as a byte buffer in the C layout (header + entries),
// ready for KVM_SET_CPUID2.
::testing::AssertionResult SupportedCpuid(int kvm_fd, std::vector<uint8_t>* out) {
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(Header8C) + n * sizeof(kvm_cpuid_entry2), 0);
    Header8C h{n, 0};
    std::memcpy(buf.data(), &h, sizeof(h));
    if (::ioctl(kvm_fd, kGetSupportedCpuid, buf.data()) < 0) {
      if (errno == E2BIG) continue;
      return ::testing::AssertionFailure() << Errno("KVM_GET_SUPPORTED_CPUID");
    }
    std::memcpy(&h, buf.data(), sizeof(h));
    buf.resize(sizeof(Header8C) + h.n * sizeof(kvm_cpuid_entry2));
    *out = std::move(buf);
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "KVM_GET_SUPPORTED_CPUID: more than 4096 entries";
}

::testing::AssertionResult MsrIndexList(int kvm_fd, std::vector<uint32_t>* out) {
  Header4C probe{0};
  if (::ioctl(kvm_fd, kGetMsrIndexList, &probe) < 0 && errno != E2BIG) {
    return ::testing::AssertionFailure() << Errno("KVM_GET_MSR_INDEX_LIST");
  }
  std::vector<uint8_t> buf(sizeof(Header4C) + probe.n * sizeof(uint32_t), 0);
  std::memcpy(buf.data(), &probe, sizeof(probe));
  if (::ioctl(kvm_fd, kGetMsrIndexList, buf.data()) < 0) {
    return ::testing::AssertionFailure() << Errno("KVM_GET_MSR_INDEX_LIST");
  }
  Header4C h;
  std::memcpy(&h, buf.data(), sizeof(h));
  out->resize(h.n);
  std::memcpy(out->data(), buf.data() + sizeof(Header4C), h.n * sizeof(uint32_t));
  return ::testing::AssertionSuccess();
}

// CPUID.1:ECX[24], the TSC-deadline timer, in a C-layout kvm_cpuid2 buffer.
bool HasTscDeadline(const std::vector<uint8_t>& cpuid) {
  size_t n = (cpuid.size() - sizeof(Header8C)) / sizeof(kvm_cpuid_entry2);
  for (size_t i = 0; i < n; ++i) {
    kvm_cpuid_entry2 e;
    std::memcpy(&e, cpuid.data() + sizeof(Header8C) + i * sizeof(e), sizeof(e));
    if (e.function == 1) return (e.ecx >> 24) & 1;
  }
  return false;
}

struct TestVm {
  UniqueFd vm;
  UniqueFd vcpu;
};

// A VM with an in-kernel irqchip and vCPU 0 carrying the host's supported CPUID.
::testing::AssertionResult CreateVm(int kvm_fd, std::vector<uint8_t> cpuid, TestVm* out) {
  out->vm.Reset(::ioctl(kvm_fd, KVM_CREATE_VM, 0ul));
  if (!out->vm.valid()) return ::testing::AssertionFailure() << Errno("KVM_CREATE_VM");
  if (::ioctl(out->vm.get(), KVM_CREATE_IRQCHIP, 0ul) < 0) {
    return ::testing::AssertionFailure() << Errno("KVM_CREATE_IRQCHIP");
  }
  out->vcpu.Reset(::ioctl(out->vm.get(), KVM_CREATE_VCPU, 0ul));
  if (!out->vcpu.valid()) return ::testing::AssertionFailure() << Errno("KVM_CREATE_VCPU");
  if (::ioctl(out->vcpu.get(), kSetCpuid2, cpuid.data()) < 0) {
    return ::testing::AssertionFailure() << Errno("KVM_SET_CPUID2");
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult GetMsr(int vcpu_fd, uint32_t index, uint64_t* value) {
  uint8_t buf[sizeof(Header8C) + sizeof(kvm_msr_entry)] = {};
  Header8C h{1, 0};
  kvm_msr_entry e{};
  e.index = index;
  std::memcpy(buf, &h, sizeof(h));
  std::memcpy(buf + sizeof(h), &e, sizeof(e));
  int r = ::ioctl(vcpu_fd, kGetMsrs, buf);
  if (r != 1) {
    return ::testing::AssertionFailure() << "KVM_GET_MSRS " << std::hex << index << " returned "
                                         << std::dec << r << ": " << std::strerror(errno);
  }
  std::memcpy(&e, buf + sizeof(h), sizeof(e));
  *value = e.data;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult SetMsr(int vcpu_fd, uint32_t index, uint64_t value) {
  uint8_t buf[sizeof(Header8C) + sizeof(kvm_msr_entry)] = {};
  Header8C h{1, 0};
  kvm_msr_entry e{};
  e.index = index;
  e.data = value;
  std::memcpy(buf, &h, sizeof(h));
  std::memcpy(buf + sizeof(h), &e, sizeof(e));
  int r = ::ioctl(vcpu_fd, kSetMsrs, buf);
  if (r != 1) {
    return ::testing::AssertionFailure() << "KVM_SET_MSRS " << std::hex << index << " returned "
                                         << std::dec << r << ": " << std::strerror(errno);
  }
  return ::testing::AssertionSuccess();
}

bool Contains(const std::vector<uint32_t>& v, uint32_t x) {
  for (uint32_t y : v) if (y == x) return true;
  return false;
}

class VcpuStateKvmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/dev/kvm", F_OK) != 0) GTEST_SKIP() << "/dev/kvm is absent on this host";
    auto kvm = Kvm::Open();
    if (!kvm.ok()) GTEST_SKIP() << "/dev/kvm unusable: " << kvm.status().message();
    kvm_ = std::make_unique<Kvm>(std::move(kvm).value());
    ASSERT_TRUE(SupportedCpuid(kvm_->fd(), &cpuid_));
    ASSERT_TRUE(MsrIndexList(kvm_->fd(), &msr_indices_));
    xsave_size_ = static_cast<size_t>(kvm_->CheckExtension(KVM_CAP_XSAVE2));
  }

  std::unique_ptr<Kvm> kvm_;
  std::vector<uint8_t> cpuid_;  // C-layout kvm_cpuid2
  std::vector<uint32_t> msr_indices_;
  size_t xsave_size_ = 0;
};

// Puts distinctive, valid values into vCPU 0 and the IOAPIC of `vm`. With
// `tsc_deadline`, also arms the LAPIC timer in TSC-deadline mode about six
// minutes ahead and returns the deadline (which restore must bring back: KVM
// drops the MSR unless the LAPIC is already in that mode).
void MakeDistinctive(const TestVm& vm, const std::vector<uint32_t>& msr_indices,
                     bool tsc_deadline, uint64_t* deadline) {
  kvm_regs regs{};
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_GET_REGS, &regs)) << Errno("KVM_GET_REGS");
  regs.rax = 0x1234;
  regs.rbx = 0xdeadbeefcafef00d;
  regs.rsi = 0x5151;
  regs.r15 = 0xf15f15f15;
  regs.rsp = 0x7000;
  regs.rip = 0x100000;
  regs.rflags = 0x2;
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_SET_REGS, &regs)) << Errno("KVM_SET_REGS");

  // 64-bit long mode, as the project's guests use it.
  kvm_sregs sregs{};
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_GET_SREGS, &sregs)) << Errno("KVM_GET_SREGS");
  kvm_segment code{};
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = 0x8;
  code.type = 11;
  code.present = 1;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = 0x10;
  data.type = 3;
  data.l = 0;
  data.db = 1;
  sregs.cs = code;
  sregs.ds = sregs.es = sregs.ss = data;
  sregs.fs = data;
  sregs.fs.base = 0x7f0012345000;
  sregs.gs = data;
  sregs.gs.base = 0x7f0054321000;
  sregs.gdt.base = 0x500;
  sregs.gdt.limit = 0x27;
  sregs.idt.base = 0x600;
  sregs.idt.limit = 0xfff;
  sregs.cr0 = 0x80000011;
  sregs.cr3 = 0x2000;
  sregs.cr4 = 0x20;
  sregs.efer = 0x500;
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_SET_SREGS, &sregs)) << Errno("KVM_SET_SREGS");

  struct {
    uint32_t index;
    uint64_t value;
  } msrs[] = {{kMsrSysenterCs, 0x10},
              {kMsrStar, 0x0023001000000000},
              {kMsrLstar, 0xffffffff81a00000},
              {kMsrSfmask, 0x47700},
              {kMsrKernelGsBase, 0xffff888012345000}};
  for (const auto& m : msrs) {
    if (Contains(msr_indices, m.index)) {
      ASSERT_TRUE(SetMsr(vm.vcpu.get(), m.index, m.value));
    }
  }

  kvm_debugregs dbg{};
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_GET_DEBUGREGS, &dbg)) << Errno("KVM_GET_DEBUGREGS");
  dbg.db[0] = 0x1000;
  dbg.db[3] = 0x3000;
  dbg.dr7 = 0x401;
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_SET_DEBUGREGS, &dbg)) << Errno("KVM_SET_DEBUGREGS");

  kvm_lapic_state lapic{};
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_GET_LAPIC, &lapic)) << Errno("KVM_GET_LAPIC");
  uint32_t tpr = 0x40;
  std::memcpy(lapic.regs + 0x80, &tpr, sizeof(tpr));  // task priority register
  if (tsc_deadline) {
    uint32_t lvtt = kLvttTscDeadline | 0xec;
    std::memcpy(lapic.regs + kLapicLvtt, &lvtt, sizeof(lvtt));
  }
  ASSERT_EQ(0, ::ioctl(vm.vcpu.get(), KVM_SET_LAPIC, &lapic)) << Errno("KVM_SET_LAPIC");
  *deadline = 0;
  if (tsc_deadline) {
    uint64_t tsc = 0;
    ASSERT_TRUE(GetMsr(vm.vcpu.get(), kMsrTsc, &tsc));
    *deadline = tsc + 1'000'000'000'000;  // far enough not to fire, near enough for KVM's ns math
    ASSERT_TRUE(SetMsr(vm.vcpu.get(), kMsrTscDeadline, *deadline));
    uint64_t readback = 0;
    ASSERT_TRUE(GetMsr(vm.vcpu.get(), kMsrTscDeadline, &readback));
    ASSERT_EQ(readback, *deadline) << "KVM did not take the TSC deadline on the source";
  }

  kvm_irqchip ioapic{};
  ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
  ASSERT_EQ(0, ::ioctl(vm.vm.get(), KVM_GET_IRQCHIP, &ioapic)) << Errno("KVM_GET_IRQCHIP");
  ioapic.chip.ioapic.redirtbl[5].bits = 0x10045;  // vector 0x45, masked
  ASSERT_EQ(0, ::ioctl(vm.vm.get(), KVM_SET_IRQCHIP, &ioapic)) << Errno("KVM_SET_IRQCHIP");
}

TEST_F(VcpuStateKvmTest, CaptureEncodeDecodeRestoreRoundTrip) {
  TestVm src;
  ASSERT_TRUE(CreateVm(kvm_->fd(), cpuid_, &src));
  const bool tsc_deadline = HasTscDeadline(cpuid_) && Contains(msr_indices_, kMsrTscDeadline);
  uint64_t deadline = 0;
  MakeDistinctive(src, msr_indices_, tsc_deadline, &deadline);
  if (HasFatalFailure()) return;
  if (!tsc_deadline) {
    std::printf("[   INFO   ] no TSC-deadline timer here: that restore path is untested\n");
  }

  MachineState captured;
  auto vm_state = CaptureVmState(src.vm.get(), src.vcpu.get(), true);
  ASSERT_TRUE(vm_state.ok()) << vm_state.status().message();
  captured.vm = *vm_state;
  auto vcpu_state = CaptureVcpuState(src.vcpu.get(), 0, msr_indices_, true, xsave_size_);
  ASSERT_TRUE(vcpu_state.ok()) << vcpu_state.status().message();
  captured.vcpus.push_back(*vcpu_state);

  const VcpuState& c = captured.vcpus[0];
  EXPECT_EQ(c.regs.rax, 0x1234u);
  EXPECT_EQ(c.regs.rip, 0x100000u);
  EXPECT_EQ(c.sregs.efer & 0x500, 0x500u);
  EXPECT_EQ(c.msrs.size(), msr_indices_.size());
  EXPECT_TRUE(c.lapic.has_value());
  EXPECT_GE(c.xsave.size(), 4096u);
  EXPECT_GT(captured.vm.tsc_khz, 0u);
  EXPECT_EQ(captured.vm.ioapic.chip.ioapic.redirtbl[5].bits, 0x10045u);

  std::vector<uint8_t> bytes = EncodeMachineState(captured);
  auto decoded = DecodeMachineState(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status().message();
  ExpectMachineStateEq(captured, *decoded);

  TestVm dst;
  ASSERT_TRUE(CreateVm(kvm_->fd(), cpuid_, &dst));
  Status s = RestoreVmState(dst.vm.get(), decoded->vm);
  ASSERT_TRUE(s.ok()) << s.message();
  s = RestoreVcpuState(dst.vcpu.get(), decoded->vcpus[0]);
  ASSERT_TRUE(s.ok()) << s.message();

  auto again_vm = CaptureVmState(dst.vm.get(), dst.vcpu.get(), true);
  ASSERT_TRUE(again_vm.ok()) << again_vm.status().message();
  auto again = CaptureVcpuState(dst.vcpu.get(), 0, msr_indices_, true, xsave_size_);
  ASSERT_TRUE(again.ok()) << again.status().message();
  const VcpuState& a = *again;

  ExpectRegsEq(c.regs, a.regs, "regs");
  ExpectSregsEq(c.sregs, a.sregs, "sregs");
  ExpectFpuEq(c.fpu, a.fpu, "fpu");
  EXPECT_EQ(c.xsave, a.xsave) << "xsave";
  EXPECT_EQ(c.has_xcrs, a.has_xcrs);
  ExpectXcrsEq(c.xcrs, a.xcrs, "xcrs");
  ExpectEventsEq(c.events, a.events, "events");
  EXPECT_EQ(c.mp_state.mp_state, a.mp_state.mp_state);
  ExpectDebugregsEq(c.debugregs, a.debugregs, "debugregs");
  ASSERT_TRUE(a.lapic.has_value());
  // The LAPIC page must match except the timer's current count (0x390),
  // which KVM computes at read time.
  for (size_t off = 0; off < sizeof(kvm_lapic_state); off += 4) {
    if (off == 0x390) continue;
    uint32_t x, y;
    std::memcpy(&x, c.lapic->regs + off, 4);
    std::memcpy(&y, a.lapic->regs + off, 4);
    EXPECT_EQ(x, y) << "lapic register " << FormatHex(off);
  }

  // MSRs: every value back as it was, except the TSC, which kept counting
  // between the restore and the re-capture.
  ASSERT_EQ(c.msrs.size(), a.msrs.size());
  std::string mismatches;
  for (size_t i = 0; i < c.msrs.size(); ++i) {
    ASSERT_EQ(c.msrs[i].index, a.msrs[i].index);
    if (c.msrs[i].index == kMsrTsc) {
      EXPECT_GE(a.msrs[i].data, c.msrs[i].data);
      EXPECT_LT(a.msrs[i].data - c.msrs[i].data, uint64_t{captured.vm.tsc_khz} * 1000 * 10)
          << "TSC moved by more than 10 s across the restore";
      continue;
    }
    if (c.msrs[i].data != a.msrs[i].data) {
      mismatches += " MSR " + FormatHex(c.msrs[i].index) + ": " + FormatHex(c.msrs[i].data) + " -> " +
                    FormatHex(a.msrs[i].data);
    }
  }
  EXPECT_TRUE(mismatches.empty()) << "MSRs changed across restore:" << mismatches;
  for (const auto& e : a.msrs) {
    if (e.index == kMsrLstar) {
      EXPECT_EQ(e.data, 0xffffffff81a00000u);
    }
    if (e.index == kMsrKernelGsBase) {
      EXPECT_EQ(e.data, 0xffff888012345000u);
    }
    if (e.index == kMsrTscDeadline && tsc_deadline) {
      EXPECT_EQ(e.data, deadline) << "TSC deadline lost across restore";
    }
  }

  // VM: the irqchips as captured, the clock resumed from the captured value.
  ExpectIrqchipEq(captured.vm.pic_master, again_vm->pic_master, "pic_master");
  ExpectIrqchipEq(captured.vm.pic_slave, again_vm->pic_slave, "pic_slave");
  ExpectIrqchipEq(captured.vm.ioapic, again_vm->ioapic, "ioapic");
  EXPECT_GE(again_vm->clock.clock, captured.vm.clock.clock);
  EXPECT_LT(again_vm->clock.clock - captured.vm.clock.clock, uint64_t{10'000'000'000})
      << "kvmclock jumped by more than 10 s";
  EXPECT_EQ(again_vm->tsc_khz, captured.vm.tsc_khz);
}

TEST_F(VcpuStateKvmTest, MsrFailuresNameTheMsr) {
  TestVm vm;
  ASSERT_TRUE(CreateVm(kvm_->fd(), cpuid_, &vm));
  ASSERT_FALSE(msr_indices_.empty());
  constexpr uint32_t kBogus = 0xdeadbeef;  // no such MSR

  std::vector<uint32_t> indices = {msr_indices_[0], kBogus, msr_indices_.back()};
  auto c = CaptureVcpuState(vm.vcpu.get(), 0, indices, true, xsave_size_);
  ASSERT_FALSE(c.ok());
  const std::string& m = c.status().message();
  EXPECT_NE(m.find("KVM_GET_MSRS (vcpu 0)"), std::string::npos) << m;
  EXPECT_NE(m.find("read 1 of 3"), std::string::npos) << m;
  EXPECT_NE(m.find("0xdeadbeef"), std::string::npos) << m;

  auto good = CaptureVcpuState(vm.vcpu.get(), 0, msr_indices_, true, xsave_size_);
  ASSERT_TRUE(good.ok()) << good.status().message();
  VcpuState bad = *good;
  bad.msrs.insert(bad.msrs.begin() + 1, kvm_msr_entry{.index = kBogus, .reserved = 0, .data = 1});
  Status s = RestoreVcpuState(vm.vcpu.get(), bad);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("KVM_SET_MSRS (vcpu 0)"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("set 1 of"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("0xdeadbeef"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace pmlmig::vmm
