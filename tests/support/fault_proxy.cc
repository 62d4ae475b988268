// fault_proxy: a loopback TCP proxy for tests that injects one fault into the
// traffic it forwards.
//
//   fault_proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT
//               [--fault none|cut|stall|corrupt] [--after BYTES] [--direction up|down]
//               [--port-file FILE] [--log FILE]
//
// Every accepted connection is forwarded to the upstream. The proxy counts the
// bytes flowing in one direction (up = client to upstream, down = upstream to
// client), summed over all connections. When the count reaches --after, the
// fault fires, once:
//   cut      every connection open at that moment is reset (RST) on both sides;
//   stall    every connection open at that moment stops moving (held open,
//            nothing read or written) until the proxy exits;
//   corrupt  the byte at offset --after of the counted direction is flipped.
// Connections accepted after a cut or stall are forwarded normally. Exactly
// --after bytes are forwarded before a cut or stall fires (a cut first waits up
// to 200 ms for them to be acknowledged, since an RST drops unacknowledged data).
//
// Single-threaded: one poll loop over non-blocking sockets, so the byte count
// and the moment of the fault are exact. Binds and connects to loopback only.
// SIGTERM/SIGINT exit 0; bad flags exit 2 with one line; failures exit 1.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <list>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/base/units.h"

namespace pmlmig::fault_proxy {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
constexpr size_t kBufferBytes = 64 * 1024;

enum class Fault { kNone, kCut, kStall, kCorrupt };
enum class Direction { kUp, kDown };

const char* FaultName(Fault f) {
  switch (f) {
    case Fault::kNone: return "none";
    case Fault::kCut: return "cut";
    case Fault::kStall: return "stall";
    case Fault::kCorrupt: return "corrupt";
  }
  return "?";
}

struct Address {
  sockaddr_storage ss{};
  socklen_t len = 0;
};

struct Flags {
  Address listen;
  Address upstream;
  Fault fault = Fault::kNone;
  uint64_t after = 0;
  Direction direction = Direction::kUp;
  std::string port_file;
  std::string log;
};

constexpr char kUsage[] =
    "Usage: fault_proxy --listen HOST:PORT --upstream HOST:PORT [--fault none|cut|stall|corrupt]\n"
    "                   [--after BYTES] [--direction up|down] [--port-file FILE] [--log FILE]\n"
    "A loopback TCP proxy that forwards every connection to the upstream and injects one fault\n"
    "when the bytes counted in --direction (up: client to upstream, the default; down: upstream\n"
    "to client), summed over all connections, reach --after (K, M, G suffixes):\n"
    "  cut      reset every connection open at that moment (RST on both sides)\n"
    "  stall    stop forwarding on every connection open at that moment, until exit\n"
    "  corrupt  flip the byte at offset --after (xor 0xff)\n"
    "Later connections are forwarded normally. HOST is a loopback address (127.x.x.x, [::1] or\n"
    "localhost); --listen port 0 picks a free port, written to --port-file. SIGTERM/SIGINT exit.\n";

// "127.0.0.1:80", "[::1]:80", "localhost:80"; loopback only, numeric port.
Result<Address> ParseLoopback(std::string_view flag, std::string_view text, bool allow_port_zero) {
  const std::string where = std::string(flag) + ": '" + std::string(text) + "'";
  std::string host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return InvalidArgument(where + " is not HOST:PORT");
    }
    host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0) return InvalidArgument(where + " is not HOST:PORT");
    host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
  }
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return InvalidArgument(where + ": invalid port");
  }
  const unsigned long p = std::stoul(std::string(port));
  if (p > 65535 || (p == 0 && !allow_port_zero)) return InvalidArgument(where + ": port out of range");
  if (host == "localhost") host = "127.0.0.1";
  Address a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.ss);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    if ((ntohl(v4->sin_addr.s_addr) >> 24) != 127) return InvalidArgument(where + ": not a loopback address");
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(p));
    a.len = sizeof(sockaddr_in);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    if (!IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr)) return InvalidArgument(where + ": not a loopback address");
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(p));
    a.len = sizeof(sockaddr_in6);
  } else {
    return InvalidArgument(where + ": host must be a loopback IP address or localhost");
  }
  return a;
}

