// Hostile input to the receiver's post-copy messages (proto/migration.proto:
// PostcopyPrepare, PostcopyResume), with the checks of hostile_client_test.cc:
// a refusal that names the problem, the receiver serving on, and the
// session's outcome recorded where there was one.
#include "hostile_client.h"

namespace pmlmig::transport::hostile {
namespace {

// A PostcopyPrepare of gpa 0..15, answered.
void Prepare(ControlCall& control) {
  proto::ControlRequest req;
  proto::PageRun* r = req.mutable_prepare()->add_stale();
  r->set_gpa(0);
  r->set_pages(16);
  ASSERT_TRUE(control.Send(req));
  proto::ControlReply rep;
  ASSERT_TRUE(control.Read(&rep));
  EXPECT_TRUE(rep.has_prepared());
}

// After a PostcopyPrepare the pages it named may be holes: a batch would
// write them behind post-copy's back, and is refused.
TEST_F(HostileClientTest, BatchAfterPostcopyPrepareIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session);
  Prepare(*control);
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_FALSE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
  EXPECT_EQ(acked, 0);
  const std::string what = "stream 0: batch 0 after PostcopyPrepare";
  ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
}

// A Final that does not switch to post-copy after a PostcopyPrepare would
// resume a VM whose prepared pages read as zero.
TEST_F(HostileClientTest, FinalWithoutPostcopyAfterPrepareIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session);
  Prepare(*control);
  proto::ControlRequest req;
  req.mutable_final()->add_streams()->set_stream(0);
  ASSERT_TRUE(control->Send(req));
  const std::string what = "Final without post-copy after PostcopyPrepare";
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  EXPECT_EQ(probe_->finals, 0);
  ExpectServing();
}

TEST_F(HostileClientTest, PostcopyPrepareOfAnEmptyRunIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session);
  proto::ControlRequest req;
  proto::PageRun* r = req.mutable_prepare()->add_stale();
  r->set_gpa(0);
  r->set_pages(0);
  ASSERT_TRUE(control->Send(req));
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, "PostcopyPrepare: a run of 0 pages");
  ExpectFailedOutcome(session, "a run of 0 pages");
  ExpectServing();
}

// A PostcopyResume needs a session in post-copy here: for any other it says
// why and changes nothing.
TEST_F(HostileClientTest, PostcopyResumeOfNoSuchSessionIsRefused) {
  {
    ControlCall call(stub_.get());
    proto::ControlRequest req;
    req.mutable_resume()->set_version(kProtocolVersion);
    req.mutable_resume()->set_session_id(0x1234);
    ASSERT_TRUE(call.Send(req));
    ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT,
                 "PostcopyResume: no session 0x1234 here; nothing to resume");
  }
  {
    ControlCall call(stub_.get());
    proto::ControlRequest req;
    req.mutable_resume()->set_version(kProtocolVersion + 1);
    req.mutable_resume()->set_session_id(0x1234);
    ASSERT_TRUE(call.Send(req));
    ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "PostcopyResume: protocol version 3");
  }
  // A session in pre-copy is not resumed either (and goes on).
  uint64_t session = 0;
  auto control = Session(&session);
  {
    ControlCall call(stub_.get());
    proto::ControlRequest req;
    req.mutable_resume()->set_version(kProtocolVersion);
    req.mutable_resume()->set_session_id(session);
    ASSERT_TRUE(call.Send(req));
    ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "is not in post-copy");
  }
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_TRUE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
  EXPECT_EQ(acked, 1);
  control->Cancel();
  (void)control->Finish();
  ExpectFailedOutcome(session, "control stream closed");
  ExpectServing();
}

}  // namespace
}  // namespace pmlmig::transport::hostile
