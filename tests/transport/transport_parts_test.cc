// The transport's concurrent parts that know nothing of gRPC: the token
// bucket, the buffer pool, the stall watch, the failure latch and the
// connection probe of the sender; populate-ahead and the userfaultfd fill
// of the receiver. This binary links neither gRPC nor protobuf, so
// scripts/tsan.sh runs it under ThreadSanitizer: the threads below are
// there to give TSan the accesses the sink's sender threads make.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "buffer_pool.h"
#include "connection_probe.h"
#include "direct_wire.h"
#include "failure_latch.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/base/unique_fd.h"
#include "populate_ahead.h"
#include "port_acceptor.h"
#include "push_window.h"
#include "stall_watch.h"
#include "token_bucket.h"
#include "uffd_fill.h"

namespace pmlmig::transport {
namespace {

using namespace std::chrono_literals;
using Steady = std::chrono::steady_clock;

TEST(TokenBucketTest, BurstIsFreeThenDebtIsRepaidAtTheRate) {
  const Steady::time_point t0{std::chrono::hours(1)};
  TokenBucket b(1 << 20, t0);  // 1 MiB/s: burst is the 256 KiB floor
  EXPECT_EQ(b.burst(), 256.0 * 1024);
  EXPECT_EQ(b.Take(256 << 10, t0).count(), 0);
  // 512 KiB more at once: half a second of debt.
  EXPECT_NEAR(b.Take(512 << 10, t0).count(), 0.5, 1e-9);
  // A second later the debt is repaid and 512 KiB more earned, but the
  // bucket holds at most a burst: taking 256 KiB leaves nothing owed.
  EXPECT_EQ(b.Take(256 << 10, t0 + 2s).count(), 0);
}

TEST(TokenBucketTest, ConcurrentTakersShareTheRate) {
  TokenBucket b(64 << 20);  // 64 MiB/s, burst 3.2 MiB
  const std::atomic<bool> stop{false};
  const auto start = Steady::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 16; ++i) EXPECT_TRUE(b.Acquire(256 << 10, stop));
    });
  }
  for (auto& t : threads) t.join();
  // 16 MiB at 64 MiB/s, less the burst: at least about 0.2 s.
  EXPECT_GE(Steady::now() - start, 150ms);
}

TEST(TokenBucketTest, WakeReleasesAWaiterWhenStopped) {
  TokenBucket b(1 << 20);
  std::atomic<bool> stop{false};
  ASSERT_TRUE(b.Acquire(256 << 10, stop));  // the burst
  std::atomic<bool> result{true};
  std::thread waiter([&] { result = b.Acquire(10 << 20, stop); });  // 10 s of debt
  std::this_thread::sleep_for(20ms);
  stop = true;
  b.Wake();
  waiter.join();
  EXPECT_FALSE(result);
}

TEST(PushWindowTest, GrowsWhileThereIsNoQueueAndShrinksWhenThereIs) {
  PushWindow::Options o;
  o.min_bytes = 256 << 10;
  o.target = 2ms;
  PushWindow w(o);
  const Steady::time_point t0{std::chrono::hours(1)};
  Steady::time_point t = t0;
  uint64_t acked = 0;
  EXPECT_EQ(w.window(), 256u << 10);
  // Round trips at the base: one batch more per batch acknowledged.
  for (int i = 0; i < 16; ++i) {
    w.Sent(128 << 10, t);
    t += 100us;
    w.Acked(++acked, t);
  }
  EXPECT_EQ(w.window(), (256u << 10) + 16 * (128u << 10));
  EXPECT_EQ(w.base_rtt(), 100us);
  EXPECT_EQ(w.in_flight(), 0u);
  // 5 ms of queueing (more than the 2 ms target), seen once it lasts four
  // round trips (the filter): smaller with every batch, down to the minimum
  // and never below.
  for (int i = 0; i < 3; ++i) {
    w.Sent(128 << 10, t);
    t += 5100us;
    w.Acked(++acked, t);
    EXPECT_EQ(w.last_queueing(), 0us) << "a single slow round trip is noise";
  }
  uint64_t before = w.window();
  for (int i = 0; i < 400; ++i) {
    w.Sent(128 << 10, t);
    t += 5100us;
    w.Acked(++acked, t);
    EXPECT_EQ(w.last_queueing(), 5000us);
    if (before > (256u << 10)) {
      EXPECT_LT(w.window(), before) << "batch " << i;
    }
    before = w.window();
  }
  EXPECT_EQ(w.window(), 256u << 10);
  // Under the target again: it grows, by at most a batch per round trip.
  for (int i = 0; i < 4; ++i) {
    w.Sent(128 << 10, t);
    t += 1100us;
    w.Acked(++acked, t);
  }
  EXPECT_GT(w.window(), 256u << 10);
  EXPECT_LE(w.window(), (256u << 10) + 4 * (128u << 10));
}

