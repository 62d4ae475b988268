#include "pmlmig/vmm/description.h"

#include <gtest/gtest.h>

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
                          R"({"format":"pmlmig-test-vm","version":2})",
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

}  // namespace
}  // namespace pmlmig::vmm
