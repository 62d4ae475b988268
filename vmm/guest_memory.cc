#include "pmlmig/vmm/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
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
  if (options.adopt_fd >= 0) {
    PMLMIG_RETURN_IF_ERROR(mem.Adopt(options.adopt_fd, options.bytes));
  } else {
    int fd = ::memfd_create("pmlmig-guest-ram", MFD_CLOEXEC);
    if (fd < 0) return Status::FromErrno(errno, "memfd_create guest RAM");
    mem.memfd_.Reset(fd);
    if (::ftruncate(fd, static_cast<off_t>(options.bytes)) < 0) {
      return Status::FromErrno(errno, "ftruncate guest RAM memfd to " + FormatBytes(options.bytes));
    }
  }
  const int fd = mem.memfd_.get();
  PMLMIG_ASSIGN_OR_RETURN(mem.mapping_,
                          Mapping::Map(options.bytes, PROT_READ | PROT_WRITE,
                                       MAP_SHARED | MAP_NORESERVE, fd, 0, "guest RAM"));
  if (options.huge_pages && ::madvise(mem.mapping_.data(), options.bytes, MADV_HUGEPAGE) < 0) {
    return Status::FromErrno(errno, "madvise(MADV_HUGEPAGE) guest RAM");
  }
  return mem;
}

Status GuestMemory::Adopt(int fd, uint64_t bytes) {
  struct stat st{};
  if (::fstat(fd, &st) != 0) return Status::FromErrno(errno, "fstat the guest RAM handed over");
  if (!S_ISREG(st.st_mode)) return InvalidArgument("the guest RAM handed over is not a memory file");
  if (static_cast<uint64_t>(st.st_size) < bytes) {
    return InvalidArgument("the guest RAM handed over holds " + FormatBytes(static_cast<uint64_t>(st.st_size)) +
                           ", the VM needs " + FormatBytes(bytes));
  }
  const int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return Status::FromErrno(errno, "dup the guest RAM handed over");
  memfd_.Reset(dup);
  return Status::Ok();
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
