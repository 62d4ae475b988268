// Capture and restore of a VM's architectural state through KVM ioctls, and
// the machine-state wire format that carries it from source to destination.
//
// This file owns the format below. It must never trust its input: the decoder
// runs on bytes from the network and must reject, never crash, on anything.
//
// ===================== Machine state format, version 1 =====================
//
// All integers are little-endian and unaligned. Structs are never copied as
// memory images: every field is written on its own, so the format does not
// depend on compiler padding or on the kernel header version. Padding and
// reserved fields of the KVM structs are not carried; the decoder leaves them
// zero (KVM requires that of the reserved ones). The two hardware-defined
// blocks (the XSAVE image and the local APIC register page) and the irqchip
// unions are carried as opaque bytes.
//
//   Header (16 bytes)
//     8  magic            "PMLMIGMS" (50 4d 4c 4d 49 47 4d 53)
//     u32 version          1
//     u32 flags            reserved, must be 0
//
//   VM section
//     u64 clock.clock      KVM_GET_CLOCK, guest nanoseconds
//     u32 clock.flags      as KVM reported them (informational; see Restore)
//     u64 clock.realtime   host CLOCK_REALTIME ns when KVM_CLOCK_REALTIME set
//     u64 clock.host_tsc   host TSC when KVM_CLOCK_HOST_TSC set
//     u32 tsc_khz          KVM_GET_TSC_KHZ of vCPU 0 (0 = unknown)
//     u8  irqchip          0 or 1
//     if irqchip, three chips in this order, chip_id 0 (PIC master),
//     1 (PIC slave), 2 (IOAPIC):
//       u32 chip_id
//       512 bytes           kvm_irqchip.chip, as KVM lays out kvm_pic_state /
//                           kvm_ioapic_state on x86-64 (little-endian)
//
//   vCPU section
//     u32 vcpu_count       at most 1024
//     vcpu_count records, each:
//       u32 id             unique within the state
//       regs       18 x u64: rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11
//                  r12 r13 r14 r15 rip rflags
//       sregs      8 segments cs ds es fs gs ss tr ldt, each 23 bytes:
//                    u64 base, u32 limit, u16 selector, then u8 each: type
//                    present dpl db s l g avl unusable
//                  2 descriptor tables gdt idt, each: u64 base, u16 limit
//                  u64 cr0 cr2 cr3 cr4 cr8 efer apic_base
//                  4 x u64 interrupt_bitmap
//       fpu        128 bytes fpr (8 registers x 16 bytes), u16 fcw, u16 fsw,
//                  u8 ftwx, u16 last_opcode, u64 last_ip, u64 last_dp,
//                  256 bytes xmm (16 x 16 bytes), u32 mxcsr
//       xsave      u32 size (0, or 4096 .. 1 MiB), then size bytes: the
//                  KVM_GET_XSAVE(2) image (hardware XSAVE layout)
//       xcrs       u8 has_xcrs (0 or 1); if 1: u32 nr_xcrs (at most 16),
//                  u32 flags, nr_xcrs x { u32 xcr, u64 value }
//       msrs       u32 count (at most 4096), count x { u32 index, u64 data }
//       lapic      u8 present (0 or 1); if 1: u32 size (must be 1024), then
//                  the 1024-byte KVM_GET_LAPIC register page
//       events     exception: u8 injected, u8 nr, u8 has_error_code,
//                    u8 pending, u32 error_code
//                  interrupt: u8 injected, u8 nr, u8 soft, u8 shadow
//                  nmi: u8 injected, u8 pending, u8 masked
//                  u32 sipi_vector, u32 flags
//                  smi: u8 smm, u8 pending, u8 smm_inside_nmi, u8 latched_init
//                  u8 triple_fault.pending, u8 exception_has_payload,
//                  u64 exception_payload
//       u32 mp_state
//       debugregs  u64 db0 db1 db2 db3 dr6 dr7 flags
//
//   Nothing may follow the last vCPU record.
//
// The decoder rejects, with the byte offset and the field it was reading:
// a short or wrong magic, a version other than 1, nonzero header flags,
// truncation anywhere, a boolean byte other than 0 or 1, irqchip chip ids out
// of order, more than 1024 vCPUs, duplicate vCPU ids, an XSAVE size that is
// nonzero and below 4096 or above 1 MiB, more than 16 XCRs, more than 4096
// MSRs, a LAPIC size other than 1024, a vCPU without a LAPIC in a VM with an
// in-kernel irqchip, and trailing bytes.
//
// The encoder writes at most 16 XCRs (KVM_MAX_XCRS) whatever nr_xcrs says;
// it does not enforce the other limits, so a state beyond them encodes but
// does not decode.
// ===========================================================================

#include "pmlmig/vmm/vcpu_state.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>

#include "ioctl.h"
#include "kvm_abi.h"