Result<Flags> ParseFlags(int argc, char** argv, bool* help) {
  Flags f;
  bool have_listen = false, have_upstream = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      *help = true;
      return f;
    }
    std::string value;
    if (const size_t eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return InvalidArgument("unknown flag or missing value: '" + arg + "'");
    }
    if (arg == "--listen") {
      PMLMIG_ASSIGN_OR_RETURN(f.listen, ParseLoopback(arg, value, true));
      have_listen = true;
    } else if (arg == "--upstream") {
      PMLMIG_ASSIGN_OR_RETURN(f.upstream, ParseLoopback(arg, value, false));
      have_upstream = true;
    } else if (arg == "--fault") {
      if (value == "none") f.fault = Fault::kNone;
      else if (value == "cut") f.fault = Fault::kCut;
      else if (value == "stall") f.fault = Fault::kStall;
      else if (value == "corrupt") f.fault = Fault::kCorrupt;
      else return InvalidArgument("--fault: '" + value + "' is not none, cut, stall or corrupt");
    } else if (arg == "--after") {
      auto n = ParseSize(value);
      if (!n.ok()) return n.status().WithContext("--after");
      f.after = *n;
    } else if (arg == "--direction") {
      if (value == "up") f.direction = Direction::kUp;
      else if (value == "down") f.direction = Direction::kDown;
      else return InvalidArgument("--direction: '" + value + "' is not up or down");
    } else if (arg == "--port-file") {
      if (value.empty()) return InvalidArgument("--port-file: empty path");
      f.port_file = value;
    } else if (arg == "--log") {
      if (value.empty()) return InvalidArgument("--log: empty path");
      f.log = value;
    } else {
      return InvalidArgument("unknown flag '" + arg + "'");
    }
  }
  if (!have_listen) return InvalidArgument("--listen is required");
  if (!have_upstream) return InvalidArgument("--upstream is required");
  return f;
}

// The write end of the self-pipe that turns SIGTERM/SIGINT into poll input.
int g_signal_fd = -1;

void OnSignal(int) {
  const int saved = errno;
  const char c = 1;
  [[maybe_unused]] ssize_t n = write(g_signal_fd, &c, 1);
  errno = saved;
}

// Closes a socket with an RST rather than a FIN.
void Reset(UniqueFd& fd) {
  if (!fd.valid()) return;
  linger l{1, 0};
  (void)setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
  fd.Reset();
}

// One direction of a connection: bytes read from src, waiting to go to dst.
struct Flow {
  std::unique_ptr<char[]> buf = std::make_unique<char[]>(kBufferBytes);
  size_t off = 0;
  size_t len = 0;
  bool eof = false;   // src sent FIN
  bool shut = false;  // FIN passed on to dst
};

struct Conn {
  UniqueFd client;
  UniqueFd upstream;
  bool connecting = true;  // upstream connect() in progress
  bool stalled = false;    // frozen by the stall fault
  bool dead = false;       // to be removed
  Flow up;                 // client -> upstream
  Flow down;               // upstream -> client
  int client_slot = -1;    // index into the pollfd array, or -1
  int upstream_slot = -1;
};

class Proxy {
 public:
  Proxy(Flags flags, FILE* log) : f_(std::move(flags)), log_(log) {}

