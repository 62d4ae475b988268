#include "pmlmig/base/units.h"

#include <gtest/gtest.h>

namespace pmlmig {
namespace {

TEST(UnitsTest, ParseSizeSuffixes) {
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("64K"), 64u << 10);
  EXPECT_EQ(*ParseSize("512m"), 512ull << 20);
  EXPECT_EQ(*ParseSize("1G"), 1ull << 30);
  EXPECT_EQ(*ParseSize("64GiB"), 64ull << 30);
  EXPECT_EQ(*ParseSize("2T"), 2ull << 40);
  EXPECT_EQ(*ParseSize("3MB"), 3ull << 20);
}

TEST(UnitsTest, ParseSizeRejectsWithReason) {
  for (const char* bad : {"", "G", "-1G", "1.5G", "12Q", "1GG", "99999999999999999999", "17179869184T"}) {
    auto r = ParseSize(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find("invalid size"), std::string::npos) << r.status().message();
  }
}

TEST(UnitsTest, ParseDuration) {
  using std::chrono::milliseconds;
  EXPECT_EQ(*ParseDuration("5s"), milliseconds(5000));
  EXPECT_EQ(*ParseDuration("250ms"), milliseconds(250));
  EXPECT_EQ(*ParseDuration("1.5s"), milliseconds(1500));
  EXPECT_EQ(*ParseDuration("2"), milliseconds(2000));
  EXPECT_EQ(*ParseDuration("1m"), milliseconds(60000));
  EXPECT_FALSE(ParseDuration("").ok());
  EXPECT_FALSE(ParseDuration("5x").ok());
  EXPECT_FALSE(ParseDuration("-5s").ok());
  EXPECT_FALSE(ParseDuration("1e30s").ok());
}

TEST(UnitsTest, FormatBytes) {
  EXPECT_EQ(FormatBytes(0), "0 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(64ull << 30), "64 GiB");
}

}  // namespace
}  // namespace pmlmig