namespace pmlmig::vmm {
namespace {

// The C ABI of the MSR and XSAVE ioctls: see kvm_abi.h.
using abi::KvmMsrsHeaderC;
using abi::KvmXsaveC;
using abi::kKvmGetMsrs;
using abi::kKvmSetMsrs;
using abi::kKvmGetXsave;
using abi::kKvmSetXsave;
using abi::kKvmGetXsave2;
static_assert(sizeof(kvm_msr_entry) == 16, "kvm_msr_entry has no flexible array");

constexpr uint8_t kMagic[8] = {'P', 'M', 'L', 'M', 'I', 'G', 'M', 'S'};
constexpr uint32_t kVersion = 1;

constexpr uint32_t kMaxVcpus = 1024;
constexpr uint32_t kMaxMsrs = 4096;
constexpr size_t kLegacyXsaveBytes = 4096;
constexpr size_t kMaxXsaveBytes = 1 << 20;
constexpr size_t kLapicBytes = sizeof(kvm_lapic_state);
constexpr size_t kIrqchipBytes = sizeof(kvm_irqchip{}.chip.dummy);
static_assert(sizeof(KvmXsaveC) == kLegacyXsaveBytes);
static_assert(kLapicBytes == 1024, "KVM_GET_LAPIC register page is 1 KiB");
static_assert(kIrqchipBytes == 512, "kvm_irqchip.chip is 512 bytes");

// KVM_SET_XSAVE copies the destination vCPU's own XSAVE size from userspace,
// which may exceed the size the source captured (a dynamic feature enabled
// only on the destination). Restores pass a zero-padded buffer at least this
// large so the kernel never reads past it; zero XSTATE_BV bits make the
// padding inert.
constexpr size_t kXsaveRestoreBytes = 64 * 1024;

// KVM ignores a host write of IA32_TSC_DEADLINE unless the LAPIC timer is in
// TSC-deadline mode, which only KVM_SET_LAPIC establishes; so the MSR is
// written again after the LAPIC (QEMU does the same).
constexpr uint32_t kMsrTscDeadline = 0x6e0;

// KVM's own tolerance for a TSC frequency it will run without scaling
// (kvm.tsc_tolerance_ppm's default).
constexpr uint64_t kTscTolerancePpm = 250;

constexpr uint32_t kEventFlagsKnown =
    KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR | KVM_VCPUEVENT_VALID_SHADOW |
    KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT;

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

std::string VcpuName(uint32_t id) { return "vcpu " + std::to_string(id); }

// ---------------------------------------------------------------------------
// MSR ioctls: both KVM_GET_MSRS and KVM_SET_MSRS return how many entries they
// processed and stop at the first they cannot; anything short is an error
// that names that MSR.

// A KVM_GET/SET_MSRS argument in the C layout: the 8-byte header, then the
// 16-byte entries.
class MsrBuffer {
 public:
  explicit MsrBuffer(size_t n)
      : bytes_(sizeof(KvmMsrsHeaderC) + n * sizeof(kvm_msr_entry), 0) {
    KvmMsrsHeaderC h{static_cast<uint32_t>(n), 0};
    std::memcpy(bytes_.data(), &h, sizeof(h));
  }
  void* data() { return bytes_.data(); }
  void Put(size_t i, uint32_t index, uint64_t value) {
    kvm_msr_entry e{};
    e.index = index;
    e.data = value;
    std::memcpy(bytes_.data() + Offset(i), &e, sizeof(e));
  }
  kvm_msr_entry Get(size_t i) const {
    kvm_msr_entry e{};
    std::memcpy(&e, bytes_.data() + Offset(i), sizeof(e));
    e.reserved = 0;
    return e;
  }

 private:
  static size_t Offset(size_t i) { return sizeof(KvmMsrsHeaderC) + i * sizeof(kvm_msr_entry); }
  std::vector<uint8_t> bytes_;
};

Status GetMsrs(int vcpu_fd, const std::string& obj, const std::vector<uint32_t>& indices,
               std::vector<kvm_msr_entry>* out) {
  out->clear();
  if (indices.empty()) return Status::Ok();
  MsrBuffer buf(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) buf.Put(i, indices[i], 0);
  auto r = KvmIoctl(vcpu_fd, kKvmGetMsrs, buf.data(), "KVM_GET_MSRS", obj);
  if (!r.ok()) return r.status();
  size_t got = static_cast<size_t>(*r);
  if (got < indices.size()) {
    return Internal("KVM_GET_MSRS (" + obj + "): read " + std::to_string(got) + " of " +
                    std::to_string(indices.size()) + " MSRs; MSR " + Hex(indices[got]) +
                    " could not be read");
  }
  out->resize(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) (*out)[i] = buf.Get(i);
  return Status::Ok();
}

// Sets every MSR of `msrs`. One KVM refuses is accepted only when this vCPU
// already holds the captured value (KVM refuses some writes outright on a
// VM without an in-kernel irqchip, such as MSR_KVM_ASYNC_PF_INT, even of
// the reset value 0): not writing it then changes nothing. Any other
// refusal is an error naming the MSR and both values.
Status SetMsrs(int vcpu_fd, const std::string& obj, const std::vector<kvm_msr_entry>& msrs) {
  size_t next = 0;
  while (next < msrs.size()) {
    const size_t n = msrs.size() - next;
    MsrBuffer buf(n);
    for (size_t i = 0; i < n; ++i) buf.Put(i, msrs[next + i].index, msrs[next + i].data);
    auto r = KvmIoctl(vcpu_fd, kKvmSetMsrs, buf.data(), "KVM_SET_MSRS", obj);
    if (!r.ok()) return r.status();
    next += std::min(static_cast<size_t>(*r), n);
    if (next == msrs.size()) break;
    const kvm_msr_entry& refused = msrs[next];
    std::vector<kvm_msr_entry> here;
    const Status read = GetMsrs(vcpu_fd, obj, {refused.index}, &here);
    if (!read.ok() || here[0].data != refused.data) {
      return Internal("KVM_SET_MSRS (" + obj + "): set " + std::to_string(next) + " of " +
                      std::to_string(msrs.size()) + " MSRs; KVM refused MSR " + Hex(refused.index) + " = " +
                      Hex(refused.data) +
                      (read.ok() ? " (it holds " + Hex(here[0].data) + " here)"
                                 : " (and cannot read it: " + read.message() + ")"));
    }
    ++next;  // already holds the captured value
  }
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// Capture and restore.

Result<VcpuState> CaptureVcpuState(int vcpu_fd, uint32_t id,
                                   const std::vector<uint32_t>& msr_indices, bool irqchip,
                                   size_t xsave_size) {
  const std::string obj = VcpuName(id);
  VcpuState s;
  s.id = id;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_REGS, &s.regs, obj);
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_SREGS, &s.sregs, obj);
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_FPU, &s.fpu, obj);

