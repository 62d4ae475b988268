// Tests for the host capability probe. The JSON and text formatting tests use
// made-up HostCapabilities and run anywhere; tests that open /dev/kvm say so
// in their name and skip where it is absent. Host-specific values (REFERENCE.md
// section 1) are checked only on a host that looks like the reference one.
#include "pmlmig/vmm/capabilities.h"

#include <dirent.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "pmlmig/vmm/kvm.h"

namespace pmlmig::vmm {
namespace {

using Json = nlohmann::ordered_json;

// The documented `pmlmig probe --json` keys, in order.
const std::vector<std::string> kContractKeys = {
    "kvm",          "api_version",   "dirty_ring_max_entries", "dirty_ring_acq_rel",
    "manual_dirty_log_protect2",     "dirty_ring_with_bitmap", "pml",
    "cpu_vendor",   "pagemap_scan",  "uffd_wp_async"};

const std::vector<std::string> kExtraKeys = {
    "dirty_ring", "dirty_ring_max_bytes", "nr_vcpus",    "max_vcpus",   "max_memslots",
    "xsave2_size", "tsc_control",         "irqchip",     "adjust_clock"};

bool KvmUsable() { return ::access("/dev/kvm", R_OK | W_OK) == 0; }

bool PathExists(const char* path) { return ::access(path, F_OK) == 0; }

// Open fds of this process; the probe must leave this unchanged.
int OpenFdCount() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr) ++n;
    ::closedir(d);
  }
  return n;
}

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

// True if the running kernel is at least major.minor.
bool KernelAtLeast(int major, int minor) {
  utsname u{};
  if (::uname(&u) != 0) return false;
  int ma = 0, mi = 0;
  if (std::sscanf(u.release, "%d.%d", &ma, &mi) != 2) return false;
  return ma > major || (ma == major && mi >= minor);
}

std::vector<std::string> Keys(const Json& j) {
  std::vector<std::string> keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
  return keys;
}

// Checks the contract part of the JSON: the ten keys first, in order, with
// their types, and the values equal to the struct's.
void ExpectJsonMatches(const HostCapabilities& caps, const std::string& text) {
  Json j = Json::parse(text);  // throws (and fails the test) on bad JSON
  ASSERT_TRUE(j.is_object());
  std::vector<std::string> keys = Keys(j);
  ASSERT_GE(keys.size(), kContractKeys.size());
  EXPECT_EQ(std::vector<std::string>(keys.begin(), keys.begin() + kContractKeys.size()),
            kContractKeys);

  EXPECT_TRUE(j["kvm"].is_boolean());
  EXPECT_TRUE(j["api_version"].is_number_integer());
  EXPECT_TRUE(j["dirty_ring_max_entries"].is_number_integer());
  EXPECT_TRUE(j["dirty_ring_acq_rel"].is_boolean());
  EXPECT_TRUE(j["manual_dirty_log_protect2"].is_number_integer());
  EXPECT_TRUE(j["dirty_ring_with_bitmap"].is_boolean());
  EXPECT_TRUE(j["pml"].is_boolean() || j["pml"].is_null());
  EXPECT_TRUE(j["cpu_vendor"].is_string());
  EXPECT_TRUE(j["pagemap_scan"].is_boolean());
  EXPECT_TRUE(j["uffd_wp_async"].is_boolean());

  EXPECT_EQ(j["kvm"].get<bool>(), caps.kvm);
  EXPECT_EQ(j["api_version"].get<int>(), caps.api_version);
  EXPECT_EQ(j["dirty_ring_max_entries"].get<uint32_t>(), caps.dirty_ring_max_entries);
  EXPECT_EQ(j["dirty_ring_acq_rel"].get<bool>(), caps.dirty_ring_acq_rel);
  EXPECT_EQ(j["manual_dirty_log_protect2"].get<int>(), caps.manual_dirty_log_protect2);
  EXPECT_EQ(j["dirty_ring_with_bitmap"].get<bool>(), caps.dirty_ring_with_bitmap);
  if (caps.pml) {
    ASSERT_TRUE(j["pml"].is_boolean());
    EXPECT_EQ(j["pml"].get<bool>(), *caps.pml);
  } else {
    EXPECT_TRUE(j["pml"].is_null());
  }
  EXPECT_EQ(j["cpu_vendor"].get<std::string>(), caps.cpu_vendor);
  EXPECT_EQ(j["pagemap_scan"].get<bool>(), caps.pagemap_scan);
  EXPECT_EQ(j["uffd_wp_async"].get<bool>(), caps.uffd_wp_async);

  for (const auto& k : kExtraKeys) EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["dirty_ring_max_bytes"].get<uint32_t>(), caps.dirty_ring_max_bytes);
  EXPECT_EQ(j.contains("kvm_error"), !caps.kvm);
  if (!caps.kvm) {
    EXPECT_EQ(j["kvm_error"].get<std::string>(), caps.kvm_error);
  }
}

