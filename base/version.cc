#include "pmlmig/version.h"

namespace pmlmig {

#define PMLMIG_VERSION_STR2(x) #x
#define PMLMIG_VERSION_STR(x) PMLMIG_VERSION_STR2(x)

uint32_t Version() { return PMLMIG_VERSION; }
std::string_view VersionString() {
  return PMLMIG_VERSION_STR(PMLMIG_VERSION_MAJOR) "." PMLMIG_VERSION_STR(PMLMIG_VERSION_MINOR) "." PMLMIG_VERSION_STR(
      PMLMIG_VERSION_PATCH);
}

}  // namespace pmlmig
