#include "pmlmig/vmm/fill.h"

#include <cstring>

namespace pmlmig::vmm {
namespace {

// splitmix64 of a counter: every word is independent, so a page is filled
// or checked from any offset without running a generator from its start.
inline uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t PageBase(uint64_t seed, uint64_t gfn) { return Mix(seed ^ (gfn * 0x9e3779b97f4a7c15ull)); }

constexpr size_t kWords = PMLMIG_PAGE_SIZE / 8;

}  // namespace

void FillPage(uint64_t seed, uint64_t gfn, uint8_t* page) {
  const uint64_t base = PageBase(seed, gfn);
  uint64_t words[kWords];
  for (size_t i = 0; i < kWords; ++i) words[i] = Mix(base + i * 0x9e3779b97f4a7c15ull);
  std::memcpy(page, words, sizeof words);
}

bool MatchesFill(uint64_t seed, uint64_t gfn, const uint8_t* page, size_t from) {
  const uint64_t base = PageBase(seed, gfn);
  for (size_t i = from / 8; i < kWords; ++i) {
    uint64_t w;
    std::memcpy(&w, page + i * 8, 8);
    if (w != Mix(base + i * 0x9e3779b97f4a7c15ull)) return false;
  }
  return true;
}

}  // namespace pmlmig::vmm
