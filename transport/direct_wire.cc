#include "direct_wire.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace pmlmig::transport::direct {

void PutU32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }  // x86-64: little-endian
void PutU64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t GetU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t GetU64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

std::array<uint8_t, kHelloBytes> EncodeHello(const Hello& h) {
  std::array<uint8_t, kHelloBytes> out{};
  std::memcpy(out.data(), kMagic, sizeof kMagic);
  PutU32(out.data() + 8, h.version);
  PutU32(out.data() + 12, h.stream);
  PutU64(out.data() + 16, h.session_id);
  std::memcpy(out.data() + 24, h.key.data(), kKeyBytes);
  return out;
}

Result<Hello> DecodeHello(std::span<const uint8_t, kHelloBytes> bytes) {
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
    return InvalidArgument("not a pmlmig data connection (its first 8 bytes are not the direct stream's magic)");
  }
  Hello h;
  h.version = GetU32(bytes.data() + 8);
  h.stream = GetU32(bytes.data() + 12);
  h.session_id = GetU64(bytes.data() + 16);
  std::memcpy(h.key.data(), bytes.data() + 24, kKeyBytes);
  return h;
}

std::array<uint8_t, kReplyBytes> EncodeReply(const Reply& r) {
  std::array<uint8_t, kReplyBytes> out{};
  PutU32(out.data(), static_cast<uint32_t>(r.kind));
  PutU32(out.data() + 4, r.a);
  PutU64(out.data() + 8, r.b);
  return out;
}

Result<Reply> DecodeReply(std::span<const uint8_t, kReplyBytes> bytes) {
  Reply r;
  const uint32_t kind = GetU32(bytes.data());
  r.a = GetU32(bytes.data() + 4);
  r.b = GetU64(bytes.data() + 8);
  if (kind < 1 || kind > 3) return InvalidArgument("reply of unknown kind " + std::to_string(kind));
  r.kind = static_cast<ReplyKind>(kind);
  if (r.kind == ReplyKind::kError && r.b > kMaxErrorBytes) {
    return InvalidArgument("error reply of " + std::to_string(r.b) + " bytes, more than " +
                           std::to_string(kMaxErrorBytes));
  }
  return r;
}

Result<Key> NewKey() {
  Key k;
  size_t got = 0;
  while (got < k.size()) {
    const ssize_t n = ::getrandom(k.data() + got, k.size() - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Status::FromErrno(errno, "getrandom (direct stream key)");
    got += static_cast<size_t>(n);
  }
  return k;
}

bool SameKey(const Key& a, std::string_view b) {
  if (b.size() != a.size()) return false;
  uint8_t diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<uint8_t>(a[i] ^ static_cast<uint8_t>(b[i]));
  return diff == 0;
}

namespace {

// Waits until `fd` is ready for `events`, `stop` is set or the deadline
// passes; 50 ms slices.
Status WaitReady(int fd, short events, const std::atomic<bool>& stop, Deadline deadline, const char* what) {
  for (;;) {
    if (stop.load(std::memory_order_relaxed)) return Aborted(std::string(what) + ": stopped");
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return Unavailable(std::string(what) + ": timed out");
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left + 1, 50)));
    if (r < 0 && errno != EINTR) return Status::FromErrno(errno, std::string(what) + " (poll)");
    if (r > 0) return Status::Ok();
  }
}

}  // namespace

Status ReadFull(int fd, uint8_t* buf, size_t n, const std::atomic<bool>& stop, Deadline deadline) {
  const std::span<uint8_t> all(buf, n);
  return ReadScattered(fd, std::span(&all, 1), stop, nullptr, deadline);
}

Status ReadScattered(int fd, std::span<const std::span<uint8_t>> dest, const std::atomic<bool>& stop,
                     const std::function<void(const uint8_t*, size_t)>& landed, Deadline deadline) {
  constexpr size_t kMaxIov = 64;
  // What is told of is hashed while still in cache: a bound on each read.
  const size_t most = landed ? kLandingBytes : SIZE_MAX;
  size_t piece = 0;  // dest[piece] + off is the next byte to land
  size_t off = 0;
  auto skip_filled = [&] {  // past pieces that are full (or empty)
    while (piece < dest.size() && off == dest[piece].size()) {
      ++piece;
      off = 0;
    }
  };
  for (skip_filled(); piece < dest.size(); skip_filled()) {
    iovec iov[kMaxIov];
    size_t n_iov = 0;
    size_t want = 0;
    for (size_t i = piece, o = off; i < dest.size() && n_iov < kMaxIov && want < most; ++i, o = 0) {
      const size_t k = std::min(dest[i].size() - o, most - want);
      iov[n_iov++] = {dest[i].data() + o, k};
      want += k;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = n_iov;
    const ssize_t r = ::recvmsg(fd, &msg, MSG_DONTWAIT);
    if (r > 0) {
      for (size_t left = static_cast<size_t>(r); left > 0;) {
        const size_t k = std::min(left, dest[piece].size() - off);
        if (landed) landed(dest[piece].data() + off, k);
        left -= k;
        off += k;
        skip_filled();
      }
      continue;
    }
    if (r == 0) return Unavailable("the peer closed the connection");
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return Status::FromErrno(errno, "reading the data connection");
    PMLMIG_RETURN_IF_ERROR(WaitReady(fd, POLLIN, stop, deadline, "reading the data connection"));
  }
  return Status::Ok();
}

Status WriteFull(int fd, const uint8_t* buf, size_t n, const std::atomic<bool>& stop, Deadline deadline) {
  while (n > 0) {
    const ssize_t w = ::send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
      buf += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      return Status::FromErrno(errno, "writing the data connection");
    }
    PMLMIG_RETURN_IF_ERROR(WaitReady(fd, POLLOUT, stop, deadline, "writing the data connection"));
  }
  return Status::Ok();
}

