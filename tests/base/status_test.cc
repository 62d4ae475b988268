#include "pmlmig/base/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace pmlmig {
namespace {

Result<int> Half(int v) {
  if (v % 2) return InvalidArgument("odd: " + std::to_string(v));
  return v / 2;
}

Result<int> Quarter(int v) {
  PMLMIG_ASSIGN_OR_RETURN(int h, Half(v));
  PMLMIG_ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

TEST(StatusTest, OkByDefault) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "ok");
}

TEST(StatusTest, FromErrnoNamesWhatAndMapsCode) {
  Status s = Status::FromErrno(ENOENT, "open /dev/kvm");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kNotFound);
  EXPECT_EQ(s.message(), "open /dev/kvm: No such file or directory");
  EXPECT_EQ(Status::FromErrno(EACCES, "x").code(), Code::kPermissionDenied);
  EXPECT_EQ(Status::FromErrno(ENOMEM, "x").code(), Code::kResourceExhausted);
  EXPECT_EQ(Status::FromErrno(EINVAL, "x").code(), Code::kInvalidArgument);
}

TEST(StatusTest, WithContextPrefixes) {
  EXPECT_EQ(Internal("boom").WithContext("vcpu 1").message(), "vcpu 1: boom");
  EXPECT_TRUE(Status::Ok().WithContext("ignored").ok());
}

TEST(StatusTest, ResultPropagates) {
  auto ok = Quarter(8);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 2);
  auto bad = Quarter(6);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "odd: 3");
}

}  // namespace
}  // namespace pmlmig
