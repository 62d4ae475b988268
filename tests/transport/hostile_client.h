// The hostile-client fixture (see hostile_client_test.cc for what every case
// checks): a MigrationServer on loopback whose fake target's guest memory
// is two plain mappings (slot 0: 4 MiB at gpa 0, slot 1: 1 MiB at gpa
// 4 GiB), raw gRPC calls that can send anything, and the checks. Shared by
// hostile_client_test.cc (the pre-copy protocol) and
// hostile_postcopy_test.cc (post-copy's messages).
#pragma once

// tests can also send bytes that are not a valid PageBatch.
#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <lz4.h>
#include <sys/mman.h>
#include <xxhash.h>
#include <zstd.h>

#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../../transport/batch_codec.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/units.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/transport/grpc_server.h"
#include "test_memory.h"


namespace pmlmig::transport::hostile {


using engine::kPageSize;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kHighGpa = 4ull << 30;
constexpr uint64_t kLowBytes = 4ull << 20;   // 1024 pages: one full batch
constexpr uint64_t kHighBytes = 1ull << 20;  // 256 pages

inline void FillCompressible(uint8_t* p, uint64_t len, uint64_t seed) {
  static const char kText[] = "guest page contents that compress well, with a counter: ";
  for (uint64_t i = 0; i < len; ++i) p[i] = static_cast<uint8_t>(kText[(i + seed) % (sizeof kText - 1)]);
  std::memcpy(p, &seed, sizeof seed);
}

using Memory = test::TestMemory;
using test::FillRandom;

// What the fake targets saw; shared with the test.
struct Probe {
  std::mutex mu;
  int setups = 0;
  int finals = 0;
  int aborts = 0;
};

// A MigrationTarget whose "VM" is plain memory built from the setup.
class FakeTarget final : public engine::MigrationTarget {
 public:
  std::unique_ptr<engine::VmControl> TakeVm() override { return nullptr; }  // no VM behind this target
  explicit FakeTarget(std::shared_ptr<Probe> probe) : probe_(std::move(probe)) {}

  Status OnSetup(const engine::MigrationSetup& setup) override {
    for (const engine::MemoryRange& r : setup.memory) PMLMIG_RETURN_IF_ERROR(mem_.Add(r.slot, r.gpa, r.size));
    std::lock_guard lock(probe_->mu);
    ++probe_->setups;
    return Status::Ok();
  }
  const engine::SlotTable& memory() const override { return mem_.slots; }
  // No test here gets a Final accepted (nothing depends on what follows
  // Final); should one be, the target refuses it.
  Result<engine::FinalReply> OnFinal(const engine::FinalState& /*state*/) override {
    std::lock_guard lock(probe_->mu);
    ++probe_->finals;
    return Internal("hostile_client_test: no Final is expected to be accepted");
  }
  // Never reached here: no Final is accepted.
  Result<double> OnCommit() override { return Internal("hostile_client_test: no Commit is expected"); }
  void OnAbort(const std::string& /*why*/) override {
    // Unmapping makes any later write by the transport crash the test.
    mem_.slots = {};
    mem_.maps.clear();
    std::lock_guard lock(probe_->mu);
    ++probe_->aborts;
  }

 private:
  std::shared_ptr<Probe> probe_;
  Memory mem_;
};

// One Control call.
class ControlCall {
 public:
  explicit ControlCall(proto::Migration::Stub* stub) : call_(stub->Control(&ctx_)) {}

  bool Send(const proto::ControlRequest& req) { return call_->Write(req); }
  bool Read(proto::ControlReply* rep) { return call_->Read(rep); }
  // Hello with `version`; the session id from the reply, or 0 if none came.
  uint64_t Hello(uint32_t version = kProtocolVersion) {
    proto::ControlRequest req;
    req.mutable_hello()->set_version(version);
    req.mutable_hello()->set_sender("hostile_client_test");
    if (!Send(req)) return 0;
    proto::ControlReply rep;
    if (!Read(&rep) || !rep.has_hello()) return 0;
    return rep.hello().session_id();
  }
  // The call's final status once the receiver has ended it.
  grpc::Status Finish() {
    proto::ControlReply rep;
    while (call_->Read(&rep)) {
    }
    return call_->Finish();
  }
  // Drops the call, as a sender that fails does (GrpcMigrationSink cancels
  // every call).
  void Cancel() { ctx_.TryCancel(); }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<proto::ControlRequest, proto::ControlReply>> call_;
};

// A call of raw bytes: what is sent need not be a valid message.
class RawCall {
 public:
  RawCall(grpc::Channel* channel, const char* method)
      : method_(method, grpc::internal::RpcMethod::BIDI_STREAMING),
        call_(grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
            channel, method_, &ctx_)) {}

