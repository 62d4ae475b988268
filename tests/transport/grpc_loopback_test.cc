// The migration transport end to end over loopback gRPC: a MigrationServer
// on 127.0.0.1 with a fake MigrationTarget whose guest memory is a plain
// buffer (slots at gpa 0 and gpa 4 GiB), and a GrpcMigrationSink sending
// rounds of pages from a plain source buffer. Also: abort, a receiver shut
// down mid-round, one migration at a time, protocol violations from a raw
// client, and a throughput report (printed, not asserted).
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "../../transport/batch_codec.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "test_memory.h"
#include "../support/loopback_proxy.h"

namespace pmlmig::transport {
namespace {

using engine::kPageSize;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kHighGpa = 4ull << 30;

using test::FillRandom;

void FillCompressible(uint8_t* p, uint64_t len, uint64_t seed) {
  static const char kText[] = "guest page contents that compress well, with a counter: ";
  for (uint64_t i = 0; i < len; ++i) p[i] = static_cast<uint8_t>(kText[(i + seed) % (sizeof kText - 1)]);
  std::memcpy(p, &seed, sizeof seed);
}

// Guest memory as a few anonymous mappings.
struct Memory : test::TestMemory {
  std::vector<engine::MemoryRange> Ranges() const {
    std::vector<engine::MemoryRange> out;
    for (const engine::MemorySlot& s : slots.slots()) out.push_back({s.slot, s.gpa, s.size});
    return out;
  }
  std::vector<engine::PageRun> AllPages() const {
    std::vector<engine::PageRun> out;
    for (const engine::MemorySlot& s : slots.slots()) out.push_back({s.gpa, s.pages()});
    return out;
  }
  uint64_t pages() const { return slots.total_bytes() / kPageSize; }
};

// What the fake target saw; shared with the test.
struct Probe {
  std::mutex mu;
  int setups = 0;
  int finals = 0;
  int commits = 0;
  std::vector<std::string> aborts;
  engine::MigrationSetup setup;
  std::vector<uint8_t> vm_state;
  milliseconds setup_delay{0};  // how long OnSetup takes (building a VM)

  int abort_count() {
    std::lock_guard lock(mu);
    return static_cast<int>(aborts.size());
  }
};

// A MigrationTarget whose "VM" is plain memory built from the setup.
class FakeTarget final : public engine::MigrationTarget {
 public:
  std::unique_ptr<engine::VmControl> TakeVm() override { return nullptr; }  // no VM behind this target
  explicit FakeTarget(std::shared_ptr<Probe> probe) : probe_(std::move(probe)) {}

  Status OnSetup(const engine::MigrationSetup& setup) override {
    for (const engine::MemoryRange& r : setup.memory) PMLMIG_RETURN_IF_ERROR(mem_.Add(r.slot, r.gpa, r.size));
    milliseconds delay;
    {
      std::lock_guard lock(probe_->mu);
      ++probe_->setups;
      probe_->setup = setup;
      delay = probe_->setup_delay;
    }
    std::this_thread::sleep_for(delay);
    return Status::Ok();
  }
  const engine::SlotTable& memory() const override { return mem_.slots; }
  Result<engine::FinalReply> OnFinal(const engine::FinalState& state) override {
    engine::FinalReply r;
    r.prepared = true;
    if (state.has_digest) {
      r.verified = engine::MemoryDigest(mem_.slots) == state.memory_digest;
      r.verify_detail = r.verified ? "digest matches" : "digest differs";
    }
    r.source_paused_ms = state.source_paused_ms;
    std::lock_guard lock(probe_->mu);
    ++probe_->finals;
    probe_->vm_state = state.vm_state;
    return r;
  }
  Result<double> OnCommit() override {
    std::lock_guard lock(probe_->mu);
    ++probe_->commits;
    return 0.25;
  }
  void OnAbort(const std::string& why) override {
    // Unmapping makes any later write by the transport crash the test.
    mem_.slots = {};
    mem_.maps.clear();
    std::lock_guard lock(probe_->mu);
    probe_->aborts.push_back(why);
  }

 private:
  std::shared_ptr<Probe> probe_;
  Memory mem_;
};

// The source: slots at gpa 0 and 4 GiB with mixed content.
class Source {
 public:
  Source(uint64_t low_bytes, uint64_t high_bytes, uint64_t seed) : rng_(seed) {
    EXPECT_TRUE(mem.Add(0, 0, low_bytes).ok());
    if (high_bytes > 0) {
      EXPECT_TRUE(mem.Add(1, kHighGpa, high_bytes).ok());
    }
    for (const engine::MemorySlot& s : mem.slots.slots()) {
      for (uint64_t p = 0; p < s.pages(); ++p) WritePage(s.host + p * kPageSize);
    }
  }

