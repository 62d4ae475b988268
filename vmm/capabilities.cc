// Host capability probe: what KVM and the kernel offer for dirty tracking and
// state migration, gathered once for `pmlmig probe` and for backend choice.
//
// Every probe here is best effort and side-effect free: a probe that fails
// reports "not available" rather than an error, and every fd and mapping it
// opens is released before ProbeHost returns. Nothing here may change host
// state (no module parameters written, no caps enabled on a VM that outlives
// the probe).
#include "pmlmig/vmm/capabilities.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "ioctl.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/base/units.h"
#include "pmlmig/vmm/kvm.h"

// Debian 12 ships 6.1 uapi headers; these arrived later (values from the
// upstream uapi, ABI-stable).
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
#endif

// userfaultfd and PAGEMAP_SCAN definitions newer than these headers: one copy, shared with engine/.
#include "pmlmig/base/linux_compat.h"

namespace pmlmig::vmm {
namespace {

// The ring caps report bytes; each entry is one struct kvm_dirty_gfn.
constexpr uint32_t kDirtyGfnBytes = 16;
static_assert(sizeof(kvm_dirty_gfn) == kDirtyGfnBytes);

constexpr size_t kProbePages = 4;

size_t PageSize() {
  long ps = ::sysconf(_SC_PAGESIZE);
  return ps > 0 ? static_cast<size_t>(ps) : 4096;
}

// KVM_CHECK_EXTENSION on an arbitrary fd (the VM fd); 0 when unsupported.
int CheckExtensionOn(int fd, long cap) {
  if (fd < 0) return 0;
  int r = ::ioctl(fd, KVM_CHECK_EXTENSION, cap);
  return r < 0 ? 0 : r;
}

// Some caps report their real value only on a VM fd (the dirty ring caps on
// several kernels and backends), so a 0 from the system fd is re-asked on a
// throwaway VM; the larger answer wins.
class CapReader {
 public:
  explicit CapReader(const Kvm& kvm) : kvm_(kvm) {}

  int Get(long cap) {
    int sys = kvm_.CheckExtension(cap);
    if (sys > 0) return sys;
    return std::max(0, CheckExtensionOn(VmFd(), cap));
  }

 private:
  // Created on first need; a failure to create one is remembered so the
  // probe does not retry it for every cap.
  int VmFd() {
    if (!vm_tried_) {
      vm_tried_ = true;
      auto r = PMLMIG_KVM(kvm_.fd(), KVM_CREATE_VM, 0ul, "probe VM");
      if (r.ok()) vm_.Reset(*r);
    }
    return vm_.get();
  }

  const Kvm& kvm_;
  UniqueFd vm_;
  bool vm_tried_ = false;
};

// Reads a one-word sysfs value; nullopt when the file is absent or empty.
std::optional<std::string> ReadWord(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::string word;
  if (!(in >> word)) return std::nullopt;
  return word;
}

std::optional<bool> ProbePml() {
  for (const char* module : {"kvm_intel", "kvm_amd"}) {
    auto v = ReadWord(std::string("/sys/module/") + module + "/parameters/pml");
    if (!v) continue;
    if (*v == "Y" || *v == "y" || *v == "1") return true;
    if (*v == "N" || *v == "n" || *v == "0") return false;
  }
  return std::nullopt;
}

std::string ProbeCpuVendor() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return "unknown";
  // Leaf 0 spells the vendor across EBX, EDX, ECX, in that order.
  char vendor[12];
  std::memcpy(vendor + 0, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::string(vendor, sizeof(vendor));
#else
  return "unknown";
#endif
}

// A small private anonymous mapping with its first page populated, for the
// userspace tracking probes.
Result<Mapping> ProbeMapping() {
  PMLMIG_ASSIGN_OR_RETURN(Mapping m, Mapping::Map(kProbePages * PageSize(), PROT_READ | PROT_WRITE,
                                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
                                                  "capability probe"));
  m.data()[0] = 1;
  return m;
}

// True if PAGEMAP_SCAN is implemented: asks for the present pages of a
// small mapping, which must succeed on any 6.7+ kernel.
bool ProbePagemapScan() {
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap.valid()) return false;
  auto m = ProbeMapping();
  if (!m.ok()) return false;

