// The two-phase switch-over under a broken network, over loopback through an
// in-process proxy the test controls at exact protocol moments (from inside
// the fake target's OnFinal / OnCommit):
//   - the prepared reply lost: the source keeps its VM, the target discards;
//   - the commit lost on its way: the sink asks Resolve, the receiver
//     discards, the source resumes;
//   - the commit reply lost: the sink asks Resolve, the receiver says
//     committed, the source stops its copy;
//   - the receiver unreachable after the commit: in doubt, never resumed,
//     while the receiver discards the uncommitted VM at its deadline;
//   - Resolve before a late Commit: the Commit is refused.
// Whatever happens, the VM never runs on both sides.
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "../../transport/batch_codec.h"
#include "migration.grpc.pb.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "../support/loopback_proxy.h"

namespace pmlmig::transport {
namespace {

using std::chrono::milliseconds;
using engine::CommitState;
using testing_support::Proxy;

// Guest memory: one anonymous mapping.
struct Memory {
  explicit Memory(uint64_t size) {
    auto m = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "switchover test");
    EXPECT_TRUE(m.ok());
    map = std::move(*m);
    std::memset(map.data(), 0x5a, size);
    EXPECT_TRUE(slots.Set({0, 0, map.data(), size}).ok());
  }
  Mapping map;
  engine::SlotTable slots;
};

// What the fake target did; the test's hooks run inside OnFinal / OnCommit.
struct Probe {
  std::mutex mu;
  int commits = 0;
  int aborts = 0;
  std::function<void()> on_final;   // after the state is "restored", before the prepared reply
  std::function<void()> on_commit;  // after the VM "resumed", before the commit reply
};

class FakeTarget final : public engine::MigrationTarget {
 public:
  std::unique_ptr<engine::VmControl> TakeVm() override { return nullptr; }  // no VM behind this target
  explicit FakeTarget(std::shared_ptr<Probe> p) : probe_(std::move(p)) {}
  Status OnSetup(const engine::MigrationSetup& setup) override {
    mem_ = std::make_unique<Memory>(setup.memory.at(0).size);
    return Status::Ok();
  }
  const engine::SlotTable& memory() const override { return mem_->slots; }
  Result<engine::FinalReply> OnFinal(const engine::FinalState&) override {
    if (probe_->on_final) probe_->on_final();
    engine::FinalReply r;
    r.prepared = true;
    return r;
  }
  Result<double> OnCommit() override {
    {
      std::lock_guard lock(probe_->mu);
      ++probe_->commits;
    }
    if (probe_->on_commit) probe_->on_commit();
    return 0.1;
  }
  void OnAbort(const std::string&) override {
    std::lock_guard lock(probe_->mu);
    ++probe_->aborts;
  }

 private:
  std::shared_ptr<Probe> probe_;
  std::unique_ptr<Memory> mem_;
};

class SwitchoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MigrationServerOptions o;
    o.commit_timeout = milliseconds(1500);
    auto s = MigrationServer::Start("127.0.0.1:0", [p = probe_] { return std::make_unique<FakeTarget>(p); }, o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    server_ = std::move(*s);
    proxy_ = std::make_unique<Proxy>(server_->port());
  }

  // Begin, one round, Finish through the proxy. Returns Finish's result.
  Result<engine::FinalReply> UpToFinish(GrpcMigrationSink& sink) {
    engine::MigrationSetup setup;
    setup.memory.push_back({0, 0, src_.slots.total_bytes()});
    setup.vcpus = 1;
    PMLMIG_RETURN_IF_ERROR(sink.Begin(setup, src_.slots));
    engine::PageList all({{0, src_.slots.total_bytes() / engine::kPageSize}});
    PMLMIG_RETURN_IF_ERROR(sink.SendPages(0, all).status());
    engine::FinalState fs;
    fs.vm_state = {1, 2, 3};
    return sink.Finish(fs);
  }