  if (xsave_size > kLegacyXsaveBytes) {
    if (xsave_size > kMaxXsaveBytes) {
      return InvalidArgument("KVM_GET_XSAVE2 (" + obj + "): XSAVE size " +
                             std::to_string(xsave_size) + " exceeds the format's limit of " +
                             std::to_string(kMaxXsaveBytes) + " bytes");
    }
    s.xsave.assign(xsave_size, 0);
    auto r = KvmIoctl(vcpu_fd, kKvmGetXsave2, s.xsave.data(), "KVM_GET_XSAVE2", obj);
    if (!r.ok()) return r.status();
  } else {
    s.xsave.assign(kLegacyXsaveBytes, 0);
    auto r = KvmIoctl(vcpu_fd, kKvmGetXsave, s.xsave.data(), "KVM_GET_XSAVE", obj);
    if (!r.ok()) return r.status();
  }

  // KVM reports nr_xcrs = 0 (and succeeds) on hosts without XSAVE.
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_XCRS, &s.xcrs, obj);
  s.has_xcrs = s.xcrs.nr_xcrs > 0;
  if (s.xcrs.nr_xcrs > KVM_MAX_XCRS) {
    return Internal("KVM_GET_XCRS (" + obj + "): KVM reported " + std::to_string(s.xcrs.nr_xcrs) +
                    " XCRs, more than KVM_MAX_XCRS");
  }

  PMLMIG_RETURN_IF_ERROR(GetMsrs(vcpu_fd, obj, msr_indices, &s.msrs));

  // MP_STATE before LAPIC: KVM_GET_MP_STATE first folds pending INIT/SIPI
  // events into the APIC, and the LAPIC page read afterwards agrees with it.
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_MP_STATE, &s.mp_state, obj);
  if (irqchip) {
    kvm_lapic_state lapic{};
    PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_LAPIC, &lapic, obj);
    s.lapic = lapic;
  }
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_VCPU_EVENTS, &s.events, obj);
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_GET_DEBUGREGS, &s.debugregs, obj);
  return s;
}

