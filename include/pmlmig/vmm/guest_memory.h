// GuestMemory: the guest's RAM, one memfd mapped once into this process.
//
// memfd so that a receiving process or an embedding VMM can share the very
// same pages; ftruncate'd and mapped MAP_NORESERVE so untouched memory costs
// nothing (a 64 GiB idle guest uses a few hundred KiB). Laid out like a PC:
// RAM up to 3 GiB at gpa 0, the rest at 4 GiB, each range its own memslot.
//
// Thread-safety: immutable after Create(); the guest and any thread may read
// and write the memory itself.
#pragma once

#include <cstdint>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::vmm {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kLowMemoryTop = 3 * kGiB;   // RAM below the PCI hole
constexpr uint64_t kHighMemoryBase = 4 * kGiB;  // RAM above it
constexpr uint64_t kMinMemory = 2 * kMiB;
constexpr uint64_t kMaxMemory = 256 * kGiB;      // one PDPT of identity map

struct MemoryRegion {
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint64_t offset = 0;  // in the memfd and in the host mapping
};

// The regions for `bytes` of RAM: one below 3 GiB, and one from 4 GiB for
// the rest. Checks 2 MiB granularity and the supported range.
Result<std::vector<MemoryRegion>> PcLayout(uint64_t bytes);

class GuestMemory {
 public:
  struct Options {
    uint64_t bytes = 0;        // RAM size; a multiple of 2 MiB in [2 MiB, 256 GiB]
    bool huge_pages = false;   // madvise(MADV_HUGEPAGE) (needs shmem THP "advise" or better)
    // An existing memfd to map instead of a new one (a same-host handover:
    // the RAM of a VM in another process; duplicated, never written here,
    // at least `bytes` long). -1: a new, zeroed memfd.
    int adopt_fd = -1;
  };
  static Result<GuestMemory> Create(const Options& options);

  int memfd() const { return memfd_.get(); }
  uint8_t* host() const { return mapping_.data(); }  // RAM offset 0
  uint64_t size() const { return mapping_.size(); }
  const std::vector<MemoryRegion>& regions() const { return regions_; }
  // Host address of [gpa, gpa+len) if inside one region, else nullptr.
  uint8_t* HostAddress(uint64_t gpa, uint64_t len) const;
  // Highest guest-physical address + 1.
  uint64_t gpa_end() const { return regions_.back().gpa + regions_.back().size; }

 private:
  Status Adopt(int fd, uint64_t bytes);

  UniqueFd memfd_;
  Mapping mapping_;
  std::vector<MemoryRegion> regions_;
};

}  // namespace pmlmig::vmm