  // Changes a random ~5% of the pages (to zero, random or compressible
  // contents) and returns them as sorted, merged runs.
  std::vector<engine::PageRun> Mutate() {
    std::set<uint64_t> gpas;
    const uint64_t n = std::max<uint64_t>(1, mem.pages() / 20);
    for (uint64_t i = 0; i < n; ++i) {
      const auto& slots = mem.slots.slots();
      const engine::MemorySlot& s = slots[rng_() % slots.size()];
      const uint64_t gpa = s.gpa + (rng_() % s.pages()) * kPageSize;
      WritePage(mem.slots.HostAddress(gpa, kPageSize));
      gpas.insert(gpa);
    }
    std::vector<engine::PageRun> runs;
    for (uint64_t gpa : gpas) {
      if (!runs.empty() && runs.back().gpa + runs.back().pages * kPageSize == gpa) {
        ++runs.back().pages;
      } else {
        runs.push_back({gpa, 1});
      }
    }
    return runs;
  }

  Memory mem;

 private:
  void WritePage(uint8_t* p) {
    const uint64_t kind = rng_() % 10;
    if (kind < 2) {
      std::memset(p, 0, kPageSize);
    } else if (kind < 5) {
      FillCompressible(p, kPageSize, rng_());
    } else {
      FillRandom(p, kPageSize, rng_());
    }
  }
  std::mt19937_64 rng_;
};

// A TCP socket bound to a free loopback port, listening or not (then the
// port refuses connections, and nothing else can take it meanwhile); its
// fd, or -1.
int LoopbackSocket(bool listening, uint16_t* port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || (listening && listen(fd, 16) != 0) ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(a.sin_port);
  return fd;
}

bool SameMemory(const engine::SlotTable& a, const engine::SlotTable& b) {
  if (a.slots().size() != b.slots().size()) return false;
  for (size_t i = 0; i < a.slots().size(); ++i) {
    const engine::MemorySlot& x = a.slots()[i];
    const engine::MemorySlot& y = b.slots()[i];
    if (x.gpa != y.gpa || x.size != y.size) return false;
    if (std::memcmp(x.host, y.host, x.size) != 0) return false;
  }
  return true;
}

class LoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer({}); }

  void StartServer(MigrationServerOptions o) {
    server_.reset();
    read_in_place_ = o.read_in_place;
    probe_ = std::make_shared<Probe>();
    auto probe = probe_;
    auto s = MigrationServer::Start("127.0.0.1:0", [probe] { return std::make_unique<FakeTarget>(probe); }, o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    server_ = std::move(s).value();
    ASSERT_GT(server_->port(), 0);
  }

  std::string Target() const { return "127.0.0.1:" + std::to_string(server_->port()); }

  GrpcSinkOptions Options(uint32_t streams = 1, Compression c = Compression::kNone) const {
    GrpcSinkOptions o;
    o.target = Target();
    o.streams = streams;
    o.compress = c;
    o.stall_timeout = milliseconds(5000);
    return o;
  }

  engine::MigrationSetup Setup(const Source& src) const {
    engine::MigrationSetup s;
    s.vm_description = "fake vm";
    s.memory = src.mem.Ranges();
    s.vcpus = 2;
    s.verify = true;
    return s;
  }

  Result<ReceivedMigration> Outcome() { return server_->WaitForMigration(Clock::now() + std::chrono::seconds(20)); }

  // A whole migration: round 0 sends everything, then `rounds` rounds of
  // changed pages; after Finish the target's memory must equal the source.
  void Migrate(Source& src, GrpcSinkOptions o, int rounds) {
    auto sink = GrpcMigrationSink::Create(o);
    ASSERT_TRUE(sink.ok()) << sink.status().message();
    Status s = (*sink)->Begin(Setup(src), src.mem.slots);
    ASSERT_TRUE(s.ok()) << s.message();
    uint64_t pages = 0;
    engine::PageList all(src.mem.AllPages());
    auto st = (*sink)->SendPages(0, all);
    ASSERT_TRUE(st.ok()) << st.status().message();
    EXPECT_EQ(st->pages, src.mem.pages());
    EXPECT_EQ(st->normal_pages + st->zero_pages, st->pages);
    EXPECT_GT(st->zero_pages, 0u);
    pages += st->pages;
    for (int r = 1; r <= rounds; ++r) {
      engine::PageList dirty(src.Mutate());
      const uint64_t expect = dirty.total_pages();
      st = (*sink)->SendPages(static_cast<uint32_t>(r), dirty);
      ASSERT_TRUE(st.ok()) << st.status().message();
      EXPECT_EQ(st->pages, expect);
      pages += st->pages;
    }
    engine::FinalState fs;
    fs.vm_state = {1, 2, 3, 4, 5};
    fs.has_digest = true;
    fs.memory_digest = engine::MemoryDigest(src.mem.slots);
    fs.source_paused_ms = 12.5;
    auto reply = (*sink)->Finish(fs);
    ASSERT_TRUE(reply.ok()) << reply.status().message();
    EXPECT_TRUE(reply->prepared);
    const engine::CommitResult commit = (*sink)->Commit();
    ASSERT_EQ(commit.state, engine::CommitState::kCommitted) << commit.detail.message();
    EXPECT_EQ(commit.target_resume_ms, 0.25);
    EXPECT_FALSE(commit.resolved);
    EXPECT_EQ(reply->source_paused_ms, 12.5);
    EXPECT_TRUE(reply->verified) << reply->verify_detail;
    EXPECT_EQ((*sink)->totals().pages, pages);

    auto out = Outcome();
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->outcome, engine::Outcome::kCompleted) << out->error.message();
    EXPECT_TRUE(out->error.ok()) << out->error.message();
    EXPECT_EQ(out->totals.pages, pages);
    EXPECT_EQ(out->rounds, static_cast<uint32_t>(rounds + 1));
    EXPECT_EQ(out->direct_data, o.direct_data && !o.security.tls()) << "the data path the receiver reports";
    // Direct streams read each uncompressed batch straight into this
    // target's plain memory; Pages calls never do.
    if (!out->direct_data || !read_in_place_) {
      EXPECT_EQ(out->in_place_bytes, 0u);
    } else if (o.compress == Compression::kNone) {
      EXPECT_EQ(out->in_place_bytes, out->totals.payload_bytes) << "a batch was staged and copied";
    }
    EXPECT_LE(out->in_place_bytes, out->totals.payload_bytes);
    ASSERT_NE(out->target, nullptr);
    EXPECT_TRUE(SameMemory(out->target->memory(), src.mem.slots)) << "target memory differs from the source";
    std::lock_guard lock(probe_->mu);
    EXPECT_EQ(probe_->vm_state, fs.vm_state);
    EXPECT_EQ(probe_->setup.vcpus, 2u);
    EXPECT_EQ(probe_->setup.vm_description, "fake vm");
  }

