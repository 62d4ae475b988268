// An in-process loopback TCP proxy that a test switches at exact moments
// (from inside a fake target's or VM's hooks): forward, reset every open
// connection, swallow what clients send on the connections open now,
// swallow everything, or stall (move nothing, read nothing: the peers'
// buffers fill up, as behind a frozen link). Unlike tests/support/fault_proxy (a separate process
// driven by byte counts), it acts on protocol events. Test-only, header-only.
#pragma once

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/unique_fd.h"

namespace pmlmig::testing_support {

// A loopback TCP proxy whose behaviour the test switches at run time.
class Proxy {
 public:
  enum class Mode {
    kForward,         // pass everything
    kDropUpstream,    // connections open now: client->server bytes vanish; new ones forward
    kBlackhole,       // every connection, old and new: nothing passes either way
  };

  explicit Proxy(int upstream_port) : upstream_(upstream_port) {
    listener_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(listener_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(listener_.get(), 64), 0);
    socklen_t len = sizeof a;
    ::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { Accept(); });
  }
  ~Proxy() {
    stop_ = true;
    ::shutdown(listener_.get(), SHUT_RDWR);
    acceptor_.join();
    std::lock_guard lock(mu_);
    for (auto& t : workers_) t.join();
  }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }

  // Resets (RST) every connection open now; later ones forward.
  void CutAll() { ++cut_generation_; }
  void DropUpstream() { drop_generation_ = generation_.load(); }
  void Blackhole() { blackhole_ = true; }
  // Every connection, old and new: neither read nor write (CutAll still cuts).
  void Stall() { stalled_ = true; }

 private:
  void Accept() {
    while (!stop_) {
      int c = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      std::lock_guard lock(mu_);
      const uint64_t gen = ++generation_;
      workers_.emplace_back([this, c, gen] { Serve(UniqueFd(c), gen); });
    }
  }
  void Serve(UniqueFd client, uint64_t gen) {
    UniqueFd server(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(upstream_));
    if (::connect(server.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return;
    const uint64_t cut_at_start = cut_generation_;
    char buf[65536];
    for (;;) {
      if (stop_ || cut_generation_ != cut_at_start) break;
      if (stalled_) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      pollfd p[2] = {{client.get(), POLLIN, 0}, {server.get(), POLLIN, 0}};
      if (::poll(p, 2, 20) <= 0) continue;
      if (cut_generation_ != cut_at_start) break;  // cut while waiting: nothing more passes
      bool closed = false;
      for (int i = 0; i < 2 && !closed; ++i) {
        if ((p[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        const ssize_t n = ::read(p[i].fd, buf, sizeof buf);
        if (n <= 0) {
          closed = true;
          break;
        }
        const bool upstream = i == 0;
        if (blackhole_ || (upstream && gen <= drop_generation_)) continue;  // swallowed
        const int to = upstream ? server.get() : client.get();
        for (ssize_t off = 0; off < n;) {
          const ssize_t w = ::write(to, buf + off, static_cast<size_t>(n - off));
          if (w <= 0) {
            closed = true;
            break;
          }
          off += w;
        }
      }
      if (closed) break;
    }
    // Reset rather than close cleanly: the peers see a broken connection.
    linger l{1, 0};
    ::setsockopt(client.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    ::setsockopt(server.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
  }

  const int upstream_;
  UniqueFd listener_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> cut_generation_{0};
  std::atomic<uint64_t> drop_generation_{0};
  std::atomic<bool> blackhole_{false};
  std::atomic<bool> stalled_{false};
  std::mutex mu_;
  std::vector<std::thread> workers_;  // guarded by mu_
  std::thread acceptor_;
};

}  // namespace pmlmig::testing_support