  std::unique_ptr<GrpcMigrationSink> Sink() {
    GrpcSinkOptions o;
    o.target = proxy_->target();
    o.commit_timeout = milliseconds(1000);
    o.resolve_timeout = milliseconds(2500);
    o.final_timeout = milliseconds(3000);
    auto s = GrpcMigrationSink::Create(o);
    EXPECT_TRUE(s.ok());
    return std::move(*s);
  }

  ReceivedMigration Outcome() {
    auto out = server_->WaitForMigration(std::chrono::steady_clock::now() + std::chrono::seconds(10));
    EXPECT_TRUE(out.ok()) << out.status().message();
    return out.ok() ? std::move(*out) : ReceivedMigration{};
  }
  int commits() {
    std::lock_guard lock(probe_->mu);
    return probe_->commits;
  }

  std::shared_ptr<Probe> probe_ = std::make_shared<Probe>();
  Memory src_{1 << 20};
  std::unique_ptr<MigrationServer> server_;
  std::unique_ptr<Proxy> proxy_;
};

TEST_F(SwitchoverTest, PreparedReplyLostTheSourceKeepsTheVm) {
  probe_->on_final = [this] { proxy_->CutAll(); };
  auto sink = Sink();
  auto reply = UpToFinish(*sink);
  ASSERT_FALSE(reply.ok()) << "Finish must fail when its reply is lost";
  // The sink never sends Commit after a failed Finish.
  EXPECT_EQ(sink->Commit().state, CommitState::kNotCommitted);
  const ReceivedMigration out = Outcome();
  EXPECT_EQ(out.outcome, engine::Outcome::kFailed);
  EXPECT_NE(out.error.message().find("before Commit"), std::string::npos) << out.error.message();
  EXPECT_EQ(commits(), 0) << "the target must never run a VM whose commit did not come";
}

TEST_F(SwitchoverTest, CommitLostOnItsWayResolvesAsDiscarded) {
  probe_->on_final = [this] { proxy_->DropUpstream(); };  // the prepared reply passes, the Commit vanishes
  auto sink = Sink();
  auto reply = UpToFinish(*sink);
  ASSERT_TRUE(reply.ok()) << reply.status().message();
  const engine::CommitResult c = sink->Commit();
  EXPECT_EQ(c.state, CommitState::kNotCommitted) << c.detail.message();
  EXPECT_TRUE(c.resolved);
  EXPECT_NE(c.detail.message().find("not committed"), std::string::npos) << c.detail.message();
  const ReceivedMigration out = Outcome();
  EXPECT_EQ(out.outcome, engine::Outcome::kFailed);
  EXPECT_EQ(commits(), 0);
}

TEST_F(SwitchoverTest, CommitReplyLostResolvesAsCommitted) {
  probe_->on_commit = [this] { proxy_->CutAll(); };  // the VM runs there; its reply dies
  auto sink = Sink();
  auto reply = UpToFinish(*sink);
  ASSERT_TRUE(reply.ok()) << reply.status().message();
  const engine::CommitResult c = sink->Commit();
  EXPECT_EQ(c.state, CommitState::kCommitted) << c.detail.message();
  EXPECT_TRUE(c.resolved);
  const ReceivedMigration out = Outcome();
  EXPECT_EQ(out.outcome, engine::Outcome::kCompleted);
  EXPECT_EQ(commits(), 1);
}

TEST_F(SwitchoverTest, ReceiverUnreachableAfterCommitIsInDoubtAndNeverRunsTwice) {
  probe_->on_final = [this] {
    proxy_->DropUpstream();  // the Commit vanishes...
  };
  auto sink = Sink();
  auto reply = UpToFinish(*sink);
  ASSERT_TRUE(reply.ok()) << reply.status().message();
  proxy_->Blackhole();  // ...and nothing reaches the receiver any more (a partition)
  const auto t0 = std::chrono::steady_clock::now();
  const engine::CommitResult c = sink->Commit();
  EXPECT_EQ(c.state, CommitState::kInDoubt) << c.detail.message();
  EXPECT_NE(c.detail.message().find("in doubt"), std::string::npos) << c.detail.message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(8));
  // The receiver never got the Commit: it discards at its commit deadline.
  const ReceivedMigration out = Outcome();
  EXPECT_EQ(out.outcome, engine::Outcome::kFailed);
  EXPECT_NE(out.error.message().find("no Commit within"), std::string::npos) << out.error.message();
  EXPECT_EQ(commits(), 0);
}