  bool Send(const std::string& wire) {
    grpc::Slice slice(wire);
    grpc::ByteBuffer buf(&slice, 1);
    return call_->Write(buf);
  }
  // The next message, parsed as an M; false at the end or if it does not parse.
  template <typename M>
  bool Read(M* m) {
    grpc::ByteBuffer buf;
    if (!call_->Read(&buf)) return false;
    return grpc::SerializationTraits<M>::Deserialize(&buf, m).ok();
  }
  // Drops the call, as a sender that fails does (GrpcMigrationSink cancels
  // every call).
  void Cancel() { ctx_.TryCancel(); }

 protected:
  // Reads until the receiver ends the call; its status.
  grpc::Status Drain() {
    grpc::ByteBuffer buf;
    while (call_->Read(&buf)) {
    }
    return call_->Finish();
  }
  void WritesDone() { call_->WritesDone(); }

 private:
  const grpc::internal::RpcMethod method_;  // before call_, which is created with it
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> call_;
};

// One Control call over raw bytes: what is sent need not be a ControlRequest.
class RawControlCall : public RawCall {
 public:
  explicit RawControlCall(grpc::Channel* channel) : RawCall(channel, "/pmlmig.proto.Migration/Control") {}

  using RawCall::Send;
  bool Send(const proto::ControlRequest& req) { return Send(req.SerializeAsString()); }
  // Hello; the session id from the reply, or 0 if none came.
  uint64_t Hello() {
    proto::ControlRequest req;
    req.mutable_hello()->set_version(kProtocolVersion);
    proto::ControlReply rep;
    if (!Send(req) || !Read(&rep) || !rep.has_hello()) return 0;
    return rep.hello().session_id();
  }
  grpc::Status Finish() { return Drain(); }
};

// One Pages call over raw bytes: what is sent need not be a PageBatch.
class PagesCall : public RawCall {
 public:
  explicit PagesCall(grpc::Channel* channel) : RawCall(channel, "/pmlmig.proto.Migration/Pages") {}

  bool ReadAck(proto::BatchAck* ack) { return Read(ack); }
  // Sends each message and waits for its ack, stopping at the first that
  // gets none; `acked` counts the acks.
  bool SendAll(const std::vector<std::string>& wires, int* acked) {
    for (const std::string& w : wires) {
      proto::BatchAck ack;
      if (!Send(w) || !ReadAck(&ack)) return false;
      ++*acked;
    }
    return true;
  }
  grpc::Status Finish() {
    WritesDone();
    return Drain();
  }
};

inline std::string Wire(const proto::PageBatch& b) { return b.SerializeAsString(); }

// Recomputes a batch's checksum over `data` (its uncompressed payload), so
// that only the intended defect is wrong.
inline void Reseal(proto::PageBatch* b, const std::string& data) {
  b->set_checksum(BatchChecksum(*b, XXH64(data.data(), data.size(), 0)));
}
inline void Reseal(proto::PageBatch* b) { Reseal(b, b->payload()); }

class HostileClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(src_.Add(0, 0, kLowBytes).ok());
    ASSERT_TRUE(src_.Add(1, kHighGpa, kHighBytes).ok());
    // Slot 0: pages 0-15 random, 16-31 zero, 32-1023 compressible;
    // slot 1: random.
    for (uint64_t p = 0; p < kLowBytes / kPageSize; ++p) {
      if (p < 16) {
        FillRandom(src_.At(p * kPageSize), kPageSize, p + 1);
      } else if (p >= 32) {
        FillCompressible(src_.At(p * kPageSize), kPageSize, p);
      }
    }
    FillRandom(src_.At(kHighGpa), kHighBytes, 99);

    probe_ = std::make_shared<Probe>();
    auto probe = probe_;
    MigrationServerOptions o;
    o.final_drain_timeout = milliseconds(300);
    o.max_memory_bytes = 1ull << 30;
    auto s = MigrationServer::Start("127.0.0.1:0", [probe] { return std::make_unique<FakeTarget>(probe); }, o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    server_ = std::move(s).value();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials());
    stub_ = proto::Migration::NewStub(channel_);
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
  }

  proto::ControlRequest ValidSetup(uint32_t streams = 1) const {
    proto::ControlRequest req;
    proto::Setup* s = req.mutable_setup();
    for (const engine::MemorySlot& slot : src_.slots.slots()) {
      proto::MemoryRange* m = s->add_memory();
      m->set_slot(slot.slot);
      m->set_gpa(slot.gpa);
      m->set_size(slot.size);
    }
    s->set_vm_description("hostile");
    s->set_vcpus(1);
    s->set_streams(streams);
    return req;
  }

  // Hello and a valid Setup on a new control call; the call stays open.
  std::unique_ptr<ControlCall> Session(uint64_t* session, uint32_t streams = 1) {
    auto call = std::make_unique<ControlCall>(stub_.get());
    *session = call->Hello();
    EXPECT_NE(*session, 0u) << "Hello got no reply";
    EXPECT_TRUE(call->Send(ValidSetup(streams)));
    proto::ControlReply rep;
    EXPECT_TRUE(call->Read(&rep));
    EXPECT_TRUE(rep.has_setup());
    EXPECT_EQ(rep.setup().memory_bytes(), kLowBytes + kHighBytes);
    return call;
  }

  // A valid batch of `pages` pages at `gpa` (split at slot ends).
  proto::PageBatch Batch(uint64_t session, uint64_t seq, uint64_t gpa = 0, uint64_t pages = 16,
                         Compression c = Compression::kNone, uint32_t stream = 0, uint32_t round = 0) const {
    BatchBuilder b(c);
    proto::PageBatch batch;
    Status s = b.Build(src_.slots, gpa, pages, BatchHeader{session, stream, round, seq}, &batch);
    EXPECT_TRUE(s.ok()) << s.message();
    return batch;
  }

  // A batch of 1025 data pages on `stream`: its payload alone is over the
  // 4 MiB a batch may carry, which decoding refuses.
  std::string PayloadOver4MiB(uint64_t session, uint64_t seq, uint32_t stream = 0) const {
    proto::PageBatch b = Batch(session, seq, 32 * kPageSize, 16, Compression::kNone, stream);
    b.clear_runs();
    proto::PageRun* r = b.add_runs();
    r->set_gpa(0);
    r->set_pages(1024);
    r = b.add_runs();
    r->set_gpa(kHighGpa);
    r->set_pages(1);
    b.set_payload(std::string(1025 * kPageSize, 'x'));
    b.set_uncompressed_length(1025 * kPageSize);
    Reseal(&b);
    return Wire(b);
  }

  static void ExpectStatus(const grpc::Status& st, grpc::StatusCode code, const std::string& what) {
    EXPECT_EQ(st.error_code(), code) << "status " << st.error_code() << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(what));
  }

  // The next outcome: failed, for `session`, naming `what`.
  void ExpectFailedOutcome(uint64_t session, const std::string& what) {
    auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->outcome, engine::Outcome::kFailed) << engine::OutcomeName(out->outcome);
    EXPECT_EQ(out->session_id, session);
    EXPECT_FALSE(out->error.ok());
    EXPECT_THAT(out->error.message(), HasSubstr(what));
    EXPECT_EQ(out->target, nullptr);
  }

  // The receiver still serves: Hello, Setup, three batches (uncompressed,
  // lz4, zstd, each acked), then Abort. Its outcome must be the next one
  // recorded (so no hostile sequence left an outcome behind) and aborted.
  void ExpectServing() {
    SCOPED_TRACE("the receiver must keep serving");
    int aborts_before;
    {
      std::lock_guard lock(probe_->mu);
      aborts_before = probe_->aborts;
    }
    uint64_t session = 0;
    auto control = Session(&session);
    ASSERT_NE(session, 0u);
    {
      PagesCall pages(channel_.get());
      const std::vector<proto::PageBatch> batches = {
          Batch(session, 0, 0, 64), Batch(session, 1, 64 * kPageSize, 64, Compression::kLz4),
          Batch(session, 2, kHighGpa, 16, Compression::kZstd, 0, 1)};
      for (const proto::PageBatch& b : batches) {
        ASSERT_TRUE(pages.Send(Wire(b)));
        proto::BatchAck ack;
        ASSERT_TRUE(pages.ReadAck(&ack)) << "no ack for batch " << b.sequence() << ": " << pages.Finish().error_message();
        EXPECT_EQ(ack.sequence(), b.sequence());
        uint32_t n = 0;
        for (const proto::PageRun& r : b.runs()) n += r.pages();
        EXPECT_EQ(ack.pages(), n);
      }
      EXPECT_TRUE(pages.Finish().ok());
    }
    proto::ControlRequest abort;
    abort.mutable_abort()->set_reason("hostile_client_test: serving check done");
    ASSERT_TRUE(control->Send(abort));
    ExpectStatus(control->Finish(), grpc::StatusCode::ABORTED, "serving check done");
    auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
    ASSERT_TRUE(out.ok()) << out.status().message();
    EXPECT_EQ(out->session_id, session) << "an earlier outcome was left behind: " << out->error.message();
    EXPECT_EQ(out->outcome, engine::Outcome::kCancelled) << out->error.message();
    EXPECT_EQ(out->totals.batches, 3u);
    EXPECT_EQ(out->totals.pages, 64u + 64u + 16u);
    std::lock_guard lock(probe_->mu);
    EXPECT_EQ(probe_->aborts, aborts_before + 1);
  }

  // A session in which the Pages call sends `good` valid batches (acked),
  // then `bad` (made by `make` from the session id and its sequence number
  // `good`): the call must end with `code` naming `what`, and so must the
  // control call (the source learns the reason there too, not just
  // "cancelled"), the outcome failed naming `what`; then the receiver must
  // keep serving.
  void ExpectBatchRefused(int good, const std::function<std::string(uint64_t session, uint64_t seq)>& make,
                          grpc::StatusCode code, const std::string& what) {
    SCOPED_TRACE(what);
    uint64_t session = 0;
    auto control = Session(&session);
    std::vector<std::string> wires;
    for (int i = 0; i < good; ++i) {
      wires.push_back(Wire(Batch(session, static_cast<uint64_t>(i), static_cast<uint64_t>(i) * 16 * kPageSize)));
    }
    wires.push_back(make(session, static_cast<uint64_t>(good)));
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_FALSE(pages.SendAll(wires, &acked));
    EXPECT_EQ(acked, good);
    ExpectStatus(pages.Finish(), code, what);
    ExpectStatus(control->Finish(), code, what);
    ExpectFailedOutcome(session, what);
    ExpectServing();
  }

  // A session whose control call sends `req` after Hello (and Setup, with
  // `after_setup`): the call must end with `code` naming `what` and the
  // outcome must be failed; then the receiver must keep serving.
  void ExpectControlRefused(bool after_setup, const proto::ControlRequest& req, grpc::StatusCode code,
                            const std::string& what) {
    SCOPED_TRACE(what);
    uint64_t session = 0;
    std::unique_ptr<ControlCall> control;
    if (after_setup) {
      control = Session(&session);
    } else {
      control = std::make_unique<ControlCall>(stub_.get());
      session = control->Hello();
      ASSERT_NE(session, 0u);
    }
    control->Send(req);  // may fail if the receiver already ended the call
    ExpectStatus(control->Finish(), code, what);
    ExpectFailedOutcome(session, what);
    ExpectServing();
  }

  Memory src_;
  std::shared_ptr<Probe> probe_;
  std::unique_ptr<MigrationServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<proto::Migration::Stub> stub_;
};

}  // namespace pmlmig::transport::hostile
