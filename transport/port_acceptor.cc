#include "port_acceptor.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>

namespace pmlmig::transport {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxPending = 64;
constexpr auto kDecideTimeout = std::chrono::seconds(10);
constexpr auto kHelloTimeout = std::chrono::seconds(5);

struct Pending {
  UniqueFd fd;
  Clock::time_point accepted;
  Clock::time_point deadline;
  bool direct = false;  // the magic matched: waiting for the whole hello
};

}  // namespace

Result<std::unique_ptr<PortAcceptor>> PortAcceptor::Listen(const std::string& host, uint16_t port) {
  uint16_t bound = 0;
  PMLMIG_ASSIGN_OR_RETURN(std::vector<UniqueFd> fds, direct::Listen(host, port, &bound));
  return std::unique_ptr<PortAcceptor>(new PortAcceptor(std::move(fds), bound));
}

PortAcceptor::~PortAcceptor() { Stop(); }

Status PortAcceptor::Run(Handlers handlers) {
  if (thread_.joinable()) return Internal("PortAcceptor::Run: called twice");
  handlers_ = std::move(handlers);
  epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return Status::FromErrno(errno, "epoll_create1");
  wake_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_.valid()) return Status::FromErrno(errno, "eventfd");
  std::vector<int> fds{wake_.get()};
  for (const UniqueFd& l : listen_) fds.push_back(l.get());
  for (int fd : fds) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return Status::FromErrno(errno, "epoll_ctl");
  }
  thread_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

void PortAcceptor::Stop() {
  if (stop_.exchange(true)) return;
  if (wake_.valid()) {
    const uint64_t one = 1;
    (void)::write(wake_.get(), &one, sizeof one);
  }
  if (thread_.joinable()) thread_.join();
}

void PortAcceptor::Loop() {
  std::map<int, Pending> pending;
  auto drop = [&](int fd) {
    (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    pending.erase(fd);  // closes it
  };
  auto to_grpc = [&](int fd) {
    (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    UniqueFd owned = std::move(pending[fd].fd);
    pending.erase(fd);
    handlers_.on_grpc(std::move(owned));
  };
  // Looks at what `fd` has sent so far, without consuming it for gRPC.
  auto decide = [&](int fd) {
    Pending& p = pending[fd];
    uint8_t head[direct::kHelloBytes];
    for (;;) {
      const size_t want = p.direct ? direct::kHelloBytes : sizeof direct::kMagic;
      const ssize_t n = ::recv(fd, head, want, MSG_PEEK | MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        drop(fd);  // closed before it said anything we need
        return;
      }
      if (n <= 0) return;
      const size_t got = static_cast<size_t>(n);
      if (p.direct) {
        if (got < direct::kHelloBytes) return;  // wait for the rest of the hello
        break;
      }
      if (std::memcmp(head, direct::kMagic, std::min(got, sizeof direct::kMagic)) != 0) {
        to_grpc(fd);
        return;
      }
      if (got < sizeof direct::kMagic) return;  // a prefix of the magic: wait for more
      p.direct = true;
      p.deadline = std::min(p.deadline, Clock::now() + kHelloTimeout);
    }
    Result<direct::Hello> hello = direct::DecodeHello(std::span<const uint8_t, direct::kHelloBytes>(head));
    (void)::recv(fd, head, direct::kHelloBytes, MSG_DONTWAIT);  // consume it
    (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
    UniqueFd owned = std::move(p.fd);
    pending.erase(fd);
    if (hello.ok()) handlers_.on_direct(std::move(owned), *hello);
  };

  epoll_event events[32];
  while (!stop_.load(std::memory_order_relaxed)) {
    const int n = ::epoll_wait(epoll_.get(), events, 32, 200);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == wake_.get()) continue;
      if (std::any_of(listen_.begin(), listen_.end(), [fd](const UniqueFd& l) { return l.get() == fd; })) {
        for (;;) {
          UniqueFd c(::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
          if (!c.valid()) break;
          // Full: the oldest undecided connection goes. A real sender's
          // first bytes (HTTP/2's preface, a direct hello) follow its
          // connect at once, so only a peer that keeps connections open
          // and silent waits that long; closing the newest instead would
          // let 64 of those lock every sender out until they time out.
          if (pending.size() >= kMaxPending) {
            auto oldest = std::min_element(pending.begin(), pending.end(), [](const auto& a, const auto& b) {
              return a.second.accepted < b.second.accepted;
            });
            drop(oldest->first);
          }
          // gRPC sets TCP_NODELAY on the sockets it accepts, not on those
          // it is handed: without it a small reply after another (an ack,
          // the Final reply) waits for the peer's delayed ACK, 40 ms.
          const int one = 1;
          (void)::setsockopt(c.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;  // edge: a prefix of the magic waits for new bytes
          ev.data.fd = c.get();
          if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, c.get(), &ev) != 0) continue;
          const int cfd = c.get();
          const auto now = Clock::now();
          pending[cfd] = Pending{std::move(c), now, now + kDecideTimeout, false};
        }
        continue;
      }
      if (pending.count(fd) != 0) decide(fd);
    }
    // Silent too long: gRPC decides (its own handshake timeout); a direct
    // stream whose hello never completed is closed.
    const auto now = Clock::now();
    std::vector<int> late;
    for (const auto& [fd, p] : pending) {
      if (now >= p.deadline) late.push_back(fd);
    }
    for (int fd : late) {
      if (pending[fd].direct) {
        drop(fd);
      } else {
        to_grpc(fd);
      }
    }
  }
}

}  // namespace pmlmig::transport
