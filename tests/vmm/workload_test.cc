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
