#include "connection_probe.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>

#include "pmlmig/base/unique_fd.h"
#include "pmlmig/transport/security.h"

namespace pmlmig::transport {

bool ConnectionRefused(const std::string& target) {
  std::string host, port;
  if (!SplitHostPort(target, &host, &port)) return false;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) return false;
  bool all_refused = true;
  for (addrinfo* ai = res; ai != nullptr && all_refused; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd.valid()) {
      all_refused = false;
      break;
    }
    int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    int err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd p{fd.get(), POLLOUT, 0};
      if (::poll(&p, 1, 1000) == 1) {
        socklen_t len = sizeof err;
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      } else {
        err = ETIMEDOUT;
      }
    }
    if (err != ECONNREFUSED) all_refused = false;
  }
  freeaddrinfo(res);
  return all_refused;
}

}  // namespace pmlmig::transport
