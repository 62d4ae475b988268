// Direct data streams (transport/direct_wire.h) against a hostile or broken
// sender: a raw TCP client on the receiver's port speaks (and breaks) the
// direct framing. Same fixture and the same three checks as
// hostile_client_test.cc: the refusal names the problem, the receiver keeps
// serving, and the outcome is recorded as it should be.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <thread>

#include "../../transport/direct_wire.h"
#include "hostile_client.h"

namespace pmlmig::transport::hostile {
namespace {

// A raw direct stream: a TCP connection to the receiver's port.
class DirectClient {
 public:
  explicit DirectClient(int port) {
    fd_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  bool connected() const { return connected_; }
  void Close() { fd_.Reset(); }

  bool SendBytes(const std::string& bytes) {
    const std::atomic<bool> never{false};
    return direct::WriteFull(fd_.get(), reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), never,
                             std::chrono::steady_clock::now() + std::chrono::seconds(10))
        .ok();
  }
  bool Hello(uint64_t session, uint32_t stream, const std::string& key) {
    direct::Hello h;
    h.session_id = session;
    h.stream = stream;
    std::copy_n(key.begin(), std::min(key.size(), h.key.size()), h.key.begin());
    const auto b = direct::EncodeHello(h);
    return SendBytes(std::string(b.begin(), b.end()));
  }
  // A batch frame of `b` (its payload after the header, as the sender does).
  bool Batch(const proto::PageBatch& b) {
    proto::PageBatch header = b;
    header.clear_payload();
    return Frame(header.SerializeAsString(), b.payload());
  }
  bool Frame(const std::string& header, const std::string& payload) {
    std::string f(direct::kFrameBytes, '\0');
    direct::PutU32(reinterpret_cast<uint8_t*>(f.data()), static_cast<uint32_t>(header.size()));
    direct::PutU32(reinterpret_cast<uint8_t*>(f.data()) + 4, static_cast<uint32_t>(payload.size()));
    return SendBytes(f + header + payload);
  }
  bool End() { return Frame("", ""); }

  // The next reply (and an error's message), or nothing within 10 s or at
  // the end of the connection.
  std::optional<direct::Reply> Read(std::string* message = nullptr) {
    const std::atomic<bool> never{false};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    uint8_t b[direct::kReplyBytes];
    if (!direct::ReadFull(fd_.get(), b, sizeof b, never, deadline).ok()) return std::nullopt;
    Result<direct::Reply> r = direct::DecodeReply(std::span<const uint8_t, direct::kReplyBytes>(b));
    if (!r.ok()) return std::nullopt;
    if (r->kind == direct::ReplyKind::kError) {
      std::string m(r->b, '\0');
      if (!direct::ReadFull(fd_.get(), reinterpret_cast<uint8_t*>(m.data()), m.size(), never, deadline).ok()) {
        return std::nullopt;
      }
      if (message != nullptr) *message = m;
    }
    return *r;
  }
  // An error reply naming `what`, with `code`.
  void ExpectError(Code code, const std::string& what) {
    std::string m;
    std::optional<direct::Reply> r = Read(&m);
    ASSERT_TRUE(r.has_value()) << "no reply (expected an error naming '" << what << "')";
    ASSERT_EQ(r->kind, direct::ReplyKind::kError) << "reply kind " << static_cast<int>(r->kind);
    EXPECT_EQ(static_cast<Code>(r->a), code) << m;
    EXPECT_THAT(m, HasSubstr(what));
  }

 private:
  UniqueFd fd_;
  bool connected_ = false;
};

class HostileDirectTest : public HostileClientTest {
 protected:
  // Hello and a Setup asking for direct streams; the key from the reply.
  std::unique_ptr<ControlCall> DirectSession(uint64_t* session, std::string* key, uint32_t streams = 1) {
    auto call = std::make_unique<ControlCall>(stub_.get());
    *session = call->Hello();
    EXPECT_NE(*session, 0u) << "Hello got no reply";
    proto::ControlRequest setup = ValidSetup(streams);
    setup.mutable_setup()->set_direct_data(true);
    EXPECT_TRUE(call->Send(setup));
    proto::ControlReply rep;
    EXPECT_TRUE(call->Read(&rep));
    EXPECT_TRUE(rep.setup().direct()) << "the receiver did not offer direct streams";
    EXPECT_EQ(rep.setup().direct_key().size(), direct::kKeyBytes);
    *key = rep.setup().direct_key();
    return call;
  }