  std::shared_ptr<Probe> probe_;
  std::unique_ptr<MigrationServer> server_;
  bool read_in_place_ = true;  // the server's option
};

struct Variant {
  uint32_t streams;
  Compression compression;
  bool grpc_data = false;  // Pages calls instead of direct data streams
};

class LoopbackVariantTest : public LoopbackTest, public ::testing::WithParamInterface<Variant> {};

TEST_P(LoopbackVariantTest, RoundsArriveByteForByte) {
  Source src(16 << 20, 8 << 20, 42);
  GrpcSinkOptions o = Options(GetParam().streams, GetParam().compression);
  o.direct_data = !GetParam().grpc_data;
  o.batch_pages = 64;  // many batches per round, so every stream gets work
  Migrate(src, o, 3);
}

INSTANTIATE_TEST_SUITE_P(StreamsAndCompression, LoopbackVariantTest,
                         ::testing::Values(Variant{1, Compression::kNone}, Variant{1, Compression::kLz4},
                                           Variant{1, Compression::kZstd}, Variant{4, Compression::kNone},
                                           Variant{4, Compression::kLz4}, Variant{4, Compression::kZstd},
                                           Variant{1, Compression::kNone, true}, Variant{4, Compression::kLz4, true}),
                         [](const ::testing::TestParamInfo<Variant>& i) {
                           return std::to_string(i.param.streams) + "streams_" +
                                  std::string(CompressionName(i.param.compression)) +
                                  (i.param.grpc_data ? "_grpcdata" : "");
                         });

// With read_in_place off, direct streams stage every batch and copy it:
// the same memory arrives.
TEST_F(LoopbackTest, StagedDirectStreamsArriveByteForByte) {
  MigrationServerOptions so;
  so.read_in_place = false;
  StartServer(so);
  Source src(16 << 20, 8 << 20, 43);
  GrpcSinkOptions o = Options(2);
  o.batch_pages = 64;
  Migrate(src, o, 2);
}

TEST_F(LoopbackTest, BandwidthCapAndBackpressureStillDeliverEverything) {
  Source src(4 << 20, 4 << 20, 7);
  GrpcSinkOptions o = Options(2);
  o.max_bandwidth = 16 << 20;          // 8 MiB takes about half a second
  o.max_inflight_bytes = 64 << 10;     // every batch waits for the previous ack
  o.batch_pages = 32;
  const auto t0 = Clock::now();
  Migrate(src, o, 1);
  EXPECT_GT(Clock::now() - t0, milliseconds(300)) << "the bandwidth cap was not applied";
}

TEST_F(LoopbackTest, AbortMidRoundDiscardsTheTargetAndFreesTheReceiver) {
  Source src(16 << 20, 8 << 20, 3);
  GrpcSinkOptions o = Options(2);
  o.max_bandwidth = 4 << 20;  // 24 MiB would take 6 s
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_TRUE(sink.ok());
  ASSERT_TRUE((*sink)->Begin(Setup(src), src.mem.slots).ok());
  engine::PageList all(src.mem.AllPages());
  Result<engine::TransferStats> result = Internal("not run");
  std::thread sender([&] { result = (*sink)->SendPages(0, all); });
  std::this_thread::sleep_for(milliseconds(400));
  const auto t0 = Clock::now();
  (*sink)->Abort("operator cancelled");
  sender.join();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(3));
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), Code::kAborted) << result.status().message();
  EXPECT_NE(result.status().message().find("operator cancelled"), std::string::npos) << result.status().message();
  // Further calls fail.
  EXPECT_FALSE((*sink)->Finish({}).ok());

  auto out = Outcome();
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(out->outcome, engine::Outcome::kCancelled);
  EXPECT_EQ(engine::OutcomeName(out->outcome), "cancelled");
  EXPECT_NE(out->error.message().find("operator cancelled"), std::string::npos) << out->error.message();
  EXPECT_EQ(out->target, nullptr);
  ASSERT_EQ(probe_->abort_count(), 1);
  EXPECT_NE(probe_->aborts[0].find("operator cancelled"), std::string::npos) << probe_->aborts[0];

  // The receiver takes the next migration.
  Source again(4 << 20, 4 << 20, 4);
  Migrate(again, Options(2), 1);
}

