#include "pmlmig/vmm/workload.h"

#include <gtest/gtest.h>

#include "pmlmig/vmm/boot.h"
#include "pmlmig/vmm/fill.h"

namespace pmlmig::vmm {
namespace {

TEST(WorkloadTest, ParsesEveryKind) {
  EXPECT_EQ(ParseWorkload("idle")->kind, PMLMIG_WORKLOAD_IDLE);
  EXPECT_EQ(ParseWorkload("seq")->kind, PMLMIG_WORKLOAD_SEQ);
  EXPECT_DOUBLE_EQ(ParseWorkload("seq")->hot_fraction, 1.0);
  auto sweep = ParseWorkload("seq:fraction=0.25,rate=100");
  ASSERT_TRUE(sweep.ok()) << sweep.status().message();
  EXPECT_DOUBLE_EQ(sweep->hot_fraction, 0.25);
  EXPECT_EQ(sweep->ToString(), "seq:fraction=0.25,rate=100");
  EXPECT_EQ(ParseWorkload("seq:rate=100")->ToString(), "seq:rate=100");
  auto r = ParseWorkload("random:rate=5000");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->kind, PMLMIG_WORKLOAD_RANDOM);
  EXPECT_EQ(r->rate, 5000u);
  auto h = ParseWorkload("hotset:fraction=0.05,share=0.9,rate=20000");
  ASSERT_TRUE(h.ok()) << h.status().message();
  EXPECT_DOUBLE_EQ(h->hot_fraction, 0.05);
  EXPECT_DOUBLE_EQ(h->hot_share, 0.9);
  EXPECT_EQ(h->rate, 20000u);
  EXPECT_EQ(ParseWorkload(h->ToString())->ToString(), h->ToString());
}

TEST(WorkloadTest, RejectsWithReason) {
  struct Case {
    const char* spec;
    const char* why;
  };
  for (const Case& c : {Case{"walk", "unknown workload 'walk'"}, Case{"random:", "empty parameter"},
                        Case{"random:rate=0", "rate must be"}, Case{"random:rate=-5", "rate must be"},
                        Case{"idle:rate=5", "idle takes no rate"}, Case{"hotset:fraction=0", "fraction"},
                        Case{"hotset:fraction=1.5", "fraction"}, Case{"hotset:share=2", "share"},
                        Case{"random:fraction=0.5", "unknown parameter 'fraction'"},
                        Case{"seq:share=0.5", "unknown parameter 'share'"},
                        Case{"seq:rate", "has no value"}}) {
    auto r = ParseWorkload(c.spec);
    ASSERT_FALSE(r.ok()) << c.spec;
    EXPECT_NE(r.status().message().find(c.why), std::string::npos) << r.status().message();
  }
}

TEST(VcpuWorkloadTest, ParsesAnOverride) {
  auto w = ParseVcpuWorkload("2=random:rate=1000");
  ASSERT_TRUE(w.ok()) << w.status().message();
  EXPECT_EQ(w->vcpu, 2u);
  EXPECT_EQ(w->spec.kind, PMLMIG_WORKLOAD_RANDOM);
  EXPECT_EQ(w->spec.rate, 1000u);
  auto h = ParseVcpuWorkload("0=hotset:fraction=0.0625,share=0.9");
  ASSERT_TRUE(h.ok()) << h.status().message();
  EXPECT_EQ(h->vcpu, 0u);
  EXPECT_EQ(h->spec.ToString(), "hotset:fraction=0.0625,share=0.9");
}

TEST(VcpuWorkloadTest, RejectsWithReason) {
  struct Case {
    const char* text;
    const char* why;
  };
  for (const Case& c : {Case{"2random", "'2random' has no '=' (expected N=SPEC"},
                        Case{"", "has no '='"},
                        Case{"two=random", "vCPU 'two' is not a number"},
                        Case{"=random", "vCPU '' is not a number"},
                        Case{"-1=random", "vCPU '-1' is not a number"},
                        Case{"1234567890=random", "is not a number"},
                        // The spec's own reason, from ParseWorkload, after the vCPU.
                        Case{"2=walk", "vCPU 2: invalid workload 'walk': unknown workload 'walk'"},
                        Case{"2=random:rate=0", "vCPU 2: invalid workload 'random:rate=0': rate must be"},
                        Case{"2=", "vCPU 2: invalid workload '': unknown workload ''"}}) {
    auto r = ParseVcpuWorkload(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.why), std::string::npos) << r.status().message();
  }
}

