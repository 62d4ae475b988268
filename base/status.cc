#include "pmlmig/base/status.h"

#include <cerrno>
#include <cstring>

namespace pmlmig {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk: return "ok";
    case Code::kInvalidArgument: return "invalid argument";
    case Code::kNotFound: return "not found";
    case Code::kPermissionDenied: return "permission denied";
    case Code::kUnavailable: return "unavailable";
    case Code::kResourceExhausted: return "resource exhausted";
    case Code::kAborted: return "aborted";
    case Code::kDataLoss: return "data loss";
    case Code::kInternal: return "internal";
  }
  return "unknown";
}

Status Status::FromErrno(int err, std::string_view what) {
  Code code = Code::kInternal;
  switch (err) {
    case EINVAL: case E2BIG: case EFAULT: case ERANGE: code = Code::kInvalidArgument; break;
    case ENOENT: case ENODEV: case ENXIO: code = Code::kNotFound; break;
    case EACCES: case EPERM: code = Code::kPermissionDenied; break;
    case ENOMEM: case ENOSPC: case EMFILE: case ENFILE: code = Code::kResourceExhausted; break;
    case ENOSYS: case EOPNOTSUPP: case ENOTTY: code = Code::kUnavailable; break;
    default: break;
  }
  std::string msg(what);
  msg += ": ";
  msg += std::strerror(err);
  return Status(code, std::move(msg));
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string msg(context);
  msg += ": ";
  msg += message_;
  return Status(code_, std::move(msg));
}

}  // namespace pmlmig