  Status Listen() {
    listen_.Reset(socket(f_.listen.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!listen_.valid()) return Status::FromErrno(errno, "socket");
    const int one = 1;
    (void)setsockopt(listen_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listen_.get(), reinterpret_cast<const sockaddr*>(&f_.listen.ss), f_.listen.len) != 0) {
      return Status::FromErrno(errno, "bind (--listen)");
    }
    if (listen(listen_.get(), 128) != 0) return Status::FromErrno(errno, "listen");
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (getsockname(listen_.get(), reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
      return Status::FromErrno(errno, "getsockname");
    }
    port_ = ntohs(bound.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                             : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    if (!f_.port_file.empty()) {
      const std::string tmp = f_.port_file + ".tmp." + std::to_string(getpid());
      FILE* out = std::fopen(tmp.c_str(), "w");
      if (out == nullptr) return Status::FromErrno(errno, "open (--port-file) " + tmp);
      std::fprintf(out, "%u\n", port_);
      if (std::fclose(out) != 0) return Status::FromErrno(errno, "write (--port-file) " + tmp);
      if (std::rename(tmp.c_str(), f_.port_file.c_str()) != 0) {
        return Status::FromErrno(errno, "rename (--port-file) " + f_.port_file);
      }
    }
    return Status::Ok();
  }

  Status Run(int signal_read_fd) {
    std::vector<pollfd> fds;
    for (;;) {
      fds.clear();
      fds.push_back({signal_read_fd, POLLIN, 0});
      fds.push_back({listen_.get(), POLLIN, 0});
      for (Conn& c : conns_) {
        c.client_slot = c.upstream_slot = -1;
        if (c.stalled || c.dead) continue;
        short ce = 0, ue = 0;
        if (c.connecting) {
          ue = POLLOUT;
        } else {
          if (c.up.len == 0 && !c.up.eof) ce |= POLLIN;
          if (c.down.len > 0) ce |= POLLOUT;
          if (c.down.len == 0 && !c.down.eof) ue |= POLLIN;
          if (c.up.len > 0) ue |= POLLOUT;
        }
        c.client_slot = static_cast<int>(fds.size());
        fds.push_back({c.client.get(), ce, 0});
        c.upstream_slot = static_cast<int>(fds.size());
        fds.push_back({c.upstream.get(), ue, 0});
      }
      if (poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "poll");
      }
      if (fds[0].revents != 0) return Status::Ok();  // SIGTERM / SIGINT
      for (Conn& c : conns_) {
        if (c.client_slot < 0 || c.dead || c.stalled) continue;
        Service(c, fds[c.client_slot].revents, fds[c.upstream_slot].revents);
      }
      conns_.remove_if([](const Conn& c) { return c.dead; });
      // Accept after servicing, so a fault that fires above never touches
      // connections that were not open when it fired.
      if (fds[1].revents != 0) AcceptAll();
    }
  }

 private:
  void Log(const std::string& line) {
    std::fprintf(log_, "fault_proxy: %s\n", line.c_str());
    std::fflush(log_);
  }

  void AcceptAll() {
    for (;;) {
      UniqueFd client(accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!client.valid()) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
          Log(Status::FromErrno(errno, "accept").message());
        }
        return;
      }
      UniqueFd up(socket(f_.upstream.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
      if (!up.valid()) {
        Log(Status::FromErrno(errno, "socket (upstream)").message());
        Reset(client);
        continue;
      }
      const bool now = connect(up.get(), reinterpret_cast<const sockaddr*>(&f_.upstream.ss), f_.upstream.len) == 0;
      if (!now && errno != EINPROGRESS) {
        Log(Status::FromErrno(errno, "connect (upstream)").message());
        Reset(client);
        continue;
      }
      Conn& c = conns_.emplace_back();
      c.client = std::move(client);
      c.upstream = std::move(up);
      c.connecting = !now;
    }
  }

  void Abort(Conn& c) {
    Reset(c.client);
    Reset(c.upstream);
    c.dead = true;
  }

  void Service(Conn& c, short client_events, short upstream_events) {
    if (c.connecting) {
      if (upstream_events == 0) return;
      int err = 0;
      socklen_t len = sizeof err;
      if (getsockopt(c.upstream.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) {
        Log(Status::FromErrno(err, "connect (upstream)").message());
        Abort(c);
        return;
      }
      c.connecting = false;
      return;
    }
    Pump(c, c.up, c.client, client_events, c.upstream, upstream_events, f_.direction == Direction::kUp);
    if (c.dead || c.stalled) return;
    Pump(c, c.down, c.upstream, upstream_events, c.client, client_events, f_.direction == Direction::kDown);
    if (c.dead || c.stalled) return;
    if (c.up.shut && c.down.shut) {  // both sides finished cleanly
      c.client.Reset();
      c.upstream.Reset();
      c.dead = true;
    }
  }

  // Sends what the flow holds; false on a broken destination.
  bool Flush(Flow& fl, UniqueFd& dst) {
    while (fl.len > 0) {
      const ssize_t n = send(dst.get(), fl.buf.get() + fl.off, fl.len, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK;
      }
      fl.off += static_cast<size_t>(n);
      fl.len -= static_cast<size_t>(n);
    }
    fl.off = 0;
    return true;
  }

  bool Armed() const { return f_.fault != Fault::kNone && !fired_; }
  bool Stops() const { return f_.fault == Fault::kCut || f_.fault == Fault::kStall; }

  // dst broke while fl was being sent to it. A kernel between the peers
  // would still deliver what dst had sent before its reset (a refusal, say),
  // so pass that on to src, for up to 200 ms, before resetting both.
  void Broken(Conn& c, Flow& fl, UniqueFd& src, UniqueFd& dst) {
    Flow& back = &fl == &c.up ? c.down : c.up;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    for (;;) {
      if (back.len > 0) {
        if (!Flush(back, src)) break;
        if (back.len > 0) {
          if (std::chrono::steady_clock::now() >= deadline) break;
          pollfd p{src.get(), POLLOUT, 0};
          (void)poll(&p, 1, 10);
          continue;
        }
      }
      const ssize_t n = recv(dst.get(), back.buf.get(), kBufferBytes, MSG_DONTWAIT);
      if (n <= 0) break;
      back.off = 0;
      back.len = static_cast<size_t>(n);
    }
    Abort(c);
  }

  void Pump(Conn& c, Flow& fl, UniqueFd& src, short src_events, UniqueFd& dst, short dst_events, bool counted) {
    constexpr short kAny = POLLIN | POLLOUT | POLLERR | POLLHUP;
    if (fl.len > 0 && (dst_events & kAny) != 0 && !Flush(fl, dst)) return Broken(c, fl, src, dst);
    if (fl.len != 0 || fl.eof || (src_events & kAny) == 0) {
      if (fl.eof && fl.len == 0 && !fl.shut) {
        (void)shutdown(dst.get(), SHUT_WR);
        fl.shut = true;
      }
      return;
    }
    size_t want = kBufferBytes;
    if (counted && Armed() && Stops()) {
      if (count_ == f_.after) return Fire();  // --after 0: fire before the first byte
      want = std::min<uint64_t>(want, f_.after - count_);
    }
    const ssize_t n = recv(src.get(), fl.buf.get(), want, 0);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      return Abort(c);  // reset by the peer: pass the reset on
    }
    if (n == 0) {
      fl.eof = true;
      (void)shutdown(dst.get(), SHUT_WR);
      fl.shut = true;
      return;
    }
    fl.off = 0;
    fl.len = static_cast<size_t>(n);
    if (counted) {
      if (Armed() && f_.fault == Fault::kCorrupt && f_.after >= count_ && f_.after < count_ + fl.len) {
        fl.buf[f_.after - count_] ^= static_cast<char>(0xff);
        fired_ = true;
        Log(std::string("corrupt after ") + std::to_string(f_.after) + " bytes " + DirectionName() +
            " (byte flipped)");
      }
      count_ += fl.len;
    }
    if (!Flush(fl, dst)) return Broken(c, fl, src, dst);
    if (counted && Armed() && Stops() && count_ == f_.after) Fire();
  }

  const char* DirectionName() const { return f_.direction == Direction::kUp ? "up" : "down"; }

  // Before a cut: lets what was already forwarded reach the peers (an RST
  // discards a socket's unsent and unacknowledged bytes), for up to 200 ms.
  void Drain() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    for (;;) {
      bool pending = false;
      for (Conn& c : conns_) {
        if (c.dead || c.stalled || c.connecting) continue;
        for (const UniqueFd* fd : {&c.client, &c.upstream}) {
          int outq = 0;
          if (fd->valid() && ioctl(fd->get(), SIOCOUTQ, &outq) == 0 && outq > 0) pending = true;
        }
      }
      if (!pending || std::chrono::steady_clock::now() >= deadline) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  void Fire() {
    fired_ = true;
    if (f_.fault == Fault::kCut) Drain();
    size_t n = 0;
    for (const Conn& c : conns_) n += c.dead || c.stalled ? 0 : 1;
    // Logged before acting, so that whoever sees the fault can read the line.
    Log(std::string(FaultName(f_.fault)) + " after " + std::to_string(count_) + " bytes " + DirectionName() + " (" +
        std::to_string(n) + " connection" + (n == 1 ? "" : "s") + ")");
    for (Conn& c : conns_) {
      if (c.dead || c.stalled) continue;
      if (f_.fault == Fault::kCut) Abort(c);
      else c.stalled = true;
    }
  }

  Flags f_;
  FILE* log_;
  UniqueFd listen_;
  unsigned port_ = 0;
  std::list<Conn> conns_;
  uint64_t count_ = 0;   // bytes seen in the counted direction, all connections
  bool fired_ = false;
};

int Main(int argc, char** argv) {
  bool help = false;
  auto flags = ParseFlags(argc, argv, &help);
  if (help) {
    std::fputs(kUsage, stdout);
    return kExitOk;
  }
  if (!flags.ok()) {
    std::fprintf(stderr, "fault_proxy: error: %s (see 'fault_proxy --help')\n", flags.status().message().c_str());
    return kExitUsage;
  }
  FILE* log = stderr;
  if (!flags->log.empty()) {
    log = std::fopen(flags->log.c_str(), "a");
    if (log == nullptr) {
      std::fprintf(stderr, "fault_proxy: error: %s\n",
                   Status::FromErrno(errno, "open (--log) " + flags->log).message().c_str());
      return kExitFailure;
    }
  }
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_NONBLOCK | O_CLOEXEC) != 0) {
    std::fprintf(stderr, "fault_proxy: error: %s\n", Status::FromErrno(errno, "pipe2").message().c_str());
    return kExitFailure;
  }
  UniqueFd signal_read(pipe_fds[0]), signal_write(pipe_fds[1]);
  g_signal_fd = signal_write.get();
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  Proxy proxy(std::move(*flags), log);
  Status s = proxy.Listen();
  if (s.ok()) s = proxy.Run(signal_read.get());
  if (!s.ok()) std::fprintf(stderr, "fault_proxy: error: %s\n", s.message().c_str());
  if (log != stderr) std::fclose(log);
  return s.ok() ? kExitOk : kExitFailure;
}

}  // namespace
}  // namespace pmlmig::fault_proxy

int main(int argc, char** argv) { return pmlmig::fault_proxy::Main(argc, argv); }