TEST(VcpuWorkloadTest, ChecksTheListAgainstTheVm) {
  const std::vector<std::string> good = {"2=random:rate=1000", "0=idle"};
  auto all = ParseVcpuWorkloads(good, 3);
  ASSERT_TRUE(all.ok()) << all.status().message();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ(all->at(0).kind, PMLMIG_WORKLOAD_IDLE);
  EXPECT_EQ(all->at(2).rate, 1000u);
  EXPECT_TRUE(ParseVcpuWorkloads({}, 1)->empty());

  const std::vector<std::string> beyond = {"3=random"};
  auto r = ParseVcpuWorkloads(beyond, 3);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'3=random': vCPU 3 does not exist (the VM has 3 vCPUs, 0..2)"),
            std::string::npos)
      << r.status().message();
  r = ParseVcpuWorkloads(beyond, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("(the VM has 1 vCPU, 0..0)"), std::string::npos) << r.status().message();

  const std::vector<std::string> twice = {"1=random", "2=seq", "01=idle"};
  r = ParseVcpuWorkloads(twice, 3);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("vCPU 1 is given twice ('1=random' and '01=idle')"), std::string::npos)
      << r.status().message();

  const std::vector<std::string> bad = {"1=random", "x=seq"};
  r = ParseVcpuWorkloads(bad, 3);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("vCPU 'x' is not a number"), std::string::npos) << r.status().message();
}

TEST(VcpuWorkloadTest, EachVcpuGetsItsOwnOrTheDefault) {
  TestGuestConfig c;
  c.vcpus = 3;
  c.workload = *ParseWorkload("hotset:fraction=0.0625,share=0.9");
  EXPECT_EQ(DescribeWorkloads(c.workload, c.vcpu_workloads), "hotset:fraction=0.0625,share=0.9");
  c.vcpu_workloads[2] = *ParseWorkload("random:rate=1000");
  c.vcpu_workloads[0] = *ParseWorkload("idle");
  EXPECT_EQ(c.WorkloadOf(0).kind, PMLMIG_WORKLOAD_IDLE);
  EXPECT_EQ(c.WorkloadOf(1).ToString(), "hotset:fraction=0.0625,share=0.9");
  EXPECT_EQ(c.WorkloadOf(2).ToString(), "random:rate=1000");
  EXPECT_EQ(DescribeWorkloads(c.workload, c.vcpu_workloads),
            "hotset:fraction=0.0625,share=0.9 (vcpu 0: idle, vcpu 2: random:rate=1000)");
}

TEST(VcpuWorkloadTest, PagesEachWorkloadWritesInto) {
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("idle"), 1000), 0u);
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("random"), 1000), 1000u);
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("hotset:fraction=0.01,share=1"), 1000), 1000u);  // cold pages too
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("seq"), 1000), 1000u);
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("seq:fraction=0.25"), 1000), 250u);
  EXPECT_EQ(PagesWrittenInto(*ParseWorkload("seq:fraction=0.0001"), 1000), 1u);  // at least one page
}

TEST(FillTest, DeterministicPerGfnAndSeed) {
  uint8_t a[4096], b[4096];
  FillPage(7, 100, a);
  FillPage(7, 100, b);
  EXPECT_EQ(0, memcmp(a, b, 4096));
  EXPECT_TRUE(MatchesFill(7, 100, a, 0));
  EXPECT_FALSE(MatchesFill(7, 101, a, 0));
  EXPECT_FALSE(MatchesFill(8, 100, a, 0));
  a[4095] ^= 1;
  EXPECT_FALSE(MatchesFill(7, 100, a, 0));
  a[4095] ^= 1;
  a[3] ^= 1;
  EXPECT_TRUE(MatchesFill(7, 100, a, 16));  // the stamp area is skipped
}

}  // namespace
}  // namespace pmlmig::vmm