  // A session of one direct stream, connected and past its hello.
  struct OneStream {
    uint64_t session = 0;
    std::string key;
    std::unique_ptr<ControlCall> control;
    std::unique_ptr<DirectClient> d;
  };
  void OpenOneStream(OneStream* s) {
    s->control = DirectSession(&s->session, &s->key);
    s->d = std::make_unique<DirectClient>(server_->port());
    ASSERT_TRUE(s->d->connected());
    ASSERT_TRUE(s->d->Hello(s->session, 0, s->key));
  }

  // A direct session whose stream sends `good` valid batches (acked), then
  // the frame `bad` writes: the stream gets an error reply with `code`
  // naming `what`, and so does the control call; the outcome is failed
  // naming `what`; the receiver keeps serving.
  void ExpectDirectRefused(int good, const std::function<void(DirectClient&, uint64_t session, uint64_t seq)>& bad,
                           Code code, grpc::StatusCode grpc_code, const std::string& what) {
    SCOPED_TRACE(what);
    OneStream s;
    ASSERT_NO_FATAL_FAILURE(OpenOneStream(&s));
    const uint64_t session = s.session;
    DirectClient& d = *s.d;
    for (int i = 0; i < good; ++i) {
      ASSERT_TRUE(d.Batch(Batch(session, static_cast<uint64_t>(i), static_cast<uint64_t>(i) * 16 * kPageSize)));
      std::optional<direct::Reply> r = d.Read();
      ASSERT_TRUE(r.has_value());
      ASSERT_EQ(r->kind, direct::ReplyKind::kAck);
      EXPECT_EQ(r->b, static_cast<uint64_t>(i));
      EXPECT_EQ(r->a, 16u);
    }
    bad(d, session, static_cast<uint64_t>(good));
    d.ExpectError(code, what);
    ExpectStatus(s.control->Finish(), grpc_code, what);
    ExpectFailedOutcome(session, what);
    ExpectServing();
  }
};

TEST_F(HostileDirectTest, DirectStreamCarriesBatchesAcksAndItsEnd) {
  uint64_t session = 0;
  std::string key;
  auto control = DirectSession(&session, &key, 2);
  DirectClient s0(server_->port()), s1(server_->port());
  ASSERT_TRUE(s0.connected() && s1.connected());
  ASSERT_TRUE(s0.Hello(session, 0, key));
  ASSERT_TRUE(s1.Hello(session, 1, key));
  ASSERT_TRUE(s0.Batch(Batch(session, 0, 0, 64)));
  ASSERT_TRUE(s1.Batch(Batch(session, 0, 64 * kPageSize, 64, Compression::kLz4, 1)));
  ASSERT_TRUE(s0.Batch(Batch(session, 1, kHighGpa, 16, Compression::kZstd, 0, 1)));
  for (auto [d, acks] : {std::pair{&s0, 2}, std::pair{&s1, 1}}) {
    for (int i = 0; i < acks; ++i) {
      std::optional<direct::Reply> r = d->Read();
      ASSERT_TRUE(r.has_value());
      EXPECT_EQ(r->kind, direct::ReplyKind::kAck);
      EXPECT_EQ(r->b, static_cast<uint64_t>(i));
    }
    ASSERT_TRUE(d->End());
    std::optional<direct::Reply> end = d->Read();
    ASSERT_TRUE(end.has_value());
    EXPECT_EQ(end->kind, direct::ReplyKind::kEnd);
    EXPECT_EQ(end->b, static_cast<uint64_t>(acks));
  }
  proto::ControlRequest abort;
  abort.mutable_abort()->set_reason("hostile_direct_test: done");
  ASSERT_TRUE(control->Send(abort));
  ExpectStatus(control->Finish(), grpc::StatusCode::ABORTED, "done");
  auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->session_id, session);
  EXPECT_EQ(out->totals.batches, 3u);
  EXPECT_EQ(out->totals.pages, 64u + 64u + 16u);
  ExpectServing();
}

TEST_F(HostileDirectTest, WrongKeyOrSessionIsRefusedAndTheMigrationCarriesOn) {
  uint64_t session = 0;
  std::string key;
  auto control = DirectSession(&session, &key);
  std::string wrong = key;
  wrong[0] = static_cast<char>(wrong[0] ^ 1);
  {
    DirectClient d(server_->port());
    ASSERT_TRUE(d.Hello(session, 0, wrong));
    d.ExpectError(Code::kPermissionDenied, "key");
  }
  {
    DirectClient d(server_->port());
    ASSERT_TRUE(d.Hello(session + 1, 0, key));
    d.ExpectError(Code::kInvalidArgument, "not a migration in progress");
  }
  {
    direct::Hello h;
    h.version = 7;
    h.session_id = session;
    std::copy(key.begin(), key.end(), h.key.begin());
    const auto b = direct::EncodeHello(h);
    DirectClient d(server_->port());
    ASSERT_TRUE(d.SendBytes(std::string(b.begin(), b.end())));
    d.ExpectError(Code::kInvalidArgument, "version 7");
  }
  // The session was not touched: its real stream works.
  DirectClient d(server_->port());
  ASSERT_TRUE(d.Hello(session, 0, key));
  ASSERT_TRUE(d.Batch(Batch(session, 0)));
  std::optional<direct::Reply> r = d.Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->kind, direct::ReplyKind::kAck);
  control->Cancel();
  (void)control->Finish();
  auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->totals.batches, 1u);
  ExpectServing();
}

