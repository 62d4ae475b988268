#include "bench_baselines.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/vmm/fill.h"
#include "pmlmig/vmm/guest_memory.h"

namespace pmlmig::tools {
namespace {

using Clock = std::chrono::steady_clock;

double CpuMs(const rusage& r) {
  auto ms = [](const timeval& tv) {
    return static_cast<double>(tv.tv_sec) * 1e3 + static_cast<double>(tv.tv_usec) / 1e3;
  };
  return ms(r.ru_utime) + ms(r.ru_stime);
}

struct SocketPair {
  UniqueFd sender, receiver;
};

// `n` connected loopback TCP connections.
Result<std::vector<SocketPair>> LoopbackConnections(uint32_t n) {
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener.valid()) return Status::FromErrno(errno, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listener.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, "bind (127.0.0.1:0)");
  }
  if (::listen(listener.get(), static_cast<int>(n)) != 0) return Status::FromErrno(errno, "listen");
  socklen_t len = sizeof addr;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return Status::FromErrno(errno, "getsockname");
  }
  std::vector<SocketPair> pairs(n);
  for (SocketPair& p : pairs) {
    p.sender.Reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!p.sender.valid()) return Status::FromErrno(errno, "socket");
    if (::connect(p.sender.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
      return Status::FromErrno(errno, "connect (loopback)");
    }
    p.receiver.Reset(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!p.receiver.valid()) return Status::FromErrno(errno, "accept");
  }
  return pairs;
}

// One connection's work: `bytes` from `from` into `into`; a side whose
// pointer does not advance reuses its first 1 MiB.
struct Lane {
  uint64_t bytes = 0;
  const uint8_t* from = nullptr;
  bool from_advances = false;
  uint8_t* into = nullptr;
  bool into_advances = false;
};

// Runs every lane on its own connection, a sender and a receiver thread
// each, all released at once.
Result<TcpRun> RunLanes(const std::vector<Lane>& lanes) {
  const uint32_t n = static_cast<uint32_t>(lanes.size());
  PMLMIG_ASSIGN_OR_RETURN(std::vector<SocketPair> pairs, LoopbackConnections(n));
  std::vector<Status> errors(2 * n);
  std::vector<Clock::time_point> done(n);
  std::latch start(1);
  std::vector<std::thread> threads;
  threads.reserve(2 * n);
  for (uint32_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      const Lane& l = lanes[i];
      start.wait();
      for (uint64_t got = 0; got < l.bytes;) {
        uint8_t* at = l.into + (l.into_advances ? got : 0);
        const ssize_t r = ::read(pairs[i].receiver.get(), at, std::min(kBaselineChunk, l.bytes - got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
          errors[2 * i] = r < 0 ? Status::FromErrno(errno, "read (loopback)") : Internal("loopback: early end of stream");
          ::shutdown(pairs[i].receiver.get(), SHUT_RDWR);
          return;
        }
        got += static_cast<uint64_t>(r);
      }
      done[i] = Clock::now();
    });
    threads.emplace_back([&, i] {
      const Lane& l = lanes[i];
      start.wait();
      for (uint64_t sent = 0; sent < l.bytes;) {
        const uint8_t* at = l.from + (l.from_advances ? sent : 0);
        const ssize_t w = ::send(pairs[i].sender.get(), at, std::min(kBaselineChunk, l.bytes - sent), MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
          errors[2 * i + 1] = Status::FromErrno(errno, "write (loopback)");
          ::shutdown(pairs[i].sender.get(), SHUT_RDWR);
          return;
        }
        sent += static_cast<uint64_t>(w);
      }
    });
  }
  rusage r0{}, r1{};
  getrusage(RUSAGE_SELF, &r0);
  const Clock::time_point t0 = Clock::now();
  start.count_down();
  for (std::thread& t : threads) t.join();
  getrusage(RUSAGE_SELF, &r1);
  for (const Status& s : errors) {
    if (!s.ok()) return s;
  }
  TcpRun run;
  run.seconds = std::chrono::duration<double>(*std::max_element(done.begin(), done.end()) - t0).count();
  run.cpu_ms = CpuMs(r1) - CpuMs(r0);
  return run;
}

// Slice i of n of `bytes`, on page boundaries: [begin, end).
uint64_t SliceStart(uint64_t bytes, uint32_t i, uint32_t n) { return bytes / 4096 * i / n * 4096; }

Result<Mapping> MapMemfd(uint64_t bytes, const char* name) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC));
  if (!fd.valid()) return Status::FromErrno(errno, std::string("memfd_create ") + name);
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    return Status::FromErrno(errno, std::string("ftruncate ") + name);
  }
  return Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0, name);
}

}  // namespace

void FillLikeRandomGuest(uint8_t* base, uint64_t bytes, uint64_t seed) {
  // Guest-physical frame of each memfd offset, as the test guest lays it out.
  std::vector<vmm::MemoryRegion> regions;
  if (auto layout = vmm::PcLayout(bytes); layout.ok()) {
    regions = *layout;
  } else {
    regions = {{0, bytes / 4096 * 4096, 0}};
  }
  const uint32_t threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> workers;
  for (uint32_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (const vmm::MemoryRegion& r : regions) {
        const uint64_t pages = r.size / 4096;
        for (uint64_t p = pages * t / threads; p < pages * (t + 1) / threads; ++p) {
          vmm::FillPage(seed, (r.gpa >> 12) + p, base + r.offset + p * 4096);
        }
      }
    });
  }
  for (std::thread& w : workers) w.join();
}

Result<TcpRun> TcpIntoReusedBuffer(uint64_t bytes, uint32_t connections) {
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  std::vector<Lane> lanes(connections);
  for (uint32_t i = 0; i < connections; ++i) {
    buffers.emplace_back(new uint8_t[kBaselineChunk]);
    uint8_t* send_buf = buffers.back().get();
    for (uint64_t k = 0; k < kBaselineChunk; ++k) send_buf[k] = static_cast<uint8_t>(k * 2654435761u >> 13);
    buffers.emplace_back(new uint8_t[kBaselineChunk]);
    lanes[i] = {bytes * (i + 1) / connections - bytes * i / connections, send_buf, false, buffers.back().get(), false};
  }
  return RunLanes(lanes);
}

Result<TcpRun> TcpIntoFreshMemory(uint64_t bytes, uint32_t connections, uint64_t seed) {
  if (bytes % 4096 != 0) return InvalidArgument("fresh-memory baseline: size is not a multiple of 4 KiB");
  PMLMIG_ASSIGN_OR_RETURN(Mapping source, MapMemfd(bytes, "pmlmig-baseline-source"));
  FillLikeRandomGuest(source.data(), bytes, seed);  // resident before the timer starts
  PMLMIG_ASSIGN_OR_RETURN(Mapping target, MapMemfd(bytes, "pmlmig-baseline-target"));  // never touched
  std::vector<Lane> lanes(connections);
  for (uint32_t i = 0; i < connections; ++i) {
    const uint64_t begin = SliceStart(bytes, i, connections), end = SliceStart(bytes, i + 1, connections);
    lanes[i] = {end - begin, source.data() + begin, true, target.data() + begin, true};
  }
  return RunLanes(lanes);
}

}  // namespace pmlmig::tools
