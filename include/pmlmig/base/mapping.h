// Mapping: the one owner of an mmap()ed range. Move-only; unmaps on
// destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>

#include "pmlmig/base/status.h"

namespace pmlmig {

class Mapping {
 public:
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept;
  ~Mapping() { Reset(); }

  // mmap(nullptr, size, prot, flags, fd, offset); `what` names the object in
  // the error message.
  static Result<Mapping> Map(size_t size, int prot, int flags, int fd, off_t offset,
                             std::string_view what);

  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  size_t size() const { return size_; }
  bool valid() const { return addr_ != nullptr; }
  void Reset();

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace pmlmig
