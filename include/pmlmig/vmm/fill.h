// The seeded pseudo-random content the host writes into guest memory before
// the guest starts, so migrations move realistic, incompressible data and the
// checker can tell every untouched page from a written or corrupted one.
// A page's content depends only on (seed, gfn): any process can recompute it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pmlmig/vmm/guest_abi.h"

namespace pmlmig::vmm {

// Writes the 4096-byte fill of page `gfn` into `page`.
void FillPage(uint64_t seed, uint64_t gfn, uint8_t* page);

// Whether bytes [from, 4096) of `page` equal the fill of `gfn` (from is a
// multiple of 8).
bool MatchesFill(uint64_t seed, uint64_t gfn, const uint8_t* page, size_t from);

}  // namespace pmlmig::vmm