TEST_F(SwitchoverTest, ResolveBeforeALateCommitWinsAndTheCommitIsRefused) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials());
  auto stub = proto::Migration::NewStub(channel);
  grpc::ClientContext ctx;
  auto call = stub->Control(&ctx);
  proto::ControlRequest req;
  proto::ControlReply rep;
  req.mutable_hello()->set_version(kProtocolVersion);
  ASSERT_TRUE(call->Write(req));
  ASSERT_TRUE(call->Read(&rep));
  const uint64_t session = rep.hello().session_id();
  req.Clear();
  proto::Setup* s = req.mutable_setup();
  proto::MemoryRange* m = s->add_memory();
  m->set_size(1 << 20);
  s->set_vcpus(1);
  s->set_streams(1);
  ASSERT_TRUE(call->Write(req));
  ASSERT_TRUE(call->Read(&rep));
  ASSERT_TRUE(rep.has_setup());
  req.Clear();
  req.mutable_final()->add_streams()->set_stream(0);
  ASSERT_TRUE(call->Write(req));
  ASSERT_TRUE(call->Read(&rep));
  ASSERT_TRUE(rep.has_final() && rep.final().prepared());

  grpc::ClientContext rctx;
  proto::ResolveRequest rreq;
  rreq.set_session_id(session);
  proto::ResolveReply rrep;
  ASSERT_TRUE(stub->Resolve(&rctx, rreq, &rrep).ok());
  EXPECT_EQ(rrep.outcome(), proto::ResolveReply::DISCARDED) << rrep.detail();

  req.Clear();
  req.mutable_commit();
  (void)call->Write(req);  // may already fail: the receiver ended the call
  while (call->Read(&rep)) EXPECT_FALSE(rep.has_commit()) << "a discarded session must never commit";
  EXPECT_FALSE(call->Finish().ok());
  EXPECT_EQ(commits(), 0);
  const ReceivedMigration out = Outcome();
  EXPECT_EQ(out.outcome, engine::Outcome::kFailed);
  EXPECT_NE(out.error.message().find("resolved"), std::string::npos) << out.error.message();

  // Asked again, and about a session it never had.
  grpc::ClientContext again;
  ASSERT_TRUE(stub->Resolve(&again, rreq, &rrep).ok());
  EXPECT_EQ(rrep.outcome(), proto::ResolveReply::DISCARDED);
  grpc::ClientContext unknown;
  rreq.set_session_id(session ^ 1);
  ASSERT_TRUE(stub->Resolve(&unknown, rreq, &rrep).ok());
  EXPECT_EQ(rrep.outcome(), proto::ResolveReply::UNKNOWN);
}