void TuneBulkSocket(int fd) {
  const int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

namespace {

struct AddrInfo {
  addrinfo* list = nullptr;
  ~AddrInfo() {
    if (list != nullptr) ::freeaddrinfo(list);
  }
};

Status Resolve(const std::string& host, uint16_t port, bool passive, AddrInfo* out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  const std::string service = std::to_string(port);
  const int r = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &out->list);
  if (r != 0) return Unavailable("resolving " + host + ": " + ::gai_strerror(r));
  return Status::Ok();
}

// Calls `each(address, fd)` with a new socket for every address of `list`
// in turn; the first socket it accepts, or its last failure.
template <typename Each>
Result<UniqueFd> FirstThatWorks(const addrinfo* list, Each each) {
  Status last = Unavailable("no address");
  for (const addrinfo* a = list; a != nullptr; a = a->ai_next) {
    UniqueFd fd(::socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd.valid()) {
      last = Status::FromErrno(errno, "socket");
    } else if (Status s = each(*a, fd.get()); !s.ok()) {
      last = std::move(s);
    } else {
      return fd;
    }
  }
  return last;
}

uint16_t PortOf(const sockaddr_storage& ss) {
  return ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port
                                        : reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
}

void SetPort(sockaddr* sa, uint16_t port) {
  if (sa->sa_family == AF_INET6) reinterpret_cast<sockaddr_in6*>(sa)->sin6_port = htons(port);
  else reinterpret_cast<sockaddr_in*>(sa)->sin_port = htons(port);
}

std::string Where(const std::string& host, uint16_t port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace

Result<UniqueFd> Connect(const std::string& host, uint16_t port, const std::atomic<bool>& stop, Deadline deadline) {
  AddrInfo ai;
  PMLMIG_RETURN_IF_ERROR(Resolve(host, port, false, &ai));
  Result<UniqueFd> fd = FirstThatWorks(ai.list, [&](const addrinfo& a, int s) -> Status {
    if (::connect(s, a.ai_addr, a.ai_addrlen) != 0 && errno != EINPROGRESS) return Status::FromErrno(errno, "connect");
    PMLMIG_RETURN_IF_ERROR(WaitReady(s, POLLOUT, stop, deadline, "connect"));
    int err = 0;
    socklen_t len = sizeof err;
    (void)::getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) return Status::FromErrno(err, "connect");
    TuneBulkSocket(s);
    return Status::Ok();
  });
  if (!fd.ok()) return Unavailable("data connection to " + Where(host, port) + ": " + fd.status().message());
  return fd;
}

Result<std::vector<UniqueFd>> Listen(const std::string& host, uint16_t port, uint16_t* bound) {
  AddrInfo ai;
  PMLMIG_RETURN_IF_ERROR(Resolve(host, port, true, &ai));
  bool has_v4 = false;
  for (const addrinfo* a = ai.list; a != nullptr; a = a->ai_next) has_v4 |= a->ai_family == AF_INET;
  std::vector<UniqueFd> fds;
  Status last = Unavailable("no address");
  uint16_t chosen = port;
  for (addrinfo* a = ai.list; a != nullptr; a = a->ai_next) {
    // This address alone, on the port the first one got.
    sockaddr_storage addr{};
    std::memcpy(&addr, a->ai_addr, std::min<size_t>(a->ai_addrlen, sizeof addr));
    SetPort(reinterpret_cast<sockaddr*>(&addr), chosen);
    addrinfo only = *a;
    only.ai_addr = reinterpret_cast<sockaddr*>(&addr);
    only.ai_next = nullptr;
    Result<UniqueFd> fd = FirstThatWorks(&only, [&](const addrinfo& x, int s) -> Status {
      const int on = 1;
      (void)::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
      if (x.ai_family == AF_INET6 && has_v4) (void)::setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on);
      if (::bind(s, x.ai_addr, x.ai_addrlen) != 0) return Status::FromErrno(errno, "bind");
      if (::listen(s, 64) != 0) return Status::FromErrno(errno, "listen");
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      if (::getsockname(s, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return Status::FromErrno(errno, "getsockname");
      chosen = PortOf(ss);
      return Status::Ok();
    });
    if (fd.ok()) fds.push_back(std::move(fd).value());
    else last = fd.status();
  }
  if (fds.empty()) return Unavailable("cannot listen on " + Where(host, port) + ": " + last.message());
  *bound = chosen;
  return fds;
}

}  // namespace pmlmig::transport::direct