TEST_F(HostileDirectTest, SessionThatDidNotAskGetsNoDirectStream) {
  uint64_t session = 0;
  auto control = Session(&session);  // Setup without direct_data
  DirectClient d(server_->port());
  ASSERT_TRUE(d.Hello(session, 0, std::string(direct::kKeyBytes, '\0')));
  d.ExpectError(Code::kInvalidArgument, "asked for direct streams");
  control->Cancel();
  (void)control->Finish();
  ASSERT_TRUE(server_->WaitForMigration(Clock::now() + std::chrono::seconds(20)).ok());
  ExpectServing();
}

TEST_F(HostileDirectTest, BadBatchesFailTheMigrationWithTheirReason) {
  ExpectDirectRefused(
      2,
      [](DirectClient& d, uint64_t session, uint64_t seq) {
        proto::PageBatch b;
        b.set_session_id(session);
        b.set_sequence(seq);
        (void)d.Batch(b);  // no runs
      },
      Code::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT, "no pages");
  ExpectDirectRefused(
      1,
      [this](DirectClient& d, uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize);
        b.set_checksum(b.checksum() ^ 1);
        (void)d.Batch(b);
      },
      Code::kDataLoss, grpc::StatusCode::DATA_LOSS, "checksum mismatch");
  ExpectDirectRefused(
      0,
      [this](DirectClient& d, uint64_t session, uint64_t seq) { (void)d.Batch(Batch(session, seq + 3)); },
      Code::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT, "expected batch 0");
}

// The refusal ends the session, but the refused stream is still read (and
// dropped) after that, so that a source still writing gets the refusal and
// not a reset that could overtake it.
TEST_F(HostileDirectTest, RefusedStreamIsDrainedAfterTheSessionEnds) {
  OneStream s;
  ASSERT_NO_FATAL_FAILURE(OpenOneStream(&s));
  const uint64_t session = s.session;
  DirectClient& d = *s.d;
  proto::PageBatch b = Batch(session, 0, 0);
  b.set_checksum(b.checksum() ^ 1);
  ASSERT_TRUE(d.Batch(b));
  ExpectStatus(s.control->Finish(), grpc::StatusCode::DATA_LOSS, "checksum mismatch");
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(d.SendBytes(std::string(1 << 20, 'x'))) << "the refused stream was reset once the session ended";
  d.ExpectError(Code::kDataLoss, "checksum mismatch");
  d.Close();  // the source read the refusal and went: the session's end completes
  ExpectFailedOutcome(session, "checksum mismatch");
  ExpectServing();
}

