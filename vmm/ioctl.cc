#include "ioctl.h"

namespace pmlmig::vmm {

Result<int> KvmIoctl(int fd, unsigned long request, void* arg, std::string_view name,
                     std::string_view object) {
  int r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    std::string what(name);
    if (!object.empty()) {
      what += " (";
      what += object;
      what += ")";
    }
    return Status::FromErrno(errno, what);
  }
  return r;
}

}  // namespace pmlmig::vmm