  page_region regions[kProbePages] = {};
  pm_scan_arg arg{};
  arg.size = sizeof(arg);
  arg.start = reinterpret_cast<uintptr_t>(m->data());
  arg.end = arg.start + m->size();
  arg.vec = reinterpret_cast<uintptr_t>(regions);
  arg.vec_len = kProbePages;
  arg.category_mask = PAGE_IS_PRESENT;
  arg.return_mask = PAGE_IS_PRESENT;
  int r;
  do {
    r = ::ioctl(pagemap.get(), PAGEMAP_SCAN, &arg);
  } while (r < 0 && errno == EINTR);
  return r >= 0;
}

// True if userfaultfd offers asynchronous write protection (WP_ASYNC, the
// kernel resolves WP faults itself and PAGEMAP_SCAN reads the written bit)
// and an anonymous range can actually be registered and write-protected.
bool ProbeUffdWpAsync() {
  UniqueFd uffd(static_cast<int>(
      ::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)));
  if (!uffd.valid() && errno == EINVAL) {
    // Kernels before 5.11 do not know UFFD_USER_MODE_ONLY.
    uffd.Reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  }
  if (!uffd.valid()) return false;

  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
  // A kernel that does not know a requested feature fails with EINVAL.
  if (::ioctl(uffd.get(), UFFDIO_API, &api) < 0) return false;
  if ((api.features & UFFD_FEATURE_WP_ASYNC) == 0) return false;

  auto m = ProbeMapping();
  if (!m.ok()) return false;
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(m->data());
  reg.range.len = m->size();
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (::ioctl(uffd.get(), UFFDIO_REGISTER, &reg) < 0) return false;

  uffdio_writeprotect wp{};
  wp.range = reg.range;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  if (::ioctl(uffd.get(), UFFDIO_WRITEPROTECT, &wp) < 0) return false;
  // Closing the uffd unregisters the range; the mapping goes after it.
  return true;
}

void ProbeUserspace(HostCapabilities& caps) {
  caps.pml = ProbePml();
  caps.cpu_vendor = ProbeCpuVendor();
  caps.pagemap_scan = ProbePagemapScan();
  caps.uffd_wp_async = ProbeUffdWpAsync();
}

// Loaded modules whose name starts with "kvm", sorted; used to explain an
// unknown PML state (e.g. a kvm_pvm host has no pml parameter).
std::vector<std::string> LoadedKvmModules() {
  std::vector<std::string> names;
  DIR* dir = ::opendir("/sys/module");
  if (dir == nullptr) return names;
  while (const dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name.rfind("kvm", 0) == 0) names.push_back(std::move(name));
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string YesNo(bool b) { return b ? "yes" : "no"; }

}  // namespace