TEST_F(LoopbackTest, ReceiverShutDownMidRoundFailsSendPagesPromptly) {
  Source src(16 << 20, 8 << 20, 5);
  GrpcSinkOptions o = Options(4);
  o.max_bandwidth = 4 << 20;
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_TRUE(sink.ok());
  ASSERT_TRUE((*sink)->Begin(Setup(src), src.mem.slots).ok());
  engine::PageList all(src.mem.AllPages());
  Result<engine::TransferStats> result = Internal("not run");
  Clock::time_point returned;
  std::thread sender([&] {
    result = (*sink)->SendPages(0, all);
    returned = Clock::now();
  });
  std::this_thread::sleep_for(milliseconds(400));
  const auto t0 = Clock::now();
  server_->Shutdown();
  sender.join();
  EXPECT_LT(returned - t0, std::chrono::seconds(3));
  ASSERT_FALSE(result.ok());
  std::printf("SendPages after the receiver shut down: %s (%lld ms)\n", result.status().message().c_str(),
              static_cast<long long>(std::chrono::duration_cast<milliseconds>(returned - t0).count()));
  EXPECT_EQ(probe_->abort_count(), 1);
  auto out = Outcome();
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
  // Later waits say the server is gone instead of hanging.
  EXPECT_FALSE(server_->WaitForMigration(Clock::now() + std::chrono::seconds(10)).ok());
}

TEST_F(LoopbackTest, StalledReceiverFailsSendPagesAfterStallTimeout) {
  testing_support::Proxy proxy(server_->port());
  Source src(16 << 20, 8 << 20, 21);
  GrpcSinkOptions o = Options(2);
  o.target = proxy.target();
  o.max_bandwidth = 8 << 20;
  o.max_inflight_bytes = 2 << 20;
  o.stall_timeout = milliseconds(1000);
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_TRUE(sink.ok());
  ASSERT_TRUE((*sink)->Begin(Setup(src), src.mem.slots).ok());
  engine::PageList all(src.mem.AllPages());
  Result<engine::TransferStats> result = Internal("not run");
  Clock::time_point returned;
  std::thread sender([&] {
    result = (*sink)->SendPages(0, all);
    returned = Clock::now();
  });
  std::this_thread::sleep_for(milliseconds(300));
  const auto t0 = Clock::now();
  proxy.Stall();
  sender.join();
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), Code::kUnavailable) << result.status().message();
  EXPECT_NE(result.status().message().find("no progress"), std::string::npos) << result.status().message();
  EXPECT_LT(returned - t0, std::chrono::seconds(5));
  std::printf("SendPages through a stalled link: %s (%lld ms)\n", result.status().message().c_str(),
              static_cast<long long>(std::chrono::duration_cast<milliseconds>(returned - t0).count()));
  // Once the link is cut, the receiver discards the VM and is free again.
  proxy.CutAll();
  auto out = Outcome();
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
  EXPECT_EQ(probe_->abort_count(), 1);
  Source again(2 << 20, 2 << 20, 22);
  Migrate(again, Options(1), 1);
}

TEST_F(LoopbackTest, SilentPeerFailsBeginWithinConnectTimeout) {
  // A "receiver" that accepts connections and never answers: Begin must
  // give up after setup_timeout instead of hanging.
  uint16_t port = 0;
  const int fd = LoopbackSocket(true, &port);
  ASSERT_GE(fd, 0);
  GrpcSinkOptions o = Options();
  o.target = "127.0.0.1:" + std::to_string(port);
  o.connect_timeout = milliseconds(500);
  o.setup_timeout = milliseconds(500);
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_TRUE(sink.ok());
  Source src(1 << 20, 0, 1);
  const auto t0 = Clock::now();
  Status s = (*sink)->Begin(Setup(src), src.mem.slots);
  EXPECT_FALSE(s.ok());
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  std::printf("Begin against a silent peer: %s\n", s.message().c_str());
  close(fd);
}

TEST_F(LoopbackTest, RefusedPortFailsBeginAtOnce) {
  // A port that refuses connections (bound, not listening, so no one else
  // takes it meanwhile): Begin says so at once instead of retrying for the
  // whole connect_timeout.
  uint16_t port = 0;
  const int fd = LoopbackSocket(false, &port);
  ASSERT_GE(fd, 0);
  GrpcSinkOptions o = Options();
  o.target = "127.0.0.1:" + std::to_string(port);
  ASSERT_EQ(o.connect_timeout, milliseconds(5000));  // the default
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_TRUE(sink.ok());
  Source src(1 << 20, 0, 1);
  const auto t0 = Clock::now();
  const Status s = (*sink)->Begin(Setup(src), src.mem.slots);
  const auto took = Clock::now() - t0;
  close(fd);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.message();
  EXPECT_NE(s.message().find("connection refused to " + o.target), std::string::npos) << s.message();
  EXPECT_LT(took, milliseconds(1500)) << s.message();
  std::printf("Begin against a refused port: %s (%lld ms)\n", s.message().c_str(),
              static_cast<long long>(std::chrono::duration_cast<milliseconds>(took).count()));
}