// The order respects the dependencies QEMU's kvm_arch_put_registers does:
// XCR0 before the system registers (KVM_SET_SREGS checks CR4.OSXSAVE against
// it), system registers before MSRs (EFER and CR4 gate some MSR writes), MSRs
// before the LAPIC, except IA32_TSC_DEADLINE which needs the LAPIC first (see
// kMsrTscDeadline); then MP state, LAPIC, events (a latched INIT lands in the
// LAPIC, so after it) and debug registers.
Status RestoreVcpuState(int vcpu_fd, const VcpuState& state) {
  const std::string obj = VcpuName(state.id);

  kvm_regs regs = state.regs;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_REGS, &regs, obj);

  if (!state.xsave.empty()) {
    if (state.xsave.size() < kLegacyXsaveBytes || state.xsave.size() > kMaxXsaveBytes) {
      return InvalidArgument("KVM_SET_XSAVE (" + obj + "): XSAVE image of " +
                             std::to_string(state.xsave.size()) + " bytes; expected 4096 .. " +
                             std::to_string(kMaxXsaveBytes));
    }
    std::vector<uint8_t> xsave(std::max(state.xsave.size(), kXsaveRestoreBytes), 0);
    std::memcpy(xsave.data(), state.xsave.data(), state.xsave.size());
    auto r = KvmIoctl(vcpu_fd, kKvmSetXsave, xsave.data(), "KVM_SET_XSAVE", obj);
    if (!r.ok()) return r.status();
  } else {
    kvm_fpu fpu = state.fpu;
    PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_FPU, &fpu, obj);
  }

  if (state.has_xcrs) {
    kvm_xcrs xcrs = state.xcrs;
    PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_XCRS, &xcrs, obj);
  }

  kvm_sregs sregs = state.sregs;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_SREGS, &sregs, obj);

  PMLMIG_RETURN_IF_ERROR(SetMsrs(vcpu_fd, obj, state.msrs));

  kvm_mp_state mp = state.mp_state;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_MP_STATE, &mp, obj);

  if (state.lapic) {
    kvm_lapic_state lapic = *state.lapic;
    PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_LAPIC, &lapic, obj);
    for (const kvm_msr_entry& e : state.msrs) {
      if (e.index == kMsrTscDeadline) {
        PMLMIG_RETURN_IF_ERROR(SetMsrs(vcpu_fd, obj, {e}));
        break;
      }
    }
  }

  // NMI_PENDING, SIPI_VECTOR and SHADOW: the captured values are the truth,
  // so always write them. SMM, PAYLOAD and TRIPLE_FAULT only as captured:
  // PAYLOAD and TRIPLE_FAULT are accepted only when the destination VM enabled
  // the same capability (KVM_CAP_EXCEPTION_PAYLOAD, KVM_CAP_X86_TRIPLE_FAULT_EVENT)
  // as the source, and an EINVAL here says it did not. Unknown bits are
  // dropped: the fields they would validate are not carried.
  kvm_vcpu_events events = state.events;
  events.flags = (state.events.flags & kEventFlagsKnown) | KVM_VCPUEVENT_VALID_NMI_PENDING |
                 KVM_VCPUEVENT_VALID_SIPI_VECTOR | KVM_VCPUEVENT_VALID_SHADOW;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_VCPU_EVENTS, &events, obj);

  kvm_debugregs debugregs = state.debugregs;
  PMLMIG_KVM_OR_RETURN(vcpu_fd, KVM_SET_DEBUGREGS, &debugregs, obj);
  return Status::Ok();
}

Result<VmState> CaptureVmState(int vm_fd, int vcpu0_fd, bool irqchip) {
  VmState s;
  PMLMIG_KVM_OR_RETURN(vm_fd, KVM_GET_CLOCK, &s.clock, "vm");
  auto khz = PMLMIG_KVM(vcpu0_fd, KVM_GET_TSC_KHZ, 0ul, "vcpu 0");
  if (!khz.ok()) return khz.status();
  s.tsc_khz = static_cast<uint32_t>(*khz);
  s.irqchip = irqchip;
  if (irqchip) {
    s.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    PMLMIG_KVM_OR_RETURN(vm_fd, KVM_GET_IRQCHIP, &s.pic_master, "vm, PIC master");
    s.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    PMLMIG_KVM_OR_RETURN(vm_fd, KVM_GET_IRQCHIP, &s.pic_slave, "vm, PIC slave");
    s.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    PMLMIG_KVM_OR_RETURN(vm_fd, KVM_GET_IRQCHIP, &s.ioapic, "vm, IOAPIC");
  }
  return s;
}