// The receiver's phase deadlines: a peer that goes quiet is dropped with a
// message naming the deadline (in its report, and in the status the peer
// reads), and the receiver takes the next migration.
TEST(ReceiverDeadlinesTest, HandshakeAndIdleDeadlinesEndASilentPeer) {
  auto probe = std::make_shared<Probe>();
  MigrationServerOptions o;
  // The handshake deadline leaves room for Hello and Setup on a loaded CI
  // machine under ASan (the idle case needs both done in time).
  o.handshake_timeout = milliseconds(1200);
  o.idle_timeout = milliseconds(400);
  auto server = MigrationServer::Start("127.0.0.1:0", [probe] { return std::make_unique<FakeTarget>(probe); }, o);
  ASSERT_TRUE(server.ok()) << server.status().message();
  auto stub = proto::Migration::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  proto::ControlRequest req;
  proto::ControlReply rep;
  {  // Hello, then nothing.
    grpc::ClientContext ctx;
    auto call = stub->Control(&ctx);
    req.mutable_hello()->set_version(kProtocolVersion);
    ASSERT_TRUE(call->Write(req));
    ASSERT_TRUE(call->Read(&rep));
    while (call->Read(&rep)) {
    }
    const grpc::Status st = call->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    EXPECT_NE(st.error_message().find("no valid Setup within 1200 ms"), std::string::npos) << st.error_message();
    auto out = (*server)->WaitForMigration(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
    EXPECT_NE(out->error.message().find("no valid Setup within 1200 ms"), std::string::npos) << out->error.message();
  }
  {  // Hello, Setup, then no batch.
    grpc::ClientContext ctx;
    auto call = stub->Control(&ctx);
    req.Clear();
    req.mutable_hello()->set_version(kProtocolVersion);
    ASSERT_TRUE(call->Write(req));
    ASSERT_TRUE(call->Read(&rep));
    req.Clear();
    proto::Setup* s = req.mutable_setup();
    s->add_memory()->set_size(1 << 20);
    s->set_vcpus(1);
    s->set_streams(1);
    ASSERT_TRUE(call->Write(req));
    ASSERT_TRUE(call->Read(&rep));
    ASSERT_TRUE(rep.has_setup());
    while (call->Read(&rep)) {
    }
    const grpc::Status st = call->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    EXPECT_NE(st.error_message().find("no page batch and no control message for 400 ms"), std::string::npos) << st.error_message();
    auto out = (*server)->WaitForMigration(std::chrono::steady_clock::now() + std::chrono::seconds(5));
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(out->outcome, engine::Outcome::kFailed);
    EXPECT_NE(out->error.message().find("no page batch and no control message for 400 ms"), std::string::npos)
        << out->error.message();
    std::lock_guard lock(probe->mu);
    EXPECT_EQ(probe->aborts, 1) << "the partial VM must be discarded";
  }
  {  // Nothing at all, not even a Hello: the call is ended (no session, no outcome).
    grpc::ClientContext ctx;
    auto call = stub->Control(&ctx);
    const auto t0 = std::chrono::steady_clock::now();
    while (call->Read(&rep)) {
    }
    const grpc::Status st = call->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
    EXPECT_NE(st.error_message().find("no Hello within 1200 ms of connecting"), std::string::npos) << st.error_message();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
  }
}

TEST_F(SwitchoverTest, AWrongTokenIsRefusedBeforeAnySession) {
  MigrationServerOptions o;
  o.security.token = "correct-horse-battery-staple";
  auto s = MigrationServer::Start("127.0.0.1:0", [p = probe_] { return std::make_unique<FakeTarget>(p); }, o);
  ASSERT_TRUE(s.ok()) << s.status().message();
  GrpcSinkOptions so;
  so.target = "127.0.0.1:" + std::to_string((*s)->port());
  so.security.token = "wrong-horse-battery-staple!";
  auto sink = GrpcMigrationSink::Create(so);
  ASSERT_TRUE(sink.ok());
  engine::MigrationSetup setup;
  setup.memory.push_back({0, 0, 1 << 20});
  setup.vcpus = 1;
  const Status st = (*sink)->Begin(setup, src_.slots);
  EXPECT_EQ(st.code(), Code::kPermissionDenied) << st.message();
  EXPECT_NE(st.message().find("token does not match"), std::string::npos) << st.message();
  // No session was created: nothing ends.
  auto out = (*s)->WaitForMigration(std::chrono::steady_clock::now() + milliseconds(300));
  EXPECT_FALSE(out.ok());
  // Resolve and Pages are guarded too.
  auto stub = proto::Migration::NewStub(grpc::CreateChannel(so.target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  proto::ResolveRequest rreq;
  proto::ResolveReply rrep;
  EXPECT_EQ(stub->Resolve(&ctx, rreq, &rrep).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  grpc::ClientContext pctx;
  auto pages = stub->Pages(&pctx);
  proto::BatchAck ack;
  EXPECT_FALSE(pages->Read(&ack));
  EXPECT_EQ(pages->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

}  // namespace
}  // namespace pmlmig::transport
