#include "pmlmig/vmm/description.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace pmlmig::vmm {
namespace {

MachineOptions Sample() {
  MachineOptions o;
  o.guest.memory_bytes = 3584ull << 20;
  o.guest.vcpus = 2;
  o.guest.workload = *ParseWorkload("hotset:fraction=0.25,share=0.8,rate=1000");
  o.guest.fill = FillMode::kZero;
  o.guest.seed = 42;
  o.irqchip = true;
  return o;
}

TEST(TestVmDescription, RoundTrip) {
  const MachineOptions c = Sample();
  auto d = DecodeTestVmDescription(EncodeTestVmDescription(c));
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->guest.memory_bytes, c.guest.memory_bytes);
  EXPECT_EQ(d->guest.vcpus, 2u);
  EXPECT_EQ(d->guest.workload.ToString(), c.guest.workload.ToString());
  EXPECT_EQ(d->guest.fill, FillMode::kZero);
  EXPECT_EQ(d->guest.seed, 42u);
  EXPECT_TRUE(d->irqchip);
}

TEST(TestVmDescription, RejectsNamingTheField) {
  MachineOptions c = Sample();
  c.guest.memory_bytes = 3 << 20;  // not a multiple of 2 MiB
  auto d = DecodeTestVmDescription(EncodeTestVmDescription(c));
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("memory_bytes"), std::string::npos) << d.status().message();
  c.guest.memory_bytes = 64 << 20;
  c.guest.vcpus = 65;
  d = DecodeTestVmDescription(EncodeTestVmDescription(c));
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("vcpus"), std::string::npos) << d.status().message();
  for (const char* bad : {"\xff\xff\xff", "[]", "{}", R"({"format":"other","version":1})",
                          R"({"format":"pmlmig-test-vm","version":3})",
                          R"({"format":"pmlmig-test-vm","version":1,"memory_bytes":"big"})"}) {
    d = DecodeTestVmDescription(bad);
    EXPECT_FALSE(d.ok()) << bad;
    EXPECT_NE(d.status().message().find("test VM description"), std::string::npos) << d.status().message();
  }
  std::string s = EncodeTestVmDescription(Sample());
  s.replace(s.find("hotset"), 6, "hotsex");
  d = DecodeTestVmDescription(s);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("workload"), std::string::npos) << d.status().message();
}

TEST(TestVmDescription, WithoutOverridesItIsExactlyVersion1) {
  // Receivers that read only version 1 keep working with a VM that does not
  // use per-vCPU workloads: same bytes as before they existed.
  EXPECT_EQ(EncodeTestVmDescription(Sample()),
            R"({"fill":"zero","format":"pmlmig-test-vm","irqchip":true,"memory_bytes":3758096384,"seed":42,)"
            R"("vcpus":2,"version":1,"workload":"hotset:fraction=0.25,share=0.8,rate=1000"})");
  auto d = DecodeTestVmDescription(
      R"({"format":"pmlmig-test-vm","version":1,"memory_bytes":67108864,"vcpus":3,"workload":"random",)"
      R"("fill":"random","seed":7,"irqchip":false})");
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->guest.vcpus, 3u);
  EXPECT_TRUE(d->guest.vcpu_workloads.empty());
  EXPECT_EQ(d->guest.WorkloadOf(2).ToString(), "random");
  EXPECT_FALSE(d->irqchip);
}

TEST(TestVmDescription, RoundTripWithPerVcpuWorkloads) {
  MachineOptions c = Sample();
  c.guest.vcpus = 3;
  c.guest.workload = *ParseWorkload("hotset:fraction=0.0625,share=0.9");
  c.guest.vcpu_workloads[2] = *ParseWorkload("random:rate=1000");
  c.guest.vcpu_workloads[0] = *ParseWorkload("seq:fraction=0.5");
  const std::string bytes = EncodeTestVmDescription(c);
  const auto j = nlohmann::json::parse(bytes);
  EXPECT_EQ(j["version"], 2);
  EXPECT_EQ(j["vcpu_workloads"], nlohmann::json({{"0", "seq:fraction=0.5"}, {"2", "random:rate=1000"}})) << bytes;
  auto d = DecodeTestVmDescription(bytes);
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_EQ(d->guest.workload.ToString(), "hotset:fraction=0.0625,share=0.9");
  ASSERT_EQ(d->guest.vcpu_workloads.size(), 2u);
  EXPECT_EQ(d->guest.WorkloadOf(0).ToString(), "seq:fraction=0.5");
  EXPECT_EQ(d->guest.WorkloadOf(1).ToString(), "hotset:fraction=0.0625,share=0.9");
  EXPECT_EQ(d->guest.WorkloadOf(2).ToString(), "random:rate=1000");
  EXPECT_EQ(EncodeTestVmDescription(*d), bytes);
}

TEST(TestVmDescription, RefusesBadOverridesNamingTheField) {
  MachineOptions c = Sample();
  c.guest.vcpus = 3;
  c.guest.vcpu_workloads[2] = *ParseWorkload("random:rate=1000");
  const nlohmann::json good = nlohmann::json::parse(EncodeTestVmDescription(c));
  struct Case {
    const char* what;
    nlohmann::json overrides;  // null: drop the field
    int version;
    const char* why;
  };
  const Case cases[] = {
      {"index beyond vcpus", {{"3", "random"}}, 2, "vcpu_workloads: '3=random': vCPU 3 does not exist"},
      {"index not a number", {{"two", "random"}}, 2, "vcpu_workloads: 'two=random': vCPU 'two' is not a number"},
      {"bad spec", {{"1", "walk"}}, 2, "vcpu_workloads: vCPU 1: invalid workload 'walk'"},
      {"same vCPU twice", {{"1", "idle"}, {"01", "seq"}}, 2, "vcpu_workloads: vCPU 1 is given twice"},
      {"spec not a string", {{"1", 5}}, 2, "vcpu_workloads: entry \"1\" is not a string"},
      {"not an object", nlohmann::json::array({"1=random"}), 2, "vcpu_workloads is not an object"},
      {"missing in version 2", nullptr, 2, "no field \"vcpu_workloads\""},
      {"present in version 1", {{"1", "random"}}, 1, "field \"vcpu_workloads\" needs version 2"},
  };
  for (const Case& k : cases) {
    nlohmann::json j = good;
    j["version"] = k.version;
    if (k.overrides.is_null()) j.erase("vcpu_workloads");
    else j["vcpu_workloads"] = k.overrides;
    auto d = DecodeTestVmDescription(j.dump());
    ASSERT_FALSE(d.ok()) << k.what;
    EXPECT_NE(d.status().message().find("test VM description: "), std::string::npos) << d.status().message();
    EXPECT_NE(d.status().message().find(k.why), std::string::npos) << k.what << ": " << d.status().message();
  }
  // An empty object is no override at all.
  nlohmann::json j = good;
  j["vcpu_workloads"] = nlohmann::json::object();
  auto d = DecodeTestVmDescription(j.dump());
  ASSERT_TRUE(d.ok()) << d.status().message();
  EXPECT_TRUE(d->guest.vcpu_workloads.empty());
}

}  // namespace
}  // namespace pmlmig::vmm