// The TSC check comes first so a refused restore changes nothing. The clock
// comes last, closest to the moment the vCPUs resume.
//
// Clock: only the value is set, with flags 0, so kvmclock resumes exactly
// where the source paused it and the pause itself is invisible to the guest's
// monotonic clock (as QEMU does by default). KVM_CLOCK_REALTIME would instead
// advance the clock by the host realtime elapsed since capture, which is only
// right when both hosts' realtime clocks are synchronized; it is not used.
Status RestoreVmState(int vm_fd, const VmState& state) {
  if (state.tsc_khz != 0) {
    // The VM-wide KVM_GET_TSC_KHZ (KVM_CAP_VM_TSC_CONTROL, Linux 6.0+) gives
    // the frequency new vCPUs get; on older kernels there is nothing to ask
    // without a vCPU, and the check is skipped.
    auto khz = PMLMIG_KVM(vm_fd, KVM_GET_TSC_KHZ, 0ul, "vm");
    if (khz.ok() && *khz > 0) {
      uint64_t have = static_cast<uint64_t>(*khz);
      uint64_t want = state.tsc_khz;
      uint64_t diff = have > want ? have - want : want - have;
      if (diff * 1000000 > want * kTscTolerancePpm) {
        return Unavailable("TSC frequency mismatch: the source VM ran at " +
                           std::to_string(want) + " kHz, this host's VM runs at " +
                           std::to_string(have) + " kHz (tolerance " +
                           std::to_string(kTscTolerancePpm) +
                           " ppm); the guest's TSC would change rate");
      }
    } else if (!khz.ok() && khz.status().code() != Code::kUnavailable &&
               khz.status().code() != Code::kInvalidArgument) {
      return khz.status();
    }
  }

  if (state.irqchip) {
    struct {
      const kvm_irqchip* chip;
      uint32_t id;
      const char* what;
    } chips[] = {{&state.pic_master, KVM_IRQCHIP_PIC_MASTER, "vm, PIC master"},
                 {&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "vm, PIC slave"},
                 {&state.ioapic, KVM_IRQCHIP_IOAPIC, "vm, IOAPIC"}};
    for (const auto& c : chips) {
      kvm_irqchip chip = *c.chip;
      chip.chip_id = c.id;  // the slot, not the stored value, says which chip it is
      PMLMIG_KVM_OR_RETURN(vm_fd, KVM_SET_IRQCHIP, &chip, c.what);
    }
  }

  kvm_clock_data clock{};
  clock.clock = state.clock.clock;
  PMLMIG_KVM_OR_RETURN(vm_fd, KVM_SET_CLOCK, &clock, "vm");
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Encoding.

namespace {

class Writer {
 public:
  template <typename T>
  void Field(const T& v, const char* /*group*/, const char* /*name*/) {
    static_assert(std::is_integral_v<T> && std::is_unsigned_v<T>);
    for (size_t i = 0; i < sizeof(T); ++i) out_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  void Raw(const void* p, size_t n, const char* /*group*/, const char* /*name*/) {
    const auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  std::vector<uint8_t> Take() { return std::move(out_); }

 private:
  std::vector<uint8_t> out_;
};

// Bounds-checked reader. The first failure is kept; every later read fails
// without touching its output, so decoding code checks ok() only where a
// value decides what to read or allocate next.
class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : b_(b) {}

  template <typename T>
  bool Field(T& v, const char* group, const char* name) {
    static_assert(std::is_integral_v<T> && std::is_unsigned_v<T>);
    if (!Need(sizeof(T), group, name)) return false;
    T x = 0;
    for (size_t i = 0; i < sizeof(T); ++i) {
      x |= static_cast<T>(static_cast<T>(b_[pos_ + i]) << (8 * i));
    }
    v = x;
    pos_ += sizeof(T);
    return true;
  }
  bool Raw(void* p, size_t n, const char* group, const char* name) {
    if (!Need(n, group, name)) return false;
    if (n > 0) std::memcpy(p, b_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool Bool(bool& v, const char* group, const char* name) {
    size_t at = pos_;
    uint8_t x = 0;
    if (!Field(x, group, name)) return false;
    if (x > 1) {
      return FailAt(at, group, name,
                    "invalid boolean " + std::to_string(x) + " (must be 0 or 1)");
    }
    v = x == 1;
    return true;
  }

  // Records `problem` about the field that starts at byte `at`.
  bool FailAt(size_t at, const char* group, const char* name, const std::string& problem) {
    if (!status_.ok()) return false;
    std::string where = context_;
    if (group && *group) where += (where.empty() ? "" : " ") + std::string(group);
    if (name && *name) where += (where.empty() ? "" : ".") + std::string(name);
    status_ = InvalidArgument("machine state: offset " + std::to_string(at) + ": " + where +
                              ": " + problem);
    return false;
  }

  void set_context(std::string c) { context_ = std::move(c); }
  size_t offset() const { return pos_; }
  size_t remaining() const { return b_.size() - pos_; }
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

 private:
  bool Need(size_t n, const char* group, const char* name) {
    if (!status_.ok()) return false;
    if (n > remaining()) {
      return FailAt(pos_, group, name,
                    "truncated: needs " + std::to_string(n) + " bytes, " +
                        std::to_string(remaining()) + " left");
    }
    return true;
  }

  std::span<const uint8_t> b_;
  size_t pos_ = 0;
  Status status_;
  std::string context_;
};

// Fixed-layout structs are described once, as a visit of their fields in wire
// order, and that description drives both the Writer and the Reader. `S` is
// the struct, const when encoding.

template <typename IO, typename S>
void VisitRegs(IO& io, S& r) {
  const char* g = "regs";
  io.Field(r.rax, g, "rax"); io.Field(r.rbx, g, "rbx"); io.Field(r.rcx, g, "rcx");
  io.Field(r.rdx, g, "rdx"); io.Field(r.rsi, g, "rsi"); io.Field(r.rdi, g, "rdi");
  io.Field(r.rsp, g, "rsp"); io.Field(r.rbp, g, "rbp"); io.Field(r.r8, g, "r8");
  io.Field(r.r9, g, "r9");   io.Field(r.r10, g, "r10"); io.Field(r.r11, g, "r11");
  io.Field(r.r12, g, "r12"); io.Field(r.r13, g, "r13"); io.Field(r.r14, g, "r14");
  io.Field(r.r15, g, "r15"); io.Field(r.rip, g, "rip"); io.Field(r.rflags, g, "rflags");
}

template <typename IO, typename S>
void VisitSegment(IO& io, S& s, const char* g) {
  io.Field(s.base, g, "base");
  io.Field(s.limit, g, "limit");
  io.Field(s.selector, g, "selector");
  io.Field(s.type, g, "type");
  io.Field(s.present, g, "present");
  io.Field(s.dpl, g, "dpl");
  io.Field(s.db, g, "db");
  io.Field(s.s, g, "s");
  io.Field(s.l, g, "l");
  io.Field(s.g, g, "g");
  io.Field(s.avl, g, "avl");
  io.Field(s.unusable, g, "unusable");
}

template <typename IO, typename S>
void VisitDtable(IO& io, S& t, const char* g) {
  io.Field(t.base, g, "base");
  io.Field(t.limit, g, "limit");
}

template <typename IO, typename S>
void VisitSregs(IO& io, S& s) {
  VisitSegment(io, s.cs, "sregs.cs");
  VisitSegment(io, s.ds, "sregs.ds");
  VisitSegment(io, s.es, "sregs.es");
  VisitSegment(io, s.fs, "sregs.fs");
  VisitSegment(io, s.gs, "sregs.gs");
  VisitSegment(io, s.ss, "sregs.ss");
  VisitSegment(io, s.tr, "sregs.tr");
  VisitSegment(io, s.ldt, "sregs.ldt");
  VisitDtable(io, s.gdt, "sregs.gdt");
  VisitDtable(io, s.idt, "sregs.idt");
  const char* g = "sregs";
  io.Field(s.cr0, g, "cr0"); io.Field(s.cr2, g, "cr2"); io.Field(s.cr3, g, "cr3");
  io.Field(s.cr4, g, "cr4"); io.Field(s.cr8, g, "cr8"); io.Field(s.efer, g, "efer");
  io.Field(s.apic_base, g, "apic_base");
  static_assert(sizeof(s.interrupt_bitmap) / sizeof(s.interrupt_bitmap[0]) == 4);
  for (auto& w : s.interrupt_bitmap) io.Field(w, g, "interrupt_bitmap");
}

template <typename IO, typename S>
void VisitFpu(IO& io, S& f) {
  const char* g = "fpu";
  static_assert(sizeof(f.fpr) == 128 && sizeof(f.xmm) == 256);
  io.Raw(&f.fpr[0][0], sizeof(f.fpr), g, "fpr");
  io.Field(f.fcw, g, "fcw");
  io.Field(f.fsw, g, "fsw");
  io.Field(f.ftwx, g, "ftwx");
  io.Field(f.last_opcode, g, "last_opcode");
  io.Field(f.last_ip, g, "last_ip");
  io.Field(f.last_dp, g, "last_dp");
  io.Raw(&f.xmm[0][0], sizeof(f.xmm), g, "xmm");
  io.Field(f.mxcsr, g, "mxcsr");
}

template <typename IO, typename S>
void VisitEvents(IO& io, S& e) {
  const char* g = "events";
  io.Field(e.exception.injected, g, "exception.injected");
  io.Field(e.exception.nr, g, "exception.nr");
  io.Field(e.exception.has_error_code, g, "exception.has_error_code");
  io.Field(e.exception.pending, g, "exception.pending");
  io.Field(e.exception.error_code, g, "exception.error_code");
  io.Field(e.interrupt.injected, g, "interrupt.injected");
  io.Field(e.interrupt.nr, g, "interrupt.nr");
  io.Field(e.interrupt.soft, g, "interrupt.soft");
  io.Field(e.interrupt.shadow, g, "interrupt.shadow");
  io.Field(e.nmi.injected, g, "nmi.injected");
  io.Field(e.nmi.pending, g, "nmi.pending");
  io.Field(e.nmi.masked, g, "nmi.masked");
  io.Field(e.sipi_vector, g, "sipi_vector");
  io.Field(e.flags, g, "flags");
  io.Field(e.smi.smm, g, "smi.smm");
  io.Field(e.smi.pending, g, "smi.pending");
  io.Field(e.smi.smm_inside_nmi, g, "smi.smm_inside_nmi");
  io.Field(e.smi.latched_init, g, "smi.latched_init");
  io.Field(e.triple_fault.pending, g, "triple_fault.pending");
  io.Field(e.exception_has_payload, g, "exception_has_payload");
  io.Field(e.exception_payload, g, "exception_payload");
}

template <typename IO, typename S>
void VisitDebugregs(IO& io, S& d) {
  const char* g = "debugregs";
  io.Field(d.db[0], g, "db0"); io.Field(d.db[1], g, "db1");
  io.Field(d.db[2], g, "db2"); io.Field(d.db[3], g, "db3");
  io.Field(d.dr6, g, "dr6");   io.Field(d.dr7, g, "dr7");
  io.Field(d.flags, g, "flags");
}

template <typename IO, typename S>
void VisitClock(IO& io, S& c) {
  const char* g = "vm.clock";
  io.Field(c.clock, g, "clock");
  io.Field(c.flags, g, "flags");
  io.Field(c.realtime, g, "realtime");
  io.Field(c.host_tsc, g, "host_tsc");
}

constexpr const char* kChipNames[3] = {"vm.pic_master", "vm.pic_slave", "vm.ioapic"};

void EncodeVcpu(Writer& w, const VcpuState& v) {
  w.Field(v.id, "", "id");
  VisitRegs(w, v.regs);
  VisitSregs(w, v.sregs);
  VisitFpu(w, v.fpu);

  w.Field(static_cast<uint32_t>(v.xsave.size()), "xsave", "size");
  w.Raw(v.xsave.data(), v.xsave.size(), "xsave", "data");

  w.Field(static_cast<uint8_t>(v.has_xcrs ? 1 : 0), "xcrs", "present");
  if (v.has_xcrs) {
    uint32_t n = std::min<uint32_t>(v.xcrs.nr_xcrs, KVM_MAX_XCRS);
    w.Field(n, "xcrs", "nr_xcrs");
    w.Field(v.xcrs.flags, "xcrs", "flags");
    for (uint32_t i = 0; i < n; ++i) {
      w.Field(v.xcrs.xcrs[i].xcr, "xcrs", "xcr");
      w.Field(v.xcrs.xcrs[i].value, "xcrs", "value");
    }
  }

  w.Field(static_cast<uint32_t>(v.msrs.size()), "msrs", "count");
  for (const kvm_msr_entry& e : v.msrs) {
    w.Field(e.index, "msrs", "index");
    w.Field(e.data, "msrs", "data");
  }

  w.Field(static_cast<uint8_t>(v.lapic ? 1 : 0), "lapic", "present");
  if (v.lapic) {
    w.Field(static_cast<uint32_t>(kLapicBytes), "lapic", "size");
    w.Raw(v.lapic->regs, kLapicBytes, "lapic", "regs");
  }

  VisitEvents(w, v.events);
  w.Field(v.mp_state.mp_state, "", "mp_state");
  VisitDebugregs(w, v.debugregs);
}

Status DecodeVcpu(Reader& r, size_t index, bool vm_irqchip, VcpuState& v) {
  r.set_context("vcpu[" + std::to_string(index) + "]");
  r.Field(v.id, "", "id");
  if (r.ok()) {
    r.set_context("vcpu[" + std::to_string(index) + "] (id " + std::to_string(v.id) + ")");
  }
  VisitRegs(r, v.regs);
  VisitSregs(r, v.sregs);
  VisitFpu(r, v.fpu);

  size_t at = r.offset();
  uint32_t xsave_size = 0;
  if (!r.Field(xsave_size, "xsave", "size")) return r.status();
  if (xsave_size != 0 && (xsave_size < kLegacyXsaveBytes || xsave_size > kMaxXsaveBytes)) {
    r.FailAt(at, "xsave", "size",
             "XSAVE size " + std::to_string(xsave_size) + " outside 4096 .. " +
                 std::to_string(kMaxXsaveBytes) + " (and not 0)");
    return r.status();
  }
  if (xsave_size > r.remaining()) {
    r.FailAt(r.offset(), "xsave", "data",
             "truncated: needs " + std::to_string(xsave_size) + " bytes, " +
                 std::to_string(r.remaining()) + " left");
    return r.status();
  }
  v.xsave.resize(xsave_size);
  r.Raw(v.xsave.data(), xsave_size, "xsave", "data");

  if (!r.Bool(v.has_xcrs, "xcrs", "present")) return r.status();
  if (v.has_xcrs) {
    at = r.offset();
    if (!r.Field(v.xcrs.nr_xcrs, "xcrs", "nr_xcrs")) return r.status();
    if (v.xcrs.nr_xcrs > KVM_MAX_XCRS) {
      r.FailAt(at, "xcrs", "nr_xcrs",
               std::to_string(v.xcrs.nr_xcrs) + " XCRs exceed the limit of " +
                   std::to_string(KVM_MAX_XCRS));
      return r.status();
    }
    r.Field(v.xcrs.flags, "xcrs", "flags");
    for (uint32_t i = 0; i < v.xcrs.nr_xcrs; ++i) {
      r.Field(v.xcrs.xcrs[i].xcr, "xcrs", "xcr");
      r.Field(v.xcrs.xcrs[i].value, "xcrs", "value");
    }
  }

  at = r.offset();
  uint32_t nmsrs = 0;
  if (!r.Field(nmsrs, "msrs", "count")) return r.status();
  if (nmsrs > kMaxMsrs) {
    r.FailAt(at, "msrs", "count",
             "MSR count " + std::to_string(nmsrs) + " exceeds the limit of " +
                 std::to_string(kMaxMsrs));
    return r.status();
  }
  constexpr size_t kMsrWireBytes = 12;
  if (size_t{nmsrs} * kMsrWireBytes > r.remaining()) {
    r.FailAt(r.offset(), "msrs", "entries",
             "truncated: " + std::to_string(nmsrs) + " MSRs need " +
                 std::to_string(size_t{nmsrs} * kMsrWireBytes) + " bytes, " +
                 std::to_string(r.remaining()) + " left");
    return r.status();
  }
  v.msrs.assign(nmsrs, kvm_msr_entry{});
  for (kvm_msr_entry& e : v.msrs) {
    r.Field(e.index, "msrs", "index");
    r.Field(e.data, "msrs", "data");
  }

  bool has_lapic = false;
  at = r.offset();
  if (!r.Bool(has_lapic, "lapic", "present")) return r.status();
  if (has_lapic) {
    at = r.offset();
    uint32_t size = 0;
    if (!r.Field(size, "lapic", "size")) return r.status();
    if (size != kLapicBytes) {
      r.FailAt(at, "lapic", "size",
               "LAPIC size " + std::to_string(size) + ", must be " + std::to_string(kLapicBytes));
      return r.status();
    }
    kvm_lapic_state lapic{};
    if (!r.Raw(lapic.regs, kLapicBytes, "lapic", "regs")) return r.status();
    v.lapic = lapic;
  } else if (vm_irqchip) {
    r.FailAt(at, "lapic", "present",
             "no LAPIC state, but the VM has an in-kernel irqchip (which always has LAPICs)");
    return r.status();
  }

  VisitEvents(r, v.events);
  r.Field(v.mp_state.mp_state, "", "mp_state");
  VisitDebugregs(r, v.debugregs);
  return r.status();
}

}  // namespace

std::vector<uint8_t> EncodeMachineState(const MachineState& state) {
  Writer w;
  w.Raw(kMagic, sizeof(kMagic), "header", "magic");
  w.Field(kVersion, "header", "version");
  w.Field(uint32_t{0}, "header", "flags");

  VisitClock(w, state.vm.clock);
  w.Field(state.vm.tsc_khz, "vm", "tsc_khz");
  w.Field(static_cast<uint8_t>(state.vm.irqchip ? 1 : 0), "vm", "irqchip");
  if (state.vm.irqchip) {
    const kvm_irqchip* chips[3] = {&state.vm.pic_master, &state.vm.pic_slave, &state.vm.ioapic};
    for (uint32_t i = 0; i < 3; ++i) {
      w.Field(i, kChipNames[i], "chip_id");  // the slot defines the chip
      w.Raw(chips[i]->chip.dummy, kIrqchipBytes, kChipNames[i], "chip");
    }
  }

  w.Field(static_cast<uint32_t>(state.vcpus.size()), "", "vcpu_count");
  for (const VcpuState& v : state.vcpus) EncodeVcpu(w, v);
  return w.Take();
}

Result<MachineState> DecodeMachineState(std::span<const uint8_t> bytes) {
  Reader r(bytes);
  MachineState state;

  uint8_t magic[sizeof(kMagic)] = {};
  if (!r.Raw(magic, sizeof(magic), "header", "magic")) return r.status();
  if (std::memcmp(magic, kMagic, sizeof(kMagic)) != 0) {
    r.FailAt(0, "header", "magic", "bad magic (not a pmlmig machine state; expected \"PMLMIGMS\")");
    return r.status();
  }
  size_t at = r.offset();
  uint32_t version = 0;
  if (!r.Field(version, "header", "version")) return r.status();
  if (version != kVersion) {
    r.FailAt(at, "header", "version",
             "unsupported version " + std::to_string(version) + " (this build reads version " +
                 std::to_string(kVersion) + ")");
    return r.status();
  }
  at = r.offset();
  uint32_t flags = 0;
  if (!r.Field(flags, "header", "flags")) return r.status();
  if (flags != 0) {
    r.FailAt(at, "header", "flags", "reserved flags " + Hex(flags) + " set (must be 0)");
    return r.status();
  }

  VisitClock(r, state.vm.clock);
  r.Field(state.vm.tsc_khz, "vm", "tsc_khz");
  if (!r.Bool(state.vm.irqchip, "vm", "irqchip")) return r.status();
  if (state.vm.irqchip) {
    kvm_irqchip* chips[3] = {&state.vm.pic_master, &state.vm.pic_slave, &state.vm.ioapic};
    for (uint32_t i = 0; i < 3; ++i) {
      at = r.offset();
      uint32_t id = 0;
      if (!r.Field(id, kChipNames[i], "chip_id")) return r.status();
      if (id != i) {
        r.FailAt(at, kChipNames[i], "chip_id",
                 "chip id " + std::to_string(id) + ", expected " + std::to_string(i));
        return r.status();
      }
      chips[i]->chip_id = id;
      if (!r.Raw(chips[i]->chip.dummy, kIrqchipBytes, kChipNames[i], "chip")) return r.status();
    }
  }

  at = r.offset();
  uint32_t nvcpus = 0;
  if (!r.Field(nvcpus, "", "vcpu_count")) return r.status();
  if (nvcpus > kMaxVcpus) {
    r.FailAt(at, "", "vcpu_count",
             "vCPU count " + std::to_string(nvcpus) + " exceeds the limit of " +
                 std::to_string(kMaxVcpus));
    return r.status();
  }
  std::unordered_set<uint32_t> ids;
  for (uint32_t i = 0; i < nvcpus; ++i) {
    VcpuState v;
    at = r.offset();
    PMLMIG_RETURN_IF_ERROR(DecodeVcpu(r, i, state.vm.irqchip, v));
    if (!ids.insert(v.id).second) {
      r.set_context("vcpu[" + std::to_string(i) + "]");
      r.FailAt(at, "", "id", "duplicate vCPU id " + std::to_string(v.id));
      return r.status();
    }
    state.vcpus.push_back(std::move(v));
  }
  r.set_context("");

  if (r.remaining() != 0) {
    r.FailAt(r.offset(), "", "end",
             std::to_string(r.remaining()) + " trailing bytes after the last vCPU record");
    return r.status();
  }
  return state;
}

}  // namespace pmlmig::vmm
