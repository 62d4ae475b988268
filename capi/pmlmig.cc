// The C ABI (include/pmlmig/pmlmig.h) over the C++ API: versions, features,
// errors. No C++ exception leaves a function defined here.
#include "pmlmig/pmlmig.h"

#include <string>

namespace {

thread_local std::string t_last_error;

}  // namespace

extern "C" {

uint32_t pmlmig_version(void) { return PMLMIG_VERSION; }
const char* pmlmig_version_string(void) { return "0.2.0"; }
uint32_t pmlmig_abi_version(void) { return PMLMIG_ABI_VERSION; }
uint32_t pmlmig_wire_version(void) { return PMLMIG_WIRE_VERSION; }
const char* pmlmig_last_error(void) { return t_last_error.c_str(); }

}  // extern "C"
