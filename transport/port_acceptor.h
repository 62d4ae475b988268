// PortAcceptor: the receiver's listening port when it carries both gRPC and
// direct data streams (a receiver not under TLS, proto/migration.proto
// "Direct data streams"). It accepts every connection itself and looks at
// its first bytes: a direct stream starts with the 8-byte magic of
// direct_wire.h and is handed on, with its hello, to on_direct; anything
// else (HTTP/2's preface, or garbage) goes to on_grpc, which gives it to the
// gRPC server (grpc::AddInsecureChannelFromFd), so gRPC sees exactly the
// bytes the peer sent. One port, so firewalls, proxies and traffic shaping
// see one address, as before.
//
// One thread, an epoll loop over the listening socket and the connections
// not yet decided (at most kMaxPending, 64: a new one beyond that closes
// the oldest undecided one, so silent connections cannot lock senders out;
// each decided by its first bytes, or handed to gRPC after 10 s of silence;
// a direct hello must be whole within 5 s). The callbacks run on that thread and must not block.
//
// Thread-safety: Start, port and the destructor (which stops and joins the
// thread, closing what is undecided) from one thread.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "direct_wire.h"

namespace pmlmig::transport {

class PortAcceptor {
 public:
  struct Handlers {
    std::function<void(UniqueFd)> on_grpc;
    std::function<void(UniqueFd, const direct::Hello&)> on_direct;
  };
  // Listens on every address of host:port (port 0: a free one, the same
  // on each); the handlers run once Run is called.
  static Result<std::unique_ptr<PortAcceptor>> Listen(const std::string& host, uint16_t port);
  ~PortAcceptor();
  PortAcceptor(const PortAcceptor&) = delete;
  PortAcceptor& operator=(const PortAcceptor&) = delete;

  uint16_t port() const { return port_; }
  // Starts accepting (once).
  Status Run(Handlers handlers);
  // Stops accepting and closes what is undecided; idempotent.
  void Stop();

 private:
  PortAcceptor(std::vector<UniqueFd> fds, uint16_t port) : listen_(std::move(fds)), port_(port) {}
  void Loop();

  const std::vector<UniqueFd> listen_;  // one per address of the host, one port
  const uint16_t port_;
  Handlers handlers_;
  UniqueFd epoll_;
  UniqueFd wake_;  // an eventfd: Stop
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace pmlmig::transport
