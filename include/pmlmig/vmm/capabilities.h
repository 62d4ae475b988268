// Capability probing, in one place: what this host's KVM and kernel offer for
// dirty logging and state migration. Nothing else in the project calls
// KVM_CHECK_EXTENSION for these; it asks HostCapabilities.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace pmlmig::vmm {

class Kvm;

struct HostCapabilities {
  bool kvm = false;                 // /dev/kvm opened and API version 12
  std::string kvm_error;            // why not, when kvm == false
  int api_version = 0;
  // KVM_CAP_DIRTY_LOG_RING / _ACQ_REL report the maximum ring size in bytes.
  uint32_t dirty_ring_max_bytes = 0;
  uint32_t dirty_ring_max_entries = 0;  // max bytes / sizeof(kvm_dirty_gfn)
  bool dirty_ring = false;
  bool dirty_ring_acq_rel = false;
  int manual_dirty_log_protect2 = 0;    // the capability's value (bit mask)
  bool dirty_ring_with_bitmap = false;  // KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (225)
  std::optional<bool> pml;              // kvm_intel/kvm_amd "pml" parameter; nullopt = unknown
  std::string cpu_vendor;               // "GenuineIntel", "AuthenticAMD", ...
  bool pagemap_scan = false;            // PAGEMAP_SCAN ioctl on /proc/self/pagemap works
  bool uffd_wp_async = false;           // userfaultfd UFFD_FEATURE_WP_ASYNC works
  int nr_vcpus = 0;                     // KVM_CAP_NR_VCPUS (recommended)
  int max_vcpus = 0;                    // KVM_CAP_MAX_VCPUS
  int max_memslots = 0;                 // KVM_CAP_NR_MEMSLOTS
  int xsave2_size = 0;                  // KVM_CAP_XSAVE2 (bytes; 0 = legacy 4096)
  bool tsc_control = false;             // KVM_CAP_TSC_CONTROL
  bool irqchip = false;                 // KVM_CAP_IRQCHIP
  bool adjust_clock = false;            // KVM_CAP_ADJUST_CLOCK
};

// Probes everything without failing: a missing /dev/kvm gives kvm = false
// and a reason; the userspace probes (PAGEMAP_SCAN, uffd) still run.
HostCapabilities ProbeHost(const std::string& kvm_path = "/dev/kvm");
// Same, reusing an open Kvm.
HostCapabilities ProbeHost(const Kvm& kvm);

// One JSON object with the keys documented for `pmlmig probe --json`.
std::string CapabilitiesToJson(const HostCapabilities& caps);
// Human-readable multi-line report for `pmlmig probe`.
std::string CapabilitiesToText(const HostCapabilities& caps);

}  // namespace pmlmig::vmm