HostCapabilities ProbeHost(const Kvm& kvm) {
  HostCapabilities caps;
  caps.kvm = true;
  caps.api_version = kvm.api_version();

  CapReader cap(kvm);
  const int ring_bytes = cap.Get(KVM_CAP_DIRTY_LOG_RING);
  const int ring_acq_rel_bytes = cap.Get(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
  caps.dirty_ring = ring_bytes > 0;
  caps.dirty_ring_acq_rel = ring_acq_rel_bytes > 0;
  caps.dirty_ring_max_bytes = static_cast<uint32_t>(std::max({ring_bytes, ring_acq_rel_bytes, 0}));
  caps.dirty_ring_max_entries = caps.dirty_ring_max_bytes / kDirtyGfnBytes;
  caps.manual_dirty_log_protect2 = cap.Get(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  caps.dirty_ring_with_bitmap = cap.Get(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0;
  caps.nr_vcpus = cap.Get(KVM_CAP_NR_VCPUS);
  caps.max_vcpus = cap.Get(KVM_CAP_MAX_VCPUS);
  caps.max_memslots = cap.Get(KVM_CAP_NR_MEMSLOTS);
  caps.xsave2_size = cap.Get(KVM_CAP_XSAVE2);
  caps.tsc_control = cap.Get(KVM_CAP_TSC_CONTROL) > 0;
  caps.irqchip = cap.Get(KVM_CAP_IRQCHIP) > 0;
  caps.adjust_clock = cap.Get(KVM_CAP_ADJUST_CLOCK) > 0;

  ProbeUserspace(caps);
  return caps;
}

HostCapabilities ProbeHost(const std::string& kvm_path) {
  auto kvm = Kvm::Open(kvm_path);
  if (kvm.ok()) return ProbeHost(*kvm);
  HostCapabilities caps;
  caps.kvm = false;
  caps.kvm_error = kvm.status().message();
  ProbeUserspace(caps);
  return caps;
}

std::string CapabilitiesToJson(const HostCapabilities& caps) {
  // The first ten keys are the documented `pmlmig probe --json` contract, in
  // this order; the rest are informational and may grow.
  nlohmann::ordered_json j;
  j["kvm"] = caps.kvm;
  j["api_version"] = caps.api_version;
  j["dirty_ring_max_entries"] = caps.dirty_ring_max_entries;
  j["dirty_ring_acq_rel"] = caps.dirty_ring_acq_rel;
  j["manual_dirty_log_protect2"] = caps.manual_dirty_log_protect2;
  j["dirty_ring_with_bitmap"] = caps.dirty_ring_with_bitmap;
  j["pml"] = caps.pml ? nlohmann::ordered_json(*caps.pml) : nlohmann::ordered_json(nullptr);
  j["cpu_vendor"] = caps.cpu_vendor;
  j["pagemap_scan"] = caps.pagemap_scan;
  j["uffd_wp_async"] = caps.uffd_wp_async;

  j["dirty_ring"] = caps.dirty_ring;
  j["dirty_ring_max_bytes"] = caps.dirty_ring_max_bytes;
  j["nr_vcpus"] = caps.nr_vcpus;
  j["max_vcpus"] = caps.max_vcpus;
  j["max_memslots"] = caps.max_memslots;
  j["xsave2_size"] = caps.xsave2_size;
  j["tsc_control"] = caps.tsc_control;
  j["irqchip"] = caps.irqchip;
  j["adjust_clock"] = caps.adjust_clock;
  if (!caps.kvm) j["kvm_error"] = caps.kvm_error;
  return j.dump(2);
}

std::string CapabilitiesToText(const HostCapabilities& caps) {
  std::ostringstream out;
  auto line = [&out](std::string_view label, const std::string& text) {
    constexpr size_t kWidth = 18;
    out << label;
    for (size_t i = label.size(); i < kWidth; ++i) out << ' ';
    out << text << '\n';
  };

  if (caps.kvm) {
    line("KVM", "yes, API " + std::to_string(caps.api_version));
  } else {
    line("KVM", "no (" + caps.kvm_error + "); the KVM backends cannot run");
  }

  if (caps.kvm) {
    if (caps.dirty_ring_max_entries > 0) {
      std::string ring = "yes, up to " + std::to_string(caps.dirty_ring_max_entries) +
                         " entries (" + FormatBytes(caps.dirty_ring_max_bytes) + " per vCPU";
      ring += caps.dirty_ring_acq_rel ? ", acq/rel)" : ", no acq/rel: harvest needs full barriers)";
      line("dirty ring", ring);
    } else {
      line("dirty ring", "no; dirty tracking falls back to the KVM bitmap");
    }

    const int mp = caps.manual_dirty_log_protect2;
    if (mp != 0) {
      std::string flags;
      if (mp & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) flags += "manual-protect";
      if (mp & KVM_DIRTY_LOG_INITIALLY_SET) flags += flags.empty() ? "initially-set" : " initially-set";
      line("manual protect", "yes (" + std::to_string(mp) + ": " + flags +
                                 "); bitmap backend clears lazily with KVM_CLEAR_DIRTY_LOG");
    } else {
      line("manual protect", "no; KVM_GET_DIRTY_LOG re-protects the whole slot each round");
    }

    line("ring + bitmap",
         caps.dirty_ring_with_bitmap
             ? std::string("yes; ring may need a final bitmap pass (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)")
             : std::string("no; the ring alone is the complete dirty set"));
  }

  if (caps.pml) {
    line("PML", *caps.pml ? "yes; KVM flushes the hardware log into the ring at each VM exit"
                          : "no (pml parameter off); KVM write-protects pages to log them");
  } else {
    std::string mods;
    for (const auto& m : LoadedKvmModules()) mods += (mods.empty() ? "" : ", ") + m;
    std::string note = "unknown (no kvm_intel/kvm_amd pml parameter";
    if (!mods.empty()) note += "; loaded: " + mods;
    if (mods.find("kvm_pvm") != std::string::npos) note += "; host uses kvm_pvm?";
    note += ")";
    line("PML", note);
  }
  line("CPU vendor", caps.cpu_vendor.empty() ? std::string("unknown") : caps.cpu_vendor);
  line("PAGEMAP_SCAN", caps.pagemap_scan
                           ? std::string("yes; userspace tracking can scan written pages in one ioctl")
                           : std::string("no (needs Linux 6.7+); userspace tracking unavailable"));
  line("uffd WP_ASYNC", caps.uffd_wp_async
                            ? std::string("yes; async write-protect for userspace dirty tracking")
                            : std::string("no (needs Linux 6.7+); userspace tracking unavailable"));

  if (caps.kvm) {
    line("vCPUs", std::to_string(caps.nr_vcpus) + " recommended, " +
                      std::to_string(caps.max_vcpus) + " max");
    line("memslots", std::to_string(caps.max_memslots));
    line("XSAVE2 size", caps.xsave2_size > 0
                            ? FormatBytes(static_cast<uint64_t>(caps.xsave2_size))
                            : std::string("legacy (4 KiB KVM_GET_XSAVE)"));
    line("TSC control", caps.tsc_control
                            ? std::string("yes; the TSC rate can follow a migrated guest")
                            : std::string("no; migrate only between hosts with the same TSC rate"));
    line("irqchip", YesNo(caps.irqchip) + (caps.irqchip ? "; in-kernel LAPIC state is migrated" : ""));
    line("adjust clock",
         YesNo(caps.adjust_clock) + (caps.adjust_clock ? "; kvmclock is saved and restored" : ""));
  }
  return out.str();
}

}  // namespace pmlmig::vmm
