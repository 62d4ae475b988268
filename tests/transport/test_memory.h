// Guest memory and page contents for the transport tests: anonymous
// mappings registered as memory slots, and seeded fills. Test-only.
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::transport::test {

inline uint64_t SplitMix(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Incompressible bytes from `seed` (len a multiple of 8).
inline void FillRandom(uint8_t* p, uint64_t len, uint64_t seed) {
  for (uint64_t i = 0; i + 8 <= len; i += 8) {
    const uint64_t v = SplitMix(seed);
    std::memcpy(p + i, &v, 8);
  }
}

// Guest memory as a few anonymous mappings, one per slot.
struct TestMemory {
  std::vector<Mapping> maps;
  engine::SlotTable slots;

  Status Add(uint32_t slot, uint64_t gpa, uint64_t size) {
    PMLMIG_ASSIGN_OR_RETURN(Mapping m, Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                                                    0, "test guest memory"));
    engine::MemorySlot s;
    s.slot = slot;
    s.gpa = gpa;
    s.host = m.data();
    s.size = size;
    PMLMIG_RETURN_IF_ERROR(slots.Set(s));
    maps.push_back(std::move(m));
    return Status::Ok();
  }
  uint8_t* At(uint64_t gpa) const { return slots.HostAddress(gpa, engine::kPageSize); }
};

}  // namespace pmlmig::transport::test
