// Versions, each on its own (docs/EMBEDDING.md states what interoperates):
//   library   PMLMIG_VERSION_MAJOR/MINOR/PATCH (pmlmig.h), Version() at run time;
//   C ABI     PMLMIG_ABI_VERSION, the shared library's SONAME;
//   wire      kWireVersion, the migration protocol (proto/migration.proto);
//   state     the test VMM's machine-state format (vmm/vcpu_state.h) and its
//             description format (vmm/description.h) version themselves; an
//             embedder's state and description are its own.
#pragma once

#include <cstdint>
#include <string_view>

#include "pmlmig/pmlmig.h"

namespace pmlmig {

inline constexpr uint32_t kVersionMajor = PMLMIG_VERSION_MAJOR;
inline constexpr uint32_t kVersionMinor = PMLMIG_VERSION_MINOR;
inline constexpr uint32_t kVersionPatch = PMLMIG_VERSION_PATCH;
inline constexpr uint32_t kWireVersion = PMLMIG_WIRE_VERSION;

// The version of the library linked at run time, as PMLMIG_VERSION encodes it
// ((major << 16) | (minor << 8) | patch), and as "0.2.0".
uint32_t Version();
std::string_view VersionString();

}  // namespace pmlmig