HostCapabilities MadeUpCaps() {
  HostCapabilities c;
  c.kvm = true;
  c.api_version = 12;
  c.dirty_ring = true;
  c.dirty_ring_acq_rel = true;
  c.dirty_ring_max_bytes = 1u << 20;
  c.dirty_ring_max_entries = (1u << 20) / 16;
  c.manual_dirty_log_protect2 = 3;
  c.cpu_vendor = "GenuineIntel";
  c.pagemap_scan = true;
  c.uffd_wp_async = true;
  c.nr_vcpus = 2;
  c.max_vcpus = 1024;
  c.max_memslots = 32764;
  c.xsave2_size = 4096;
  c.irqchip = true;
  c.adjust_clock = true;
  return c;
}

TEST(CapabilitiesJsonTest, KeysInOrderAndPmlTriState) {
  HostCapabilities c = MadeUpCaps();
  for (std::optional<bool> pml : {std::optional<bool>(), std::optional<bool>(true),
                                  std::optional<bool>(false)}) {
    c.pml = pml;
    std::string text = CapabilitiesToJson(c);
    SCOPED_TRACE(text);
    ExpectJsonMatches(c, text);
    std::vector<std::string> all = kContractKeys;
    all.insert(all.end(), kExtraKeys.begin(), kExtraKeys.end());
    EXPECT_EQ(Keys(Json::parse(text)), all);
  }
}

TEST(CapabilitiesJsonTest, KvmErrorOnlyWhenKvmFalse) {
  HostCapabilities c;
  c.kvm = false;
  c.kvm_error = "open /dev/kvm: No such file or directory";
  std::string text = CapabilitiesToJson(c);
  ExpectJsonMatches(c, text);
  std::vector<std::string> keys = Keys(Json::parse(text));
  EXPECT_EQ(keys.back(), "kvm_error");
}

TEST(CapabilitiesTextTest, ReportsRingAndPml) {
  HostCapabilities c = MadeUpCaps();
  std::string text = CapabilitiesToText(c);
  EXPECT_NE(text.find("yes, up to 65536 entries"), std::string::npos) << text;
  EXPECT_NE(text.find("acq/rel"), std::string::npos) << text;
  EXPECT_NE(text.find("PML"), std::string::npos) << text;
  EXPECT_NE(text.find("unknown"), std::string::npos) << text;  // pml is nullopt

  c.pml = true;
  text = CapabilitiesToText(c);
  EXPECT_EQ(text.find("unknown (no kvm_intel"), std::string::npos) << text;

  c.kvm = false;
  c.kvm_error = "open /x: gone";
  text = CapabilitiesToText(c);
  EXPECT_NE(text.find("open /x: gone"), std::string::npos) << text;
  EXPECT_EQ(text.find("dirty ring"), std::string::npos) << text;
}

TEST(CapabilitiesProbeTest, MissingDeviceStillProbesUserspace) {
  const std::string path = "/nonexistent/kvm";
  const int fds_before = OpenFdCount();
  HostCapabilities c = ProbeHost(path);
  EXPECT_EQ(OpenFdCount(), fds_before);
  EXPECT_FALSE(c.kvm);
  EXPECT_NE(c.kvm_error.find(path), std::string::npos) << c.kvm_error;
  EXPECT_EQ(c.api_version, 0);
  EXPECT_EQ(c.dirty_ring_max_entries, 0u);
#if defined(__x86_64__) || defined(__i386__)
  EXPECT_EQ(c.cpu_vendor.size(), 12u) << c.cpu_vendor;  // userspace probes ran
#endif

  std::string text = CapabilitiesToJson(c);
  SCOPED_TRACE(text);
  ExpectJsonMatches(c, text);
  EXPECT_FALSE(Json::parse(text)["kvm"].get<bool>());
}