TEST(AddressTest, ListenAndTargetAddressesAreChecked) {
  // gRPC would listen on or connect to another port than the one typed
  // (99999 modulo 65536, 443 for an empty port) or log a lookup error:
  // both sides refuse such an address, naming it.
  struct Case {
    std::string address, what;
  };
  const std::vector<Case> cases = {
      {"127.0.0.1:99999", "port 99999 is outside 0..65535"},
      {"127.0.0.1:65536", "port 65536 is outside 0..65535"},
      {"127.0.0.1:123456789012345678901234", "port 123456789012345678901234 is outside 0..65535"},
      {"127.0.0.1:http", "port 'http' is not a decimal number"},
      {"127.0.0.1:-1", "port '-1' is not a decimal number"},
      {"127.0.0.1:+80", "port '+80' is not a decimal number"},
      {"127.0.0.1: 80", "port ' 80' is not a decimal number"},
      {"127.0.0.1:", "no port after the ':' (expected HOST:PORT)"},
      {":7400", "no host before the port (expected HOST:PORT)"},
      {"127.0.0.1", "no port (expected HOST:PORT)"},
      {"", "empty (expected HOST:PORT)"},
      {"::1:7400", "an IPv6 address needs brackets (expected [ADDRESS]:PORT)"},
      {"[::1:7400", "no ']' after the IPv6 address (expected [ADDRESS]:PORT)"},
      {"[::1]7400", "no ':PORT' after ']' (expected [ADDRESS]:PORT)"},
      {"[]:7400", "no host before the port (expected HOST:PORT)"},
  };
  auto factory = []() -> std::unique_ptr<engine::MigrationTarget> { return nullptr; };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.address);
    auto server = MigrationServer::Start(c.address, factory, {});
    ASSERT_FALSE(server.ok()) << "listening on port " << (*server)->port();
    EXPECT_EQ(server.status().code(), Code::kInvalidArgument);
    EXPECT_EQ(server.status().message(), "listen address \"" + c.address + "\": " + c.what);
    GrpcSinkOptions o;
    o.target = c.address;
    auto sink = GrpcMigrationSink::Create(o);
    ASSERT_FALSE(sink.ok());
    EXPECT_EQ(sink.status().code(), Code::kInvalidArgument);
    EXPECT_EQ(sink.status().message(), "migration target \"" + c.address + "\": " + c.what);
  }
  // Port 0: a receiver listens on a free port; a sender has nothing to
  // connect to.
  auto server = MigrationServer::Start("127.0.0.1:0", factory, {});
  ASSERT_TRUE(server.ok()) << server.status().message();
  EXPECT_GT((*server)->port(), 0);
  GrpcSinkOptions o;
  o.target = "127.0.0.1:0";
  auto sink = GrpcMigrationSink::Create(o);
  ASSERT_FALSE(sink.ok());
  EXPECT_EQ(sink.status().message(), "migration target \"127.0.0.1:0\": port 0 (expected the receiver's port, 1..65535)");
  for (const char* good : {"127.0.0.1:7400", "localhost:65535", "[::1]:1", "receiver.example:007400"}) {
    o.target = good;
    EXPECT_TRUE(GrpcMigrationSink::Create(o).ok()) << good;
  }
}

TEST_F(LoopbackTest, SecondConcurrentMigrationIsRefused) {
  Source src(4 << 20, 4 << 20, 11);
  auto first = GrpcMigrationSink::Create(Options());
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE((*first)->Begin(Setup(src), src.mem.slots).ok());

  auto second = GrpcMigrationSink::Create(Options());
  ASSERT_TRUE(second.ok());
  Status s = (*second)->Begin(Setup(src), src.mem.slots);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kResourceExhausted) << s.message();
  EXPECT_NE(s.message().find("in progress"), std::string::npos) << s.message();

  engine::PageList all(src.mem.AllPages());
  ASSERT_TRUE((*first)->SendPages(0, all).ok());
  auto reply = (*first)->Finish({});
  ASSERT_TRUE(reply.ok()) << reply.status().message();
  ASSERT_EQ((*first)->Commit().state, engine::CommitState::kCommitted);
  auto out = Outcome();
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->outcome, engine::Outcome::kCompleted);
  EXPECT_TRUE(SameMemory(out->target->memory(), src.mem.slots));
}

TEST_F(LoopbackTest, DataStreamRejectionFailsTheMigrationWithItsReason) {
  // A source whose round names a page it does not have fails on its side;
  // a receiver-side rejection is driven by the raw client tests below.
  Source src(1 << 20, 1 << 20, 12);
  auto sink = GrpcMigrationSink::Create(Options(2));
  ASSERT_TRUE(sink.ok());
  ASSERT_TRUE((*sink)->Begin(Setup(src), src.mem.slots).ok());
  engine::PageList bad({{2ull << 30, 4}});
  auto st = (*sink)->SendPages(0, bad);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("not in source memory"), std::string::npos) << st.status().message();
  auto out = Outcome();
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
  EXPECT_EQ(probe_->abort_count(), 1);
}

