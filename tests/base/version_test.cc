// The umbrella header compiles on its own, and the runtime version is the
// header's (CMakeLists.txt checks the header against the project version).
#include "pmlmig/pmlmig.hpp"

#include <gtest/gtest.h>

namespace pmlmig {
namespace {

TEST(Version, RuntimeMatchesTheHeader) {
  EXPECT_EQ(Version(), static_cast<uint32_t>(PMLMIG_VERSION));
  EXPECT_EQ(Version(), (kVersionMajor << 16) | (kVersionMinor << 8) | kVersionPatch);
  EXPECT_EQ(VersionString(), std::to_string(kVersionMajor) + "." + std::to_string(kVersionMinor) + "." +
                                 std::to_string(kVersionPatch));
  EXPECT_EQ(kWireVersion, 2u);
}

}  // namespace
}  // namespace pmlmig
