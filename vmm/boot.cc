#include "pmlmig/vmm/boot.h"

#include <linux/kvm.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ioctl.h"
#include "pmlmig/base/units.h"
#include "pmlmig/vmm/fill.h"

extern "C" const uint8_t pmlmig_guest_image_begin[];
extern "C" const uint8_t pmlmig_guest_image_end[];

namespace pmlmig::vmm {
namespace {

constexpr uint64_t kCr0PE = 1ull << 0, kCr0ET = 1ull << 4, kCr0PG = 1ull << 31;
constexpr uint64_t kCr4PAE = 1ull << 5;
constexpr uint64_t kEferLME = 1ull << 8, kEferLMA = 1ull << 10;
constexpr uint64_t kPtePresent = 1, kPteWrite = 2, kPteHuge = 0x80;
constexpr uint64_t kTssGpa = 0x3000;  // an unused page of the reserved area

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// hot_pages of the boot parameters: hotset's hot pages, seq's swept pages.
uint64_t HotPages(const WorkloadSpec& spec, uint64_t share_pages) {
  const uint64_t hot = static_cast<uint64_t>(std::llround(spec.hot_fraction * static_cast<double>(share_pages)));
  return hot == 0 && share_pages != 0 ? 1 : hot;
}

kvm_segment Segment(uint16_t selector, uint8_t type, bool code64) {
  kvm_segment s{};
  s.base = 0;
  s.limit = 0xffffffff;
  s.selector = selector;
  s.type = type;
  s.present = 1;
  s.dpl = 0;
  s.db = code64 ? 0 : 1;
  s.s = 1;
  s.l = code64 ? 1 : 0;
  s.g = 1;
  return s;
}

}  // namespace

std::span<const uint8_t> GuestImage() {
  return {pmlmig_guest_image_begin, static_cast<size_t>(pmlmig_guest_image_end - pmlmig_guest_image_begin)};
}

uint64_t GuestLayout::PageGpa(uint64_t index) const {
  const uint64_t r0 = ranges[0].pages;
  return index < r0 ? ranges[0].gpa + (index << 12) : ranges[1].gpa + ((index - r0) << 12);
}

Result<GuestLayout> ComputeGuestLayout(const GuestMemory& memory, uint32_t vcpus) {
  if (vcpus == 0 || vcpus > PMLMIG_MAX_VCPUS) {
    return InvalidArgument("vcpu count " + std::to_string(vcpus) + " is outside 1.." +
                           std::to_string(PMLMIG_MAX_VCPUS));
  }
  GuestLayout l;
  l.page_directories = static_cast<uint32_t>((memory.gpa_end() + kGiB - 1) / kGiB);
  l.workload_start = AlignUp(PMLMIG_PAGE_TABLE_GPA + (2ull + l.page_directories) * PMLMIG_PAGE_SIZE, 0x10000);
  const MemoryRegion& low = memory.regions()[0];
  if (l.workload_start >= low.size) {
    return InvalidArgument("memory size " + FormatBytes(memory.size()) + " leaves no room for the workload");
  }
  l.ranges.push_back({l.workload_start, (low.size - l.workload_start) / PMLMIG_PAGE_SIZE});
  for (size_t i = 1; i < memory.regions().size(); ++i) {
    l.ranges.push_back({memory.regions()[i].gpa, memory.regions()[i].size / PMLMIG_PAGE_SIZE});
  }
  for (const pmlmig_range& r : l.ranges) l.total_pages += r.pages;
  if (l.total_pages < vcpus) {
    return InvalidArgument("memory size " + FormatBytes(memory.size()) + " is too small for " +
                           std::to_string(vcpus) + " vCPUs");
  }
  for (uint32_t i = 0; i < vcpus; ++i) {
    const uint64_t first = l.total_pages * i / vcpus;
    const uint64_t end = l.total_pages * (i + 1) / vcpus;
    l.shares.push_back({first, end - first});
  }
  return l;
}

const WorkloadSpec& TestGuestConfig::WorkloadOf(uint32_t vcpu) const {
  const auto it = vcpu_workloads.find(vcpu);
  return it == vcpu_workloads.end() ? workload : it->second;
}

uint64_t PagesWrittenInto(const WorkloadSpec& spec, uint64_t share_pages) {
  if (spec.kind == PMLMIG_WORKLOAD_IDLE) return 0;
  if (spec.kind != PMLMIG_WORKLOAD_SEQ) return share_pages;
  // As the guest's seq loop bounds its sweep.
  const uint64_t span = HotPages(spec, share_pages);
  return span != 0 && span < share_pages ? span : share_pages;
}

Status PrepareTestGuest(const GuestMemory& memory, const TestGuestConfig& config) {
  PMLMIG_ASSIGN_OR_RETURN(GuestLayout layout, ComputeGuestLayout(memory, config.vcpus));
  if (!config.vcpu_workloads.empty() && config.vcpu_workloads.rbegin()->first >= config.vcpus) {
    return InvalidArgument("workload override for vCPU " + std::to_string(config.vcpu_workloads.rbegin()->first) +
                           " of a VM with " + std::to_string(config.vcpus) + " vCPUs");
  }
  const std::span<const uint8_t> image = GuestImage();
  if (image.size() > PMLMIG_IMAGE_MAX) return Internal("guest image larger than 64 KiB");

  // 1. The fill: only the workload area; zero fill is the memfd's own zeros,
  //    so untouched memory stays unallocated.
  if (config.fill == FillMode::kRandom) {
    tbb::parallel_for(tbb::blocked_range<uint64_t>(0, layout.total_pages, 256),
                      [&](const tbb::blocked_range<uint64_t>& r) {
                        for (uint64_t i = r.begin(); i != r.end(); ++i) {
                          const uint64_t gpa = layout.PageGpa(i);
                          FillPage(config.seed, gpa >> 12, memory.HostAddress(gpa, PMLMIG_PAGE_SIZE));
                        }
                      });
  }

  // 2. Identity map with 2 MiB pages over the whole guest-physical range.
  auto* pml4 = reinterpret_cast<uint64_t*>(memory.HostAddress(PMLMIG_PAGE_TABLE_GPA, PMLMIG_PAGE_SIZE));
  const uint64_t pdpt_gpa = PMLMIG_PAGE_TABLE_GPA + PMLMIG_PAGE_SIZE;
  auto* pdpt = reinterpret_cast<uint64_t*>(memory.HostAddress(pdpt_gpa, PMLMIG_PAGE_SIZE));
  pml4[0] = pdpt_gpa | kPtePresent | kPteWrite;
  for (uint32_t g = 0; g < layout.page_directories; ++g) {
    const uint64_t pd_gpa = pdpt_gpa + (1ull + g) * PMLMIG_PAGE_SIZE;
    auto* pd = reinterpret_cast<uint64_t*>(memory.HostAddress(pd_gpa, PMLMIG_PAGE_SIZE));
    pdpt[g] = pd_gpa | kPtePresent | kPteWrite;
    for (uint64_t j = 0; j < 512; ++j) {
      pd[j] = (static_cast<uint64_t>(g) * kGiB + j * 2 * kMiB) | kPtePresent | kPteWrite | kPteHuge;
    }
  }

  // 3. GDT: null, 64-bit code (0x08), data (0x10), 64-bit TSS (0x18, two slots).
  auto* gdt = reinterpret_cast<uint64_t*>(memory.HostAddress(PMLMIG_GDT_GPA, PMLMIG_PAGE_SIZE));
  gdt[0] = 0;
  gdt[1] = 0x00af9b000000ffffull;
  gdt[2] = 0x00cf93000000ffffull;
  gdt[3] = 0x0000890000000067ull | ((kTssGpa & 0xffffff) << 16) | ((kTssGpa >> 24 & 0xff) << 56);
  gdt[4] = kTssGpa >> 32;

  // 4. Boot parameters.
  auto* bp = reinterpret_cast<pmlmig_boot_params*>(memory.HostAddress(PMLMIG_BOOT_PARAMS_GPA, PMLMIG_PAGE_SIZE));
  std::memset(bp, 0, sizeof *bp);
  bp->magic = PMLMIG_BOOT_MAGIC;
  bp->version = PMLMIG_BOOT_VERSION;
  bp->num_vcpus = config.vcpus;
  bp->num_ranges = static_cast<uint32_t>(layout.ranges.size());
  for (size_t i = 0; i < layout.ranges.size(); ++i) bp->ranges[i] = layout.ranges[i];
  for (uint32_t i = 0; i < config.vcpus; ++i) {
    // Each vCPU keeps its equal share whatever it runs; only what it does
    // inside the share is its own.
    const WorkloadSpec& w = config.WorkloadOf(i);
    pmlmig_vcpu_params& v = bp->vcpu[i];
    v.first_page = w.kind == PMLMIG_WORKLOAD_IDLE ? 0 : layout.shares[i].first_page;
    v.pages = w.kind == PMLMIG_WORKLOAD_IDLE ? 0 : layout.shares[i].pages;
    v.hot_pages = HotPages(w, v.pages);
    v.seed = SplitMix(config.seed + i) | 1;
    v.workload = w.kind;
    const double share = std::ldexp(w.hot_share, 32);
    v.hot_share = share >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(share);
    // About 200 pacing exits a second: fine-grained enough to be smooth, few
    // enough not to slow an emulated guest.
    v.throttle_batch = w.rate == 0 ? 0 : static_cast<uint32_t>(std::max<uint64_t>(1, w.rate / 200));
  }

  // 5. The program.
  std::memcpy(memory.HostAddress(PMLMIG_IMAGE_GPA, image.size()), image.data(), image.size());
  return Status::Ok();
}

Status SetBootRegisters(const Vcpu& vcpu) {
  kvm_sregs sregs{};
  PMLMIG_KVM_OR_RETURN(vcpu.fd(), KVM_GET_SREGS, &sregs, vcpu.name());
  sregs.cs = Segment(0x08, 11, true);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = Segment(0x10, 3, false);
  sregs.tr = kvm_segment{};
  sregs.tr.base = kTssGpa;
  sregs.tr.limit = 0x67;
  sregs.tr.selector = 0x18;
  sregs.tr.type = 11;  // busy 64-bit TSS
  sregs.tr.present = 1;
  sregs.ldt = kvm_segment{};
  sregs.ldt.type = 2;
  sregs.ldt.present = 1;
  sregs.ldt.unusable = 1;
  sregs.gdt.base = PMLMIG_GDT_GPA;
  sregs.gdt.limit = 5 * 8 - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;  // no IDT: any exception is a triple fault, i.e. a SHUTDOWN exit
  sregs.cr0 = kCr0PE | kCr0ET | kCr0PG;
  sregs.cr3 = PMLMIG_PAGE_TABLE_GPA;
  sregs.cr4 = kCr4PAE;
  sregs.efer = kEferLME | kEferLMA;
  PMLMIG_KVM_OR_RETURN(vcpu.fd(), KVM_SET_SREGS, &sregs, vcpu.name());

  kvm_regs regs{};
  regs.rip = PMLMIG_IMAGE_GPA;
  // As if called: rsp + 8 is 16-byte aligned at the entry point.
  regs.rsp = PMLMIG_STACK_GPA + (vcpu.id() + 1ull) * PMLMIG_STACK_SIZE - 8;
  regs.rdi = vcpu.id();
  regs.rsi = PMLMIG_BOOT_PARAMS_GPA;
  regs.rflags = 2;  // reserved bit; interrupts off
  PMLMIG_KVM_OR_RETURN(vcpu.fd(), KVM_SET_REGS, &regs, vcpu.name());

  // With an in-kernel LAPIC, application processors start waiting for
  // INIT/SIPI; every vCPU of the test guest starts at the entry point.
  kvm_mp_state mp{KVM_MP_STATE_RUNNABLE};
  PMLMIG_KVM_OR_RETURN(vcpu.fd(), KVM_SET_MP_STATE, &mp, vcpu.name());
  return Status::Ok();
}

}  // namespace pmlmig::vmm