// The control loop against a model of a bottleneck: a FIFO queue drained at
// 125 MB/s (1 Gbit/s) and 200 us of round trip besides. The push must keep
// the link nearly busy while the queue, what an answer waits behind, stays
// near the target.
TEST(PushWindowTest, KeepsABottleneckBusyWithLittleQueue) {
  PushWindow w;
  const double rate = 125e6;  // bytes/s
  const auto base = 200us;
  const uint64_t batch = 128 << 10;
  const Steady::time_point t0{std::chrono::hours(1)};
  Steady::time_point now = t0, link_free = t0;
  std::deque<Steady::time_point> acks;  // when each batch in flight is acknowledged
  uint64_t sent = 0, acked = 0, acked_bytes_late = 0;
  Steady::duration worst_queue{};
  const Steady::time_point warm = t0 + 500ms, end = t0 + 3s;
  while (now < end) {
    if (w.in_flight() == 0 || w.in_flight() + batch <= w.window()) {
      // Send: the batch waits in the queue behind what is there.
      w.Sent(batch, now);
      const Steady::time_point start = std::max(now, link_free);
      if (now > warm) worst_queue = std::max(worst_queue, start - now);
      link_free = start + std::chrono::duration_cast<Steady::duration>(std::chrono::duration<double>(batch / rate));
      acks.push_back(link_free + base);
      ++sent;
      continue;
    }
    now = acks.front();  // nothing fits: wait for the next acknowledgement
    acks.pop_front();
    w.Acked(++acked, now);
    if (now > warm) acked_bytes_late += batch;
  }
  const double seconds = std::chrono::duration<double>(end - warm).count();
  EXPECT_GT(static_cast<double>(acked_bytes_late) / seconds, 0.9 * rate) << "the link is not kept busy";
  // Queueing at most the target plus the batches sent in one round trip's
  // worth of growth (each ack below the target adds a batch).
  EXPECT_LT(worst_queue, 5ms) << "window " << w.window();
  std::printf("   1 Gbit/s model: %.0f%% of the link, worst queue %.2f ms, window %llu KiB\n",
              100.0 * static_cast<double>(acked_bytes_late) / seconds / rate,
              std::chrono::duration<double, std::milli>(worst_queue).count(),
              static_cast<unsigned long long>(w.window() >> 10));
}

TEST(PushWindowTest, StopAndCloseReleaseAWaiter) {
  PushWindow w;
  std::atomic<bool> stop{false};
  w.Sent(256 << 10, Steady::now());  // the window is full
  std::atomic<int> result{-1};
  std::thread waiter([&] { result = w.WaitToSend(128 << 10, stop) ? 1 : 0; });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(result.load(), -1);
  stop = true;
  w.Wake();
  waiter.join();
  EXPECT_EQ(result.load(), 0);
  stop = false;
  std::thread waiter2([&] { result = w.WaitToSend(128 << 10, stop) ? 1 : 0; });
  w.Close();
  waiter2.join();
  EXPECT_EQ(result.load(), 0);
}

TEST(BufferPoolTest, BuffersComeBackAndAreReused) {
  auto pool = BufferPool::Create(4096);
  uint8_t* a = pool->Get();
  pool->Put(a);
  EXPECT_EQ(pool->free_count(), 1u);
  EXPECT_EQ(pool->Get(), a);
  BufferPool::Loan loan = pool->Lend(a);
  EXPECT_EQ(pool->free_count(), 0u);
  loan.release(loan.arg);
  EXPECT_EQ(pool->free_count(), 1u);
}