TEST(CapabilitiesProbeTest, HostInvariantsNeedsKvm) {
  if (!KvmUsable()) GTEST_SKIP() << "/dev/kvm is absent or not read-write for this user";
  const int fds_before = OpenFdCount();
  HostCapabilities c = ProbeHost();
  EXPECT_EQ(OpenFdCount(), fds_before);  // probe VM, uffd, pagemap all closed
  ASSERT_TRUE(c.kvm) << c.kvm_error;
  EXPECT_TRUE(c.kvm_error.empty());
  EXPECT_EQ(c.api_version, 12);

  EXPECT_EQ(c.dirty_ring_max_entries, c.dirty_ring_max_bytes / 16);
  if (c.dirty_ring_max_entries != 0) {
    EXPECT_TRUE(IsPowerOfTwo(c.dirty_ring_max_entries)) << c.dirty_ring_max_entries;
    EXPECT_TRUE(IsPowerOfTwo(c.dirty_ring_max_bytes)) << c.dirty_ring_max_bytes;
  }
  if (c.dirty_ring || c.dirty_ring_acq_rel) {
    EXPECT_GT(c.dirty_ring_max_entries, 0u);
  }
  if (c.dirty_ring_with_bitmap) {
    EXPECT_TRUE(c.dirty_ring || c.dirty_ring_acq_rel);
  }
  EXPECT_EQ(c.manual_dirty_log_protect2 & ~3, 0) << c.manual_dirty_log_protect2;
  EXPECT_GE(c.nr_vcpus, 1);
  EXPECT_LE(c.nr_vcpus, c.max_vcpus);
  EXPECT_GT(c.max_memslots, 0);
#if defined(__x86_64__) || defined(__i386__)
  EXPECT_EQ(c.cpu_vendor.size(), 12u) << c.cpu_vendor;
#endif

  // Both entry points agree.
  auto kvm = Kvm::Open();
  ASSERT_TRUE(kvm.ok()) << kvm.status().message();
  HostCapabilities c2 = ProbeHost(*kvm);
  EXPECT_EQ(CapabilitiesToJson(c2), CapabilitiesToJson(c));

  std::string json = CapabilitiesToJson(c);
  SCOPED_TRACE(json);
  ExpectJsonMatches(c, json);
  // Visible in the test log: this host's answer.
  std::printf("%s\n%s", json.c_str(), CapabilitiesToText(c).c_str());
}

// REFERENCE.md section 1, measured on the project's kvm_pvm development and
// CI hosts. Other hosts legitimately differ, so this runs only there.
TEST(CapabilitiesProbeTest, ReferencePvmHostNeedsKvm) {
  if (!KvmUsable()) GTEST_SKIP() << "/dev/kvm is absent or not read-write for this user";
  if (!PathExists("/sys/module/kvm_pvm")) {
    GTEST_SKIP() << "not a kvm_pvm host; REFERENCE.md section 1 values do not apply";
  }
  HostCapabilities c = ProbeHost();
  ASSERT_TRUE(c.kvm) << c.kvm_error;
  EXPECT_EQ(c.api_version, 12);
  EXPECT_EQ(c.dirty_ring_max_entries, 65536u);
  EXPECT_TRUE(c.dirty_ring_acq_rel);
  EXPECT_EQ(c.manual_dirty_log_protect2, 3);
  EXPECT_FALSE(c.dirty_ring_with_bitmap);
  EXPECT_FALSE(c.pml.has_value());
  if (KernelAtLeast(6, 7)) {
    EXPECT_TRUE(c.pagemap_scan);
    EXPECT_TRUE(c.uffd_wp_async);
  }
}

}  // namespace
}  // namespace pmlmig::vmm