TEST_F(LoopbackTest, ReceiverRefusalReachesTheSourceWithItsReason) {
  // The receiver refuses a batch (its pages lie outside the memory the
  // Setup declared): the source's error carries the receiver's reason, and
  // so does the receiver's report.
  Source src(1 << 20, 1 << 20, 13);
  engine::MigrationSetup setup = Setup(src);
  setup.memory.resize(1);  // slot 1 is not declared, but its pages are sent
  auto sink = GrpcMigrationSink::Create(Options(2));
  ASSERT_TRUE(sink.ok());
  ASSERT_TRUE((*sink)->Begin(setup, src.mem.slots).ok());
  engine::PageList all(src.mem.AllPages());
  auto st = (*sink)->SendPages(0, all);
  ASSERT_FALSE(st.ok());
  const std::string what = "run 0: gpa 0x100000000 (+";
  EXPECT_NE(st.status().message().find(what), std::string::npos) << st.status().message();
  EXPECT_NE(st.status().message().find("lies outside guest memory"), std::string::npos) << st.status().message();
  auto out = Outcome();
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
  EXPECT_NE(out->error.message().find(what), std::string::npos) << out->error.message();
  EXPECT_EQ(probe_->abort_count(), 1);
}

TEST_F(LoopbackTest, ReceiverDeadlineReachesTheSourceWithItsReason) {
  // The receiver gives up (the VM takes longer to build than the handshake
  // may) while the source waits on the control stream: the source learns
  // why, not just that the call was cancelled.
  MigrationServerOptions so;
  so.handshake_timeout = milliseconds(300);
  StartServer(so);
  probe_->setup_delay = milliseconds(1500);
  Source src(1 << 20, 0, 14);
  auto sink = GrpcMigrationSink::Create(Options());
  ASSERT_TRUE(sink.ok());
  const Status s = (*sink)->Begin(Setup(src), src.mem.slots);
  ASSERT_FALSE(s.ok());
  const std::string what = "no valid Setup within 300 ms of connecting";
  EXPECT_NE(s.message().find(what), std::string::npos) << s.message();
  auto out = Outcome();
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
  EXPECT_NE(out->error.message().find(what), std::string::npos) << out->error.message();
}

// ---------------------------------------------------------------- raw client

class RawClientTest : public LoopbackTest {
 protected:
  void SetUp() override {
    MigrationServerOptions o;
    o.final_drain_timeout = milliseconds(300);
    StartServer(o);
    channel_ = grpc::CreateChannel(Target(), grpc::InsecureChannelCredentials());
    stub_ = proto::Migration::NewStub(channel_);
  }

  // Opens Control; with `hello`, completes Hello and returns the session id.
  uint64_t Open(bool hello = true) {
    call_ = stub_->Control(&ctx_);
    if (!hello) return 0;
    proto::ControlRequest req;
    req.mutable_hello()->set_version(kProtocolVersion);
    EXPECT_TRUE(call_->Write(req));
    proto::ControlReply rep;
    EXPECT_TRUE(call_->Read(&rep));
    EXPECT_TRUE(rep.has_hello());
    return rep.hello().session_id();
  }

  proto::ControlRequest ValidSetup() {
    proto::ControlRequest req;
    proto::Setup* s = req.mutable_setup();
    for (const engine::MemoryRange& r : src_.mem.Ranges()) {
      proto::MemoryRange* m = s->add_memory();
      m->set_slot(r.slot);
      m->set_gpa(r.gpa);
      m->set_size(r.size);
    }
    s->set_vcpus(1);
    s->set_streams(1);
    return req;
  }

  void SetUpSession() {
    session_ = Open();
    ASSERT_TRUE(call_->Write(ValidSetup()));
    proto::ControlReply rep;
    ASSERT_TRUE(call_->Read(&rep));
    ASSERT_TRUE(rep.has_setup());
  }

  // The control call's final status after the receiver ended it.
  grpc::Status ControlStatus() {
    proto::ControlReply rep;
    while (call_->Read(&rep)) {
    }
    return call_->Finish();
  }

  proto::PageBatch Batch(uint64_t seq, uint64_t gpa = 0, uint64_t pages = 16) {
    BatchBuilder b(Compression::kNone);
    proto::PageBatch batch;
    EXPECT_TRUE(b.Build(src_.mem.slots, gpa, pages, BatchHeader{session_, 0, 0, seq}, &batch).ok());
    return batch;
  }

  // Sends `batches` on a Pages call; returns the call's status.
  grpc::Status SendBatches(const std::vector<proto::PageBatch>& batches, int* acked) {
    grpc::ClientContext ctx;
    auto pages = stub_->Pages(&ctx);
    *acked = 0;
    proto::BatchAck ack;
    for (const proto::PageBatch& b : batches) {
      if (!pages->Write(b)) break;
      if (!pages->Read(&ack)) break;
      ++*acked;
    }
    pages->WritesDone();
    while (pages->Read(&ack)) {
    }
    return pages->Finish();
  }

  void ExpectFailedOutcome(const std::string& what) {
    auto out = Outcome();
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
    EXPECT_NE(out->error.message().find(what), std::string::npos) << out->error.message();
  }

