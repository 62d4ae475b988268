#include "pmlmig/vmm/guest_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include "pmlmig/base/units.h"

namespace pmlmig::vmm {

Result<std::vector<MemoryRegion>> PcLayout(uint64_t bytes) {
  if (bytes < kMinMemory || bytes > kMaxMemory) {
    return InvalidArgument("memory size " + FormatBytes(bytes) + " is outside the supported range " +
                           FormatBytes(kMinMemory) + " to " + FormatBytes(kMaxMemory));
  }
  if (bytes % (2 * kMiB) != 0) {
    return InvalidArgument("memory size " + FormatBytes(bytes) + " is not a multiple of 2 MiB");
  }
  std::vector<MemoryRegion> regions;
  const uint64_t low = bytes < kLowMemoryTop ? bytes : kLowMemoryTop;
  regions.push_back({0, low, 0});
  if (bytes > low) regions.push_back({kHighMemoryBase, bytes - low, low});
  return regions;
}

Result<GuestMemory> GuestMemory::Create(const Options& options) {
  GuestMemory mem;
  PMLMIG_ASSIGN_OR_RETURN(mem.regions_, PcLayout(options.bytes));
  int fd = ::memfd_create("pmlmig-guest-ram", MFD_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "memfd_create guest RAM");
  mem.memfd_.Reset(fd);
  if (::ftruncate(fd, static_cast<off_t>(options.bytes)) < 0) {
    return Status::FromErrno(errno, "ftruncate guest RAM memfd to " + FormatBytes(options.bytes));
  }
  PMLMIG_ASSIGN_OR_RETURN(mem.mapping_,
                          Mapping::Map(options.bytes, PROT_READ | PROT_WRITE,
                                       MAP_SHARED | MAP_NORESERVE, fd, 0, "guest RAM"));
  if (options.huge_pages && ::madvise(mem.mapping_.data(), options.bytes, MADV_HUGEPAGE) < 0) {
    return Status::FromErrno(errno, "madvise(MADV_HUGEPAGE) guest RAM");
  }
  return mem;
}

uint8_t* GuestMemory::HostAddress(uint64_t gpa, uint64_t len) const {
  for (const MemoryRegion& r : regions_) {
    if (gpa >= r.gpa && gpa - r.gpa < r.size && len <= r.size - (gpa - r.gpa)) {
      return mapping_.data() + r.offset + (gpa - r.gpa);
    }
  }
  return nullptr;
}

}  // namespace pmlmig::vmm
