#include "pmlmig/base/mapping.h"

#include <sys/mman.h>

#include <cerrno>
#include <string>

namespace pmlmig {

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    Reset();
    addr_ = std::exchange(o.addr_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

Result<Mapping> Mapping::Map(size_t size, int prot, int flags, int fd, off_t offset,
                             std::string_view what) {
  void* p = ::mmap(nullptr, size, prot, flags, fd, offset);
  if (p == MAP_FAILED) {
    return Status::FromErrno(errno, "mmap " + std::string(what) + " (" + std::to_string(size) +
                                        " bytes)");
  }
  Mapping m;
  m.addr_ = p;
  m.size_ = size;
  return m;
}

void Mapping::Reset() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

}  // namespace pmlmig