TEST_F(HostileDirectTest, MalformedFramesFailTheMigration) {
  ExpectDirectRefused(
      1, [](DirectClient& d, uint64_t, uint64_t) { (void)d.Frame(std::string(2 << 20, 'x'), ""); },
      Code::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT, "malformed frame");
  ExpectDirectRefused(
      1, [](DirectClient& d, uint64_t, uint64_t) { (void)d.Frame("", "x"); }, Code::kInvalidArgument,
      grpc::StatusCode::INVALID_ARGUMENT, "malformed frame");
  ExpectDirectRefused(
      0, [](DirectClient& d, uint64_t, uint64_t) { (void)d.Frame("\xff\xff\xff", ""); }, Code::kInvalidArgument,
      grpc::StatusCode::INVALID_ARGUMENT, "malformed PageBatch header");
  ExpectDirectRefused(
      0,
      [this](DirectClient& d, uint64_t session, uint64_t seq) {
        const proto::PageBatch b = Batch(session, seq);
        (void)d.Frame(b.SerializeAsString(), "");  // the header carries the payload itself
      },
      Code::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT, "malformed PageBatch header");
}

TEST_F(HostileDirectTest, StreamThatBreaksFailsTheMigration) {
  uint64_t session = 0;
  std::string key;
  auto control = DirectSession(&session, &key);
  {
    DirectClient d(server_->port());
    ASSERT_TRUE(d.Hello(session, 0, key));
    const proto::PageBatch b = Batch(session, 0);
    proto::PageBatch header = b;
    header.clear_payload();
    std::string f(direct::kFrameBytes, '\0');
    direct::PutU32(reinterpret_cast<uint8_t*>(f.data()), static_cast<uint32_t>(header.ByteSizeLong()));
    direct::PutU32(reinterpret_cast<uint8_t*>(f.data()) + 4, static_cast<uint32_t>(b.payload().size()));
    ASSERT_TRUE(d.SendBytes(f + header.SerializeAsString() + b.payload().substr(0, 100)));
  }  // closed halfway through the payload
  ExpectStatus(control->Finish(), grpc::StatusCode::UNAVAILABLE, "stream 0 broke");
  ExpectFailedOutcome(session, "stream 0 broke");
  ExpectServing();
}

TEST_F(HostileDirectTest, StreamStalledMidPayloadDoesNotHoldThePostcopySwitch) {
  // Half a batch, read in place, then silence with the connection open:
  // the receiver is writing that batch into memory when PostcopyPrepare
  // comes. The switch waits at most final_drain_timeout (300 ms here), not
  // until the idle watchdog (60 s), and fails naming why.
  OneStream s;
  ASSERT_NO_FATAL_FAILURE(OpenOneStream(&s));
  const proto::PageBatch b = Batch(s.session, 0);
  proto::PageBatch header = b;
  header.clear_payload();
  std::string f(direct::kFrameBytes, '\0');
  direct::PutU32(reinterpret_cast<uint8_t*>(f.data()), static_cast<uint32_t>(header.ByteSizeLong()));
  direct::PutU32(reinterpret_cast<uint8_t*>(f.data()) + 4, static_cast<uint32_t>(b.payload().size()));
  ASSERT_TRUE(s.d->SendBytes(f + header.SerializeAsString() + b.payload().substr(0, 100)));
  std::this_thread::sleep_for(milliseconds(100));  // the receiver is inside the payload
  proto::ControlRequest prepare;
  prepare.mutable_prepare();
  const auto t = std::chrono::steady_clock::now();
  ASSERT_TRUE(s.control->Send(prepare));
  ExpectStatus(s.control->Finish(), grpc::StatusCode::DATA_LOSS, "a batch was still being received");
  EXPECT_LT(std::chrono::steady_clock::now() - t, std::chrono::seconds(30)) << "held until the idle watchdog";
  ExpectFailedOutcome(s.session, "a batch was still being received");
  ExpectServing();
}

TEST_F(HostileDirectTest, BytesThatAreNotAHelloStillReachGrpc) {
  // A prefix of the magic, then silence, then the connection closes; and
  // bytes that are neither a hello nor HTTP/2: gRPC gets (and drops) them.
  {
    DirectClient d(server_->port());
    ASSERT_TRUE(d.SendBytes("PMLM"));
  }
  {
    DirectClient d(server_->port());
    ASSERT_TRUE(d.SendBytes("GET / HTTP/1.1\r\n\r\n"));
    EXPECT_FALSE(d.Read().has_value());  // gRPC closes it; no direct reply
  }
  ExpectServing();
}

}  // namespace
}  // namespace pmlmig::transport::hostile
