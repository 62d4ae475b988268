#include "pmlmig/transport/config_codec.h"

#include <gtest/gtest.h>

namespace pmlmig::transport {
namespace {

TEST(ConfigCodecTest, RoundTrip) {
  vmm::TestGuestConfig c;
  c.memory_bytes = 3584ull << 20;
  c.vcpus = 2;
  c.workload = *vmm::ParseWorkload("hotset:fraction=0.25,share=0.8,rate=1000");
  c.fill = vmm::FillMode::kZero;
  c.seed = 42;
  vmm::TestGuestConfig d;
  bool irqchip = false;
  ASSERT_TRUE(DecodeVmConfig(EncodeVmConfig(c, true), &d, &irqchip).ok());
  EXPECT_EQ(d.memory_bytes, c.memory_bytes);
  EXPECT_EQ(d.vcpus, 2u);
  EXPECT_EQ(d.workload.ToString(), c.workload.ToString());
  EXPECT_EQ(d.fill, vmm::FillMode::kZero);
  EXPECT_EQ(d.seed, 42u);
  EXPECT_TRUE(irqchip);
}

TEST(ConfigCodecTest, RejectsNamingTheField) {
  vmm::TestGuestConfig c;
  c.memory_bytes = 3 << 20;  // not a multiple of 2 MiB
  vmm::TestGuestConfig d;
  bool irqchip;
  Status s = DecodeVmConfig(EncodeVmConfig(c, true), &d, &irqchip);
  EXPECT_NE(s.message().find("VmConfig.memory_bytes"), std::string::npos) << s.message();
  c.memory_bytes = 64 << 20;
  c.vcpus = 65;
  s = DecodeVmConfig(EncodeVmConfig(c, true), &d, &irqchip);
  EXPECT_NE(s.message().find("VmConfig.vcpus"), std::string::npos) << s.message();
  s = DecodeVmConfig("\xff\xff\xff", &d, &irqchip);
  EXPECT_FALSE(s.ok());
}

}  // namespace
}  // namespace pmlmig::transport