  Source src_{1 << 20, 1 << 20, 77};
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<proto::Migration::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<proto::ControlRequest, proto::ControlReply>> call_;
  uint64_t session_ = 0;
};

TEST_F(RawClientTest, RejectsAnotherVersion) {
  Open(false);
  proto::ControlRequest req;
  req.mutable_hello()->set_version(1);
  ASSERT_TRUE(call_->Write(req));
  grpc::Status st = ControlStatus();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("protocol version 1 is not supported"), std::string::npos) << st.error_message();
}

TEST_F(RawClientTest, RejectsSetupBeforeHello) {
  Open(false);
  ASSERT_TRUE(call_->Write(ValidSetup()));
  grpc::Status st = ControlStatus();
  EXPECT_NE(st.error_message().find("expected Hello first, got Setup"), std::string::npos) << st.error_message();
}

TEST_F(RawClientTest, RejectsFinalBeforeSetup) {
  Open();
  proto::ControlRequest req;
  req.mutable_final();
  ASSERT_TRUE(call_->Write(req));
  grpc::Status st = ControlStatus();
  EXPECT_NE(st.error_message().find("expected Setup, got Final"), std::string::npos) << st.error_message();
  ExpectFailedOutcome("expected Setup");
}

TEST_F(RawClientTest, RejectsAbsurdSetups) {
  struct Case {
    std::function<void(proto::Setup*)> edit;
    std::string what;
  };
  const std::vector<Case> cases = {
      {[](proto::Setup* s) { s->mutable_memory(1)->set_gpa(4096); }, "overlap"},
      {[](proto::Setup* s) { s->mutable_memory(0)->set_size(4097); }, "not page aligned"},
      {[](proto::Setup* s) { s->mutable_memory(0)->set_size(0); }, "empty"},
      {[](proto::Setup* s) { s->mutable_memory(1)->set_size(1ull << 50); }, "of guest memory this receiver accepts"},
      {[](proto::Setup* s) { s->clear_memory(); }, "0 ranges"},
      {[](proto::Setup* s) { s->set_vcpus(0); }, "Setup.vcpus"},
      {[](proto::Setup* s) { s->set_streams(65); }, "Setup.streams"},
      {[](proto::Setup* s) { s->mutable_memory(1)->set_gpa(~0ull << 12); }, "overflows"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::ClientContext ctx;
    auto call = stub_->Control(&ctx);
    proto::ControlRequest req;
    req.mutable_hello()->set_version(kProtocolVersion);
    ASSERT_TRUE(call->Write(req));
    proto::ControlReply rep;
    ASSERT_TRUE(call->Read(&rep));
    proto::ControlRequest setup = ValidSetup();
    c.edit(setup.mutable_setup());
    ASSERT_TRUE(call->Write(setup));
    while (call->Read(&rep)) {
    }
    grpc::Status st = call->Finish();
    EXPECT_NE(st.error_message().find(c.what), std::string::npos) << st.error_message();
    ExpectFailedOutcome(c.what);
  }
  EXPECT_EQ(probe_->setups, 0);
}

TEST_F(RawClientTest, BadChecksumFailsTheMigration) {
  SetUpSession();
  proto::PageBatch good = Batch(0);
  proto::PageBatch bad = Batch(1, 64 * kPageSize);
  (*bad.mutable_payload())[5] ^= 0x40;
  int acked = 0;
  grpc::Status st = SendBatches({good, bad}, &acked);
  EXPECT_EQ(acked, 1);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_NE(st.error_message().find("stream 0: batch 1: checksum mismatch"), std::string::npos)
      << st.error_message();
  EXPECT_FALSE(ControlStatus().ok());
  ExpectFailedOutcome("checksum mismatch");
  EXPECT_EQ(probe_->abort_count(), 1);
}

TEST_F(RawClientTest, BatchOutsideGuestMemoryFailsTheMigration) {
  SetUpSession();
  proto::PageBatch b = Batch(0);
  b.mutable_runs(0)->set_gpa(0x1234000);
  int acked = 0;
  grpc::Status st = SendBatches({b}, &acked);
  EXPECT_EQ(acked, 0);
  const std::string what = "batch 0: run 0: gpa 0x1234000 (+" + std::to_string(b.runs(0).pages()) +
                           " pages) lies outside guest memory";
  EXPECT_NE(st.error_message().find(what), std::string::npos) << st.error_message();
  ExpectFailedOutcome("lies outside guest memory");
}

TEST_F(RawClientTest, MissingBatchIsRefused) {
  SetUpSession();
  int acked = 0;
  grpc::Status st = SendBatches({Batch(0), Batch(2, 16 * kPageSize)}, &acked);
  EXPECT_EQ(acked, 1);
  EXPECT_NE(st.error_message().find("expected batch 1 (a batch is missing or repeated)"), std::string::npos)
      << st.error_message();
  ExpectFailedOutcome("expected batch 1");
}

TEST_F(RawClientTest, BatchForAnotherSessionIsRefused) {
  SetUpSession();
  proto::PageBatch b = Batch(0);
  b.set_session_id(session_ + 1);
  int acked = 0;
  grpc::Status st = SendBatches({b}, &acked);
  EXPECT_NE(st.error_message().find("not the migration in progress"), std::string::npos) << st.error_message();
}

TEST_F(RawClientTest, FinalMustMatchWhatWasApplied) {
  SetUpSession();
  int acked = 0;
  ASSERT_TRUE(SendBatches({Batch(0), Batch(1, 16 * kPageSize)}, &acked).ok());
  EXPECT_EQ(acked, 2);
  proto::ControlRequest req;
  proto::StreamTotals* t = req.mutable_final()->add_streams();
  t->set_stream(0);
  t->set_batches(3);  // one more than was sent
  t->set_pages(48);
  ASSERT_TRUE(call_->Write(req));
  grpc::Status st = ControlStatus();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_NE(st.error_message().find("source declares 3 batches (48 pages) for stream 0, receiver applied 2 (32 pages)"),
            std::string::npos)
      << st.error_message();
  ExpectFailedOutcome("source declares 3 batches");
  EXPECT_EQ(probe_->finals, 0);
}

TEST_F(RawClientTest, SourceVanishingBeforeFinalDiscardsTheTarget) {
  SetUpSession();
  ctx_.TryCancel();
  ExpectFailedOutcome("control stream closed before Final");
  EXPECT_EQ(probe_->abort_count(), 1);
}

// ---------------------------------------------------------------- throughput

// CPU seconds this process has used so far (all threads, user + system).
double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Raw loopback TCP, one stream, 1 MiB writes: the baseline the issue's
// target (>= 80%) is measured against.
double RawTcpMBps(uint64_t bytes) {
  const int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(lfd, 1) != 0) return 0;
  socklen_t len = sizeof a;
  getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
  std::thread reader([&] {
    const int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    std::vector<char> buf(1 << 20);
    uint64_t got = 0;
    while (got < bytes) {
      const ssize_t n = read(fd, buf.data(), buf.size());
      if (n <= 0) break;
      got += static_cast<uint64_t>(n);
    }
    close(fd);
  });
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return 0;
  std::vector<char> buf(1 << 20, 'x');
  const auto t0 = Clock::now();
  const double cpu0 = CpuSeconds();
  uint64_t sent = 0;
  while (sent < bytes) {
    const ssize_t n = write(fd, buf.data(), buf.size());
    if (n <= 0) break;
    sent += static_cast<uint64_t>(n);
  }
  close(fd);
  reader.join();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  close(lfd);
  std::printf("throughput: raw TCP used %.2f CPU-s per GiB, %.0f%% CPU\n",
              (CpuSeconds() - cpu0) / (static_cast<double>(bytes) / (1 << 30)), 100 * (CpuSeconds() - cpu0) / s);
  return static_cast<double>(bytes) / s / 1e6;
}