TEST(BufferPoolTest, LoansReleasedOnOtherThreadsKeepThePoolAlive) {
  std::vector<BufferPool::Loan> loans;
  std::weak_ptr<BufferPool> weak;
  {
    auto pool = BufferPool::Create(1 << 16);
    weak = pool;
    // Producers take and lend while consumers give back, as a data stream
    // and gRPC's threads do.
    std::vector<std::thread> threads;
    std::mutex mu;
    for (int t = 0; t < 2; ++t) {
      threads.emplace_back([&] {
        for (int i = 0; i < 200; ++i) {
          uint8_t* buf = pool->Get();
          buf[0] = static_cast<uint8_t>(i);  // the buffer is ours now
          BufferPool::Loan loan = pool->Lend(buf);
          std::lock_guard lock(mu);
          loans.push_back(loan);
        }
      });
      threads.emplace_back([&] {
        for (int i = 0; i < 150; ++i) {
          BufferPool::Loan loan{nullptr, nullptr};
          {
            std::lock_guard lock(mu);
            if (loans.empty()) continue;
            loan = loans.back();
            loans.pop_back();
          }
          loan.release(loan.arg);
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  // The owner is gone; outstanding loans still hold the pool.
  EXPECT_EQ(weak.expired(), loans.empty());
  std::thread releaser([&] {
    for (const BufferPool::Loan& l : loans) l.release(l.arg);
  });
  releaser.join();
  EXPECT_TRUE(weak.expired());
}

TEST(StallWatchTest, CheckSkipsStreamsThatAreDoneOrThrottled) {
  StreamProgress a, b, c;
  a.last_progress_ns = 0;
  b.last_progress_ns = 0;
  c.last_progress_ns = 0;
  b.running = true;
  b.throttled = true;
  c.running = true;
  StallWatch w({&a, &b, &c}, 100ms);
  EXPECT_FALSE(w.Check(std::chrono::nanoseconds(100ms).count()).has_value());
  std::optional<StallWatch::Stall> s = w.Check(std::chrono::nanoseconds(150ms).count());
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->stream, 2u);
  EXPECT_EQ(s->idle, 150ms);
}

TEST(StallWatchTest, WatchReturnsWhenEveryStreamIsDone) {
  std::vector<StreamProgress> progress(3);
  std::vector<const StreamProgress*> ptrs;
  for (auto& p : progress) {
    p.Begin();
    ptrs.push_back(&p);
  }
  StallWatch w(ptrs, 1s);
  std::vector<std::thread> threads;
  for (auto& p : progress) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        p.Touch();
        p.throttled.store(i % 2 == 0, std::memory_order_relaxed);
        std::this_thread::sleep_for(100us);
      }
      p.running.store(false, std::memory_order_relaxed);
      w.StreamDone();
    });
  }
  const std::atomic<bool> stop{false};
  int stalls = 0;
  w.Watch(stop, [&](const StallWatch::Stall&) { ++stalls; });
  for (auto& t : threads) t.join();
  EXPECT_EQ(stalls, 0);
}

TEST(StallWatchTest, AStreamWithoutProgressIsReportedOnce) {
  StreamProgress moving, stuck;
  moving.Begin();
  stuck.Begin();
  StallWatch w({&moving, &stuck}, 40ms);
  std::atomic<bool> stop{false};
  std::thread mover([&] {
    while (!stop.load()) {
      moving.Touch();
      std::this_thread::sleep_for(1ms);
    }
    moving.running = false;
    w.StreamDone();
  });
  std::thread sticker([&] {
    while (!stop.load()) std::this_thread::sleep_for(1ms);  // cancelled: ends
    stuck.running = false;
    w.StreamDone();
  });
  std::vector<size_t> stalled;
  w.Watch(stop, [&](const StallWatch::Stall& s) {
    stalled.push_back(s.stream);
    EXPECT_GT(s.idle, 40ms);
    stop = true;  // what failing the migration does
  });
  mover.join();
  sticker.join();
  EXPECT_EQ(stalled, std::vector<size_t>{1});
}

