#include "pmlmig/vmm/guest_memory.h"

#include <gtest/gtest.h>

#include "pmlmig/vmm/boot.h"

namespace pmlmig::vmm {
namespace {

TEST(GuestMemoryTest, PcLayoutSplitsAtThreeGiB) {
  auto small = PcLayout(64 * kMiB);
  ASSERT_TRUE(small.ok());
  ASSERT_EQ(small->size(), 1u);
  auto big = PcLayout(3584 * kMiB);
  ASSERT_TRUE(big.ok());
  ASSERT_EQ(big->size(), 2u);
  EXPECT_EQ((*big)[0].size, 3 * kGiB);
  EXPECT_EQ((*big)[1].gpa, 4 * kGiB);
  EXPECT_EQ((*big)[1].size, 512 * kMiB);
  EXPECT_EQ((*big)[1].offset, 3 * kGiB);
}

TEST(GuestMemoryTest, PcLayoutRejects) {
  EXPECT_NE(PcLayout(1 * kMiB).status().message().find("outside the supported range"), std::string::npos);
  EXPECT_NE(PcLayout(3 * kMiB).status().message().find("multiple of 2 MiB"), std::string::npos);
  EXPECT_FALSE(PcLayout(512 * kGiB).ok());
}

TEST(GuestMemoryTest, LargeGuestIsLazy) {
  // 64 GiB of guest RAM reserves address space only.
  auto mem = GuestMemory::Create({64 * kGiB, false});
  ASSERT_TRUE(mem.ok()) << mem.status().message();
  EXPECT_EQ(mem->regions().size(), 2u);
  EXPECT_EQ(mem->gpa_end(), 65 * kGiB);
  EXPECT_NE(mem->HostAddress(64 * kGiB, 4096), nullptr);
  EXPECT_EQ(mem->HostAddress(3 * kGiB, 4096), nullptr);  // the hole
  EXPECT_EQ(mem->HostAddress(65 * kGiB, 1), nullptr);
}

TEST(GuestMemoryTest, LayoutSharesCoverTheWorkloadArea) {
  auto mem = GuestMemory::Create({3584 * kMiB, false});
  ASSERT_TRUE(mem.ok());
  auto l = ComputeGuestLayout(*mem, 3);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->ranges.size(), 2u);
  EXPECT_EQ(l->page_directories, 5u);
  uint64_t next = 0;
  for (const VcpuShare& s : l->shares) {
    EXPECT_EQ(s.first_page, next);
    next += s.pages;
  }
  EXPECT_EQ(next, l->total_pages);
  EXPECT_EQ(l->PageGpa(l->ranges[0].pages), 4 * kGiB);
  EXPECT_EQ(l->PageGpa(0), l->workload_start);
  EXPECT_FALSE(ComputeGuestLayout(*mem, 0).ok());
  EXPECT_FALSE(ComputeGuestLayout(*mem, 65).ok());
}

}  // namespace
}  // namespace pmlmig::vmm