TEST_F(LoopbackTest, ThroughputReport) {
  const uint64_t bytes = 512ull << 20;
  Memory src;
  ASSERT_TRUE(src.Add(0, 0, bytes).ok());
  FillRandom(src.slots.slots()[0].host, bytes, 1);
  const double raw = RawTcpMBps(bytes);
  std::printf("throughput: raw loopback TCP, 1 stream, 1 MiB writes: %.0f MB/s\n", raw);
  for (uint32_t streams : {1u, 2u}) {
    GrpcSinkOptions o = Options(streams);
    auto sink = GrpcMigrationSink::Create(o);
    ASSERT_TRUE(sink.ok());
    engine::MigrationSetup setup;
    setup.memory = src.Ranges();
    setup.vcpus = 1;
    ASSERT_TRUE((*sink)->Begin(setup, src.slots).ok());
    // Round 0 writes into fresh target memory (page faults on the target,
    // as in a real migration); round 1 resends everything into memory that
    // is already resident.
    for (uint32_t round : {0u, 1u}) {
      engine::PageList all(src.AllPages());
      const auto t0 = Clock::now();
      const double cpu0 = CpuSeconds();
      auto st = (*sink)->SendPages(round, all);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      const double cpu = CpuSeconds() - cpu0;
      ASSERT_TRUE(st.ok()) << st.status().message();
      const double mbps = static_cast<double>(bytes) / s / 1e6;
      std::printf("throughput: %s, %u stream%s, none, 512 MiB random, round %u (%s target): %.0f MB/s "
                  "(%.0f%% of raw TCP), both ends %.2f CPU-s per GiB, %.0f%% CPU, wire %.1f MiB\n",
                  o.direct_data ? "direct data streams" : "gRPC Pages calls", streams, streams > 1 ? "s" : "", round, round == 0 ? "fresh" : "resident", mbps,
                  raw > 0 ? 100 * mbps / raw : 0.0, cpu / 0.5, 100 * cpu / s,
                  static_cast<double>(st->wire_bytes) / (1 << 20));
    }
    ASSERT_TRUE((*sink)->Finish({}).ok());
    ASSERT_EQ((*sink)->Commit().state, engine::CommitState::kCommitted);
    auto out = Outcome();
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(out->outcome, engine::Outcome::kCompleted);
    EXPECT_TRUE(SameMemory(out->target->memory(), src.slots));
  }
}

}  // namespace
}  // namespace pmlmig::transport