TEST(FailureLatchTest, FirstInformativeErrorWins) {
  FailureLatch l;
  EXPECT_TRUE(l.status().ok());
  EXPECT_TRUE(l.Record(Aborted("cancelled by the peer"), true));
  EXPECT_TRUE(l.stop().load());
  EXPECT_FALSE(l.Record(DataLoss("batch 3: bad checksum"), false));  // precise beats weak
  EXPECT_FALSE(l.Record(Unavailable("later"), false));               // but not a precise one
  EXPECT_FALSE(l.Record(Aborted("weak again"), true));
  EXPECT_EQ(l.status().message(), "batch 3: bad checksum");
}

TEST(FailureLatchTest, ConcurrentFailuresRecordExactlyOneFirst) {
  FailureLatch l;
  std::atomic<int> firsts{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      while (!l.stop().load(std::memory_order_relaxed) && t == 0) {
      }
      if (l.Record(Unavailable("thread " + std::to_string(t)), t % 2 == 1)) ++firsts;
      EXPECT_FALSE(l.status().ok());
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(firsts, 1);
  EXPECT_TRUE(l.failed());
}

TEST(ConnectionProbeTest, RefusedOnlyWhenNothingListens) {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(s.valid());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::getsockname(s.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string target = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  EXPECT_TRUE(ConnectionRefused(target));  // bound, not listening: refused
  ASSERT_EQ(::listen(s.get(), 1), 0);
  EXPECT_FALSE(ConnectionRefused(target));
  EXPECT_FALSE(ConnectionRefused("not a target"));
}

// Pages of [host, host + len) resident, by mincore.
std::vector<bool> Resident(const uint8_t* host, uint64_t len) {
  std::vector<unsigned char> v(len / engine::kPageSize);
  EXPECT_EQ(::mincore(const_cast<uint8_t*>(host), len, v.data()), 0);
  std::vector<bool> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = (v[i] & 1) != 0;
  return out;
}

TEST(PopulateAheadTest, PopulatesOnlyAheadOfDataWithinTheSlotAndStops) {
  constexpr uint64_t kMiB = 1 << 20;
  const uint64_t size = 16 * kMiB;
  const int fd = ::memfd_create("populate-test", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  const UniqueFd owner(fd);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(2 * size)), 0);
  auto* base = static_cast<uint8_t*>(::mmap(nullptr, 2 * size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(base, MAP_FAILED);
  engine::SlotTable slots;
  ASSERT_TRUE(slots.Set({0, 0, base, size, 0}).ok());
  ASSERT_TRUE(slots.Set({1, 1ull << 32, base + size, size, 0}).ok());
  {
    PopulateAhead p(slots, 3, 4 * kMiB);
    p.Ahead(2 * kMiB, kMiB);          // 4x 1 MiB: chunks 1 and 2 of slot 0, [2, 6) MiB
    p.Ahead(3 * kMiB, kMiB);          // [3, 7) MiB: only chunk 3 is new
    p.Ahead(14 * kMiB + 4096, kMiB);  // cut at the slot's end: chunk 7
    p.Ahead(size, 8 * kMiB);          // slot 0's end: slot 1's first 4 MiB (the lookahead)
    p.Ahead(5ull << 32, kMiB);        // no slot: nothing
    p.Ahead(12 * kMiB, 4096);         // a page of data: one chunk at least (chunk 6)
    const uint64_t want = (3 + 1 + 1 + 2) * 2 * kMiB;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (p.populated_bytes() < want && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_EQ(p.populated_bytes(), want);
    p.Stop();
    p.Ahead(8 * kMiB, kMiB);  // after Stop: nothing
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_EQ(p.populated_bytes(), want);
  }
  // Exactly the queued chunks are resident, and nothing else.
  const std::vector<bool> r0 = Resident(base, size);
  const std::vector<bool> r1 = Resident(base + size, size);
  for (size_t page = 0; page < r0.size(); ++page) {
    const uint64_t chunk = page * engine::kPageSize / (2 * kMiB);
    EXPECT_EQ(r0[page], (chunk >= 1 && chunk <= 3) || chunk >= 6) << "slot 0 page " << page;
    EXPECT_EQ(r1[page], chunk <= 1) << "slot 1 page " << page;
  }
  ::munmap(base, 2 * size);
}

// Two streams placing their runs at once, a thread reading missing pages
// of another part of the slot meanwhile (the handler's zero pages), and
// Stop from two threads while they run: every page ends up with its data,
// the untouched part reads as zero, and nothing waits forever.
TEST(UffdFillTest, ConcurrentPlacesFaultsAndStops) {
  constexpr uint64_t kMiB = 1 << 20;
  const uint64_t data = 32 * kMiB, size = 48 * kMiB;  // the reader's part: [data, size)
  const UniqueFd fd(::memfd_create("uffd-fill-test", MFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  auto* base = static_cast<uint8_t*>(::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0));
  ASSERT_NE(base, MAP_FAILED);
  engine::SlotTable slots;
  ASSERT_TRUE(slots.Set({3, 0, base, size, 0}).ok());
  const UffdFill::SlotFile files[] = {{3, engine::MemoryFile{fd.get(), 0}}};
  Result<std::shared_ptr<UffdFill>> started = UffdFill::Start(slots, files);
  if (!started.ok() && started.status().code() == Code::kUnavailable) {
    ::munmap(base, size);
    GTEST_SKIP() << "no userfaultfd here: " << started.status().message();
  }
  ASSERT_TRUE(started.ok()) << started.status().message();
  std::shared_ptr<UffdFill> fill = *started;
  std::vector<uint8_t> src(data);
  for (uint64_t i = 0; i < data; i += 8) std::memcpy(&src[i], &i, 8);
  // Each writer takes every other 256 KiB run and copies what Place
  // leaves, as the applier does.
  auto writer = [&](uint64_t first) {
    constexpr uint64_t kRun = 256 << 10;
    for (uint64_t off = first * kRun; off < data; off += 2 * kRun) {
      const uint64_t placed = fill->Covers(base + off, kRun) ? fill->Place(base + off, src.data() + off, kRun) : 0;
      std::memcpy(base + off + placed, src.data() + off + placed, kRun - placed);
    }
  };
  std::atomic<uint64_t> nonzero{0};
  std::thread a(writer, 0), b(writer, 1);
  std::thread reader([&] {
    for (uint64_t off = data; off < size; off += engine::kPageSize) {
      if (*static_cast<volatile uint8_t*>(base + off + 8) != 0) nonzero.fetch_add(1);
    }
  });
  std::thread stop([&] {
    std::this_thread::sleep_for(2ms);
    fill->Stop();
  });
  std::this_thread::sleep_for(3ms);
  fill->Stop();
  a.join();
  b.join();
  reader.join();
  stop.join();
  EXPECT_EQ(nonzero.load(), 0u);
  EXPECT_FALSE(fill->Covers(base, engine::kPageSize));
  EXPECT_EQ(std::memcmp(base, src.data(), data), 0);
  EXPECT_LE(fill->zero_faults(), (size - data) / engine::kPageSize);
  fill.reset();  // closes the userfaultfd
  ::munmap(base, size);
}

// ReadScattered fills its pieces in order from whatever the peer's writes
// deliver, tells of every byte once as it lands, and gives up when the peer
// closes early or when stopped.
TEST(DirectWireTest, ReadScatteredFillsThePiecesInOrder) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd reader(sv[0]), writer(sv[1]);
  // Pieces of odd sizes, more than one recvmsg's worth and more pieces than one takes.
  std::vector<std::vector<uint8_t>> bufs;
  for (size_t i = 0; i < 100; ++i) bufs.emplace_back(i % 37 == 0 ? 0 : 1 + (i * 7919) % 9000);  // some empty
  bufs.emplace_back(3 * direct::kLandingBytes + 5);
  std::vector<std::span<uint8_t>> dest;
  size_t total = 0;
  for (auto& b : bufs) {
    dest.emplace_back(b.data(), b.size());
    total += b.size();
  }
  std::vector<uint8_t> sent(total);
  for (size_t i = 0; i < total; ++i) sent[i] = static_cast<uint8_t>(i * 131 + (i >> 9));
  const std::atomic<bool> never{false};
  std::thread w([&] {
    for (size_t off = 0; off < total;) {  // writes of 1000 bytes and less than a piece
      const size_t k = std::min<size_t>(total - off, 1000 + off % 3000);
      ASSERT_TRUE(direct::WriteFull(writer.get(), sent.data() + off, k, never).ok());
      off += k;
    }
  });
  std::vector<uint8_t> told;
  Status s = direct::ReadScattered(reader.get(), dest, never,
                                   [&](const uint8_t* p, size_t n) { told.insert(told.end(), p, p + n); });
  w.join();
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(told, sent) << "a byte was told twice, out of order, or not at all";
  std::vector<uint8_t> landed;
  for (const auto& b : bufs) landed.insert(landed.end(), b.begin(), b.end());
  EXPECT_EQ(landed, sent);

  // Nothing to read is no read: the peer's silence does not matter.
  uint8_t none[1];
  EXPECT_TRUE(direct::ReadFull(reader.get(), none, 0, never).ok());
  const std::span<uint8_t> empty[2];
  EXPECT_TRUE(direct::ReadScattered(reader.get(), empty, never, [](const uint8_t*, size_t) {}).ok());

  // The peer closes after some of it (less than the socket holds).
  ASSERT_TRUE(direct::WriteFull(writer.get(), sent.data(), 20000, never).ok());
  writer = UniqueFd();
  s = direct::ReadScattered(reader.get(), dest, never, [](const uint8_t*, size_t) {});
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.message();
  EXPECT_NE(s.message().find("closed"), std::string::npos) << s.message();

  // Stopped while the peer sends nothing.
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
  reader = UniqueFd(sv[0]);
  writer = UniqueFd(sv[1]);
  std::atomic<bool> stop{false};
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    stop.store(true);
  });
  s = direct::ReadScattered(reader.get(), dest, stop, [](const uint8_t*, size_t) {});
  stopper.join();
  EXPECT_EQ(s.code(), Code::kAborted) << s.message();
}

TEST(DirectWireTest, ListenAndConnectNameTheAddressWhenTheyFail) {
  uint16_t port = 0;
  Result<std::vector<UniqueFd>> fds = direct::Listen("127.0.0.1", 0, &port);
  ASSERT_TRUE(fds.ok()) << fds.status().message();
  EXPECT_EQ(fds->size(), 1u);
  EXPECT_NE(port, 0);
  const std::atomic<bool> never{false};
  Result<UniqueFd> c = direct::Connect("127.0.0.1", port, never, std::chrono::steady_clock::now() + std::chrono::seconds(5));
  EXPECT_TRUE(c.ok()) << c.status().message();
  // The port is taken (SO_REUSEADDR does not share a listening port).
  uint16_t again = 0;
  Result<std::vector<UniqueFd>> busy = direct::Listen("127.0.0.1", port, &again);
  ASSERT_FALSE(busy.ok());
  EXPECT_NE(busy.status().message().find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << busy.status().message();
  fds->clear();  // nothing listens there now
  Result<UniqueFd> refused =
      direct::Connect("127.0.0.1", port, never, std::chrono::steady_clock::now() + std::chrono::seconds(5));
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("data connection to 127.0.0.1:" + std::to_string(port)), std::string::npos)
      << refused.status().message();
}

// A client of the acceptor's port that sends `bytes` in the pieces given.
UniqueFd ConnectAndSend(uint16_t port, const std::vector<std::string>& pieces) {
  UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(c.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return UniqueFd();
  for (const std::string& p : pieces) {
    if (::send(c.get(), p.data(), p.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(p.size())) return UniqueFd();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return c;
}

TEST(PortAcceptorTest, SortsConnectionsByTheirFirstBytes) {
  Result<std::unique_ptr<PortAcceptor>> acceptor = PortAcceptor::Listen("127.0.0.1", 0);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status().message();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<UniqueFd> grpc;                                   // guarded by mu
  std::vector<std::pair<UniqueFd, direct::Hello>> directs;      // guarded by mu
  ASSERT_TRUE((*acceptor)
                  ->Run({[&](UniqueFd fd) {
                           std::lock_guard lock(mu);
                           grpc.push_back(std::move(fd));
                           cv.notify_all();
                         },
                         [&](UniqueFd fd, const direct::Hello& h) {
                           std::lock_guard lock(mu);
                           directs.emplace_back(std::move(fd), h);
                           cv.notify_all();
                         }})
                  .ok());
  const uint16_t port = (*acceptor)->port();
  direct::Hello h;
  h.stream = 3;
  h.session_id = 0x1234;
  h.key.fill(7);
  const auto hb = direct::EncodeHello(h);
  const std::string hello(hb.begin(), hb.end());
  // HTTP/2's preface; a hello at once; a hello in three pieces (the magic
  // cut in two); a prefix of the magic and then something else.
  std::vector<UniqueFd> clients;
  clients.push_back(ConnectAndSend(port, {"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"}));
  clients.push_back(ConnectAndSend(port, {hello}));
  clients.push_back(ConnectAndSend(port, {hello.substr(0, 3), hello.substr(3, 10), hello.substr(13)}));
  clients.push_back(ConnectAndSend(port, {"PMLM", "XYZW"}));
  for (const UniqueFd& c : clients) ASSERT_TRUE(c.valid());

  std::unique_lock lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(10), [&] { return grpc.size() == 2 && directs.size() == 2; }))
      << grpc.size() << " handed to gRPC, " << directs.size() << " direct";
  for (const auto& [fd, got] : directs) {
    EXPECT_EQ(got.stream, 3u);
    EXPECT_EQ(got.session_id, 0x1234u);
    EXPECT_EQ(got.key, h.key);
  }
  // gRPC is handed the bytes as they came, and (like the direct streams) a
  // socket without Nagle's delay: gRPC sets it only on sockets it accepts.
  for (const UniqueFd& fd : grpc) {
    int nodelay = 0;
    socklen_t len = sizeof nodelay;
    ASSERT_EQ(::getsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &nodelay, &len), 0);
    EXPECT_NE(nodelay, 0);
    char first[4] = {};
    EXPECT_EQ(::recv(fd.get(), first, sizeof first, MSG_PEEK), 4);
    EXPECT_TRUE(std::string(first, 4) == "PRI " || std::string(first, 4) == "PMLM") << std::string(first, 4);
  }
  lock.unlock();
  (*acceptor)->Stop();
}

// 100 connections that stay open and say nothing (more than the 64 the
// acceptor holds undecided) do not lock out one that then sends a hello.
TEST(PortAcceptorTest, SilentConnectionsDoNotLockOutASender) {
  Result<std::unique_ptr<PortAcceptor>> acceptor = PortAcceptor::Listen("127.0.0.1", 0);
  ASSERT_TRUE(acceptor.ok()) << acceptor.status().message();
  std::mutex mu;
  std::condition_variable cv;
  int directs = 0;  // guarded by mu
  ASSERT_TRUE((*acceptor)
                  ->Run({[&](UniqueFd) {},
                         [&](UniqueFd, const direct::Hello&) {
                           std::lock_guard lock(mu);
                           ++directs;
                           cv.notify_all();
                         }})
                  .ok());
  const uint16_t port = (*acceptor)->port();
  std::vector<UniqueFd> silent;
  for (int i = 0; i < 100; ++i) silent.push_back(ConnectAndSend(port, {}));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // all accepted
  const auto hb = direct::EncodeHello(direct::Hello{});
  UniqueFd sender = ConnectAndSend(port, {std::string(hb.begin(), hb.end())});
  ASSERT_TRUE(sender.valid());
  std::unique_lock lock(mu);
  // Well within the 10 s after which silent ones would go to gRPC anyway.
  EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(3), [&] { return directs == 1; }));
  lock.unlock();
  (*acceptor)->Stop();
}

}  // namespace
}  // namespace pmlmig::transport
