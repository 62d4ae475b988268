// Hostile input to the receiver: a raw gRPC client speaks (and breaks) the
// protocol of proto/migration.proto against a MigrationServer on loopback
// whose fake target's guest memory is two plain mappings (slot 0: 4 MiB at
// gpa 0, slot 1: 1 MiB at gpa 4 GiB).
//
// Every case checks three things:
//   1. the call fails with the expected status code and a message that
//      names the problem (and the batch/stream/gpa where there is one);
//   2. the receiver keeps serving: afterwards a valid Hello + Setup +
//      batches + acks on the same server succeeds (ExpectServing, which
//      then aborts that migration: nothing here depends on what the
//      protocol does after Final);
//   3. where a session existed, WaitForMigration records it as failed,
//      with the reason; where none did, nothing is recorded (the next
//      outcome is ExpectServing's own).
//
// Page batches travel through a generic (ByteBuffer) Pages call so that the
#include "hostile_client.h"

namespace pmlmig::transport::hostile {
namespace {

// ------------------------------------------------------------- control

TEST_F(HostileClientTest, ReceiverServesBeforeAnyHostileInput) { ExpectServing(); }

TEST_F(HostileClientTest, AnotherProtocolVersionIsRefused) {
  for (uint32_t v : {kProtocolVersion + 1, kProtocolVersion - 1, 0xffffffffu}) {
    SCOPED_TRACE(v);
    ControlCall call(stub_.get());
    EXPECT_EQ(call.Hello(v), 0u) << "a Hello with version " << v << " was answered";
    ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT,
                 "Hello: protocol version " + std::to_string(v) + " is not supported (this receiver speaks version " +
                     std::to_string(kProtocolVersion) + ")");
    ExpectServing();  // no session existed: no outcome recorded
  }
}

TEST_F(HostileClientTest, DuplicatedHelloFailsTheMigration) {
  proto::ControlRequest hello;
  hello.mutable_hello()->set_version(kProtocolVersion);
  ExpectControlRefused(false, hello, grpc::StatusCode::INVALID_ARGUMENT, "expected Setup, got Hello");
  ExpectControlRefused(true, hello, grpc::StatusCode::INVALID_ARGUMENT, "expected Final, got Hello");
  EXPECT_EQ(probe_->finals, 0);
}

TEST_F(HostileClientTest, SetupTwiceFailsTheMigration) {
  ExpectControlRefused(true, ValidSetup(), grpc::StatusCode::INVALID_ARGUMENT, "expected Final, got Setup");
}

TEST_F(HostileClientTest, FinalBeforeSetupFailsTheMigration) {
  proto::ControlRequest final_req;
  final_req.mutable_final()->add_streams()->set_stream(0);
  ExpectControlRefused(false, final_req, grpc::StatusCode::INVALID_ARGUMENT, "expected Setup, got Final");
  // Before Hello there is no session, so nothing is recorded.
  ControlCall call(stub_.get());
  call.Send(final_req);
  ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "expected Hello first, got Final");
  ExpectServing();
  EXPECT_EQ(probe_->setups, 2);  // ExpectServing's own
  EXPECT_EQ(probe_->finals, 0);
}

TEST_F(HostileClientTest, BatchBeforeSetupFailsTheMigration) {
  ControlCall control(stub_.get());
  const uint64_t session = control.Hello();
  ASSERT_NE(session, 0u);
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_FALSE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
  EXPECT_EQ(acked, 0);
  const std::string what = "stream 0: batch before the migration is set up";
  ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectStatus(control.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
}

TEST_F(HostileClientTest, FinalWithNoBatchesWhenBatchesWereDeclared) {
  proto::ControlRequest req;
  proto::StreamTotals* t = req.mutable_final()->add_streams();
  t->set_stream(0);
  t->set_batches(2);
  t->set_pages(32);
  ExpectControlRefused(true, req, grpc::StatusCode::DATA_LOSS,
                       "Final: stream 0: source declares 2 batches (32 pages) for stream 0, receiver applied 0 (0 "
                       "pages)");

  // Two streams, the second declared but silent.
  uint64_t session = 0;
  auto control = Session(&session, 2);
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_TRUE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
  EXPECT_TRUE(pages.Finish().ok());
  proto::ControlRequest two;
  t = two.mutable_final()->add_streams();
  t->set_stream(0);
  t->set_batches(1);
  t->set_pages(16);
  t = two.mutable_final()->add_streams();
  t->set_stream(1);
  t->set_batches(1);
  t->set_pages(16);
  control->Send(two);
  const std::string what = "stream 1: source declares 1 batches (16 pages) for stream 1, receiver applied 0 (0 pages)";
  ExpectStatus(control->Finish(), grpc::StatusCode::DATA_LOSS, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
  EXPECT_EQ(probe_->finals, 0);
}

TEST_F(HostileClientTest, FinalTotalsNotMatchingWhatWasApplied) {
  struct Case {
    uint64_t batches, pages;
    std::string what;
  };
  // Two batches of 16 pages are applied; the Final says otherwise.
  const std::vector<Case> cases = {
      {3, 48, "source declares 3 batches (48 pages) for stream 0, receiver applied 2 (32 pages)"},
      {1, 16, "source declares 1 batches (16 pages) for stream 0, receiver applied 2 (32 pages)"},
      {2, 31, "source declares 2 batches (31 pages) for stream 0, receiver applied 2 (32 pages)"},
      {2, 33, "source declares 2 batches (33 pages) for stream 0, receiver applied 2 (32 pages)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    uint64_t session = 0;
    auto control = Session(&session);
    PagesCall pages(channel_.get());
    int acked = 0;
    ASSERT_TRUE(pages.SendAll({Wire(Batch(session, 0)), Wire(Batch(session, 1, 16 * kPageSize))}, &acked));
    ASSERT_TRUE(pages.Finish().ok());
    proto::ControlRequest req;
    proto::StreamTotals* t = req.mutable_final()->add_streams();
    t->set_stream(0);
    t->set_batches(c.batches);
    t->set_pages(c.pages);
    control->Send(req);
    ExpectStatus(control->Finish(), grpc::StatusCode::DATA_LOSS, "Final: stream 0: " + c.what);
    ExpectFailedOutcome(session, c.what);
    ExpectServing();
  }
  // Totals of the wrong shape: for more streams than there are, or out of order.
  proto::ControlRequest req;
  req.mutable_final()->add_streams()->set_stream(0);
  req.mutable_final()->add_streams()->set_stream(1);
  ExpectControlRefused(true, req, grpc::StatusCode::INVALID_ARGUMENT, "Final: totals for 2 streams, the migration has 1");
  req.mutable_final()->clear_streams();
  req.mutable_final()->add_streams()->set_stream(5);
  ExpectControlRefused(true, req, grpc::StatusCode::INVALID_ARGUMENT, "Final: totals[0] name stream 5");
  req.mutable_final()->clear_streams();
  ExpectControlRefused(true, req, grpc::StatusCode::INVALID_ARGUMENT, "Final: totals for 0 streams, the migration has 1");
  EXPECT_EQ(probe_->finals, 0);
}

TEST_F(HostileClientTest, EmptyControlRequestIsRefused) {
  const proto::ControlRequest empty;
  {
    ControlCall call(stub_.get());
    call.Send(empty);
    ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "expected Hello first, got an empty message");
    ExpectServing();
  }
  ExpectControlRefused(false, empty, grpc::StatusCode::INVALID_ARGUMENT, "expected Setup, got an empty message");
  ExpectControlRefused(true, empty, grpc::StatusCode::INVALID_ARGUMENT, "expected Final, got an empty message");
}

TEST_F(HostileClientTest, AbsurdSetupsAreRefused) {
  struct Case {
    std::function<void(proto::Setup*)> edit;
    grpc::StatusCode code;
    std::string what;
  };
  const std::vector<Case> cases = {
      {[](proto::Setup* s) {
         s->clear_memory();
         proto::MemoryRange* m = s->add_memory();
         m->set_gpa(0);
         m->set_size(1ull << 60);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "Setup.memory: more than the 1 GiB of guest memory this receiver accepts"},
      {[](proto::Setup* s) {
         // Two ranges whose sizes wrap the 64-bit total.
         s->clear_memory();
         proto::MemoryRange* m = s->add_memory();
         m->set_slot(0);
         m->set_gpa(0);
         m->set_size(1ull << 63);
         m = s->add_memory();
         m->set_slot(1);
         m->set_gpa(1ull << 63);
         m->set_size((1ull << 63) - kPageSize);
       },
       grpc::StatusCode::RESOURCE_EXHAUSTED, "of guest memory this receiver accepts"},
      {[](proto::Setup* s) {
         s->clear_memory();
         for (uint32_t i = 0; i < 100000; ++i) {
           proto::MemoryRange* m = s->add_memory();
           m->set_slot(i);
           m->set_gpa(uint64_t{i} * kPageSize);
           m->set_size(kPageSize);
         }
       },
       grpc::StatusCode::INVALID_ARGUMENT, "Setup.memory: 100000 ranges, expected 1..256"},
      {[](proto::Setup* s) { s->clear_memory(); }, grpc::StatusCode::INVALID_ARGUMENT,
       "Setup.memory: 0 ranges, expected 1..256"},
      {[](proto::Setup* s) { s->mutable_memory(1)->set_gpa((~0ull) << 12); }, grpc::StatusCode::INVALID_ARGUMENT,
       "overflows the address space"},
      {[](proto::Setup* s) { s->mutable_memory(1)->set_slot(0); }, grpc::StatusCode::INVALID_ARGUMENT,
       "slot id used twice"},
      {[](proto::Setup* s) { s->set_vcpus(0); }, grpc::StatusCode::INVALID_ARGUMENT,
       "Setup.vcpus: 0 is outside 1..1024"},
      {[](proto::Setup* s) { s->set_vcpus(1000000); }, grpc::StatusCode::INVALID_ARGUMENT,
       "Setup.vcpus: 1000000 is outside 1..1024"},
      {[](proto::Setup* s) { s->set_streams(0); }, grpc::StatusCode::INVALID_ARGUMENT,
       "Setup.streams: 0 is outside 1..64"},
      {[](proto::Setup* s) { s->set_streams(1000); }, grpc::StatusCode::INVALID_ARGUMENT,
       "Setup.streams: 1000 is outside 1..64"},
      {[](proto::Setup* s) { s->set_vm_description(std::string((1u << 20) + 1, 'x')); },
       grpc::StatusCode::INVALID_ARGUMENT, "Setup.vm_description: 1048577 bytes, more than 1048576"},
  };
  for (const Case& c : cases) {
    proto::ControlRequest req = ValidSetup();
    c.edit(req.mutable_setup());
    ExpectControlRefused(false, req, c.code, c.what);
  }
  EXPECT_EQ(probe_->setups, static_cast<int>(cases.size()));  // ExpectServing's own, no others
}

TEST_F(HostileClientTest, VmStateOver8MiBIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session);
  PagesCall pages(channel_.get());
  int acked = 0;
  ASSERT_TRUE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
  ASSERT_TRUE(pages.Finish().ok());
  proto::ControlRequest req;
  req.mutable_final()->set_vm_state(std::string(9u << 20, 's'));
  proto::StreamTotals* t = req.mutable_final()->add_streams();
  t->set_stream(0);
  t->set_batches(1);
  t->set_pages(16);
  control->Send(req);
  const std::string what = "Final.vm_state: 9437184 bytes, more than 8388608";
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
  EXPECT_EQ(probe_->finals, 0);
}

// ------------------------------------------------------------- where pages go

TEST_F(HostileClientTest, GpaBeyondGuestMemoryIsRefused) {
  for (uint64_t gpa : {uint64_t{0x1234000}, kHighGpa + kHighBytes, kHighGpa - kPageSize, ~uint64_t{0xfff},
                       uint64_t{1} << 63}) {
    for (int good : {0, 1}) {
      ExpectBatchRefused(
          good,
          [&](uint64_t session, uint64_t seq) {
            proto::PageBatch b = Batch(session, seq, 32 * kPageSize);  // 16 compressible pages
            b.mutable_runs(0)->set_gpa(gpa);
            Reseal(&b);
            return Wire(b);
          },
          grpc::StatusCode::INVALID_ARGUMENT,
          "stream 0: batch " + std::to_string(good) + ": run 0: gpa " + FormatHex(gpa) + " (+16 pages) lies outside guest memory");
    }
  }
}

TEST_F(HostileClientTest, BatchAfterItsSessionFailedNamesTheCause) {
  // One call's batch fails the session; a batch that comes later naming the
  // same session (another stream's first, in a real sender) is refused with
  // that cause, so whichever refusal reaches the sender first tells it why.
  uint64_t session = 0;
  auto control = Session(&session);
  proto::PageBatch bad = Batch(session, 0, 32 * kPageSize);
  bad.mutable_runs(0)->set_gpa(0x1234000);
  Reseal(&bad);
  const std::string cause = "stream 0: batch 0: run 0: gpa 0x1234000 (+16 pages) lies outside guest memory";
  {
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_FALSE(pages.SendAll({Wire(bad)}, &acked));
    ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT, cause);
  }
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, cause);
  ExpectFailedOutcome(session, cause);
  PagesCall late(channel_.get());
  int acked = 0;
  EXPECT_FALSE(late.SendAll({Wire(Batch(session, 0))}, &acked));
  EXPECT_EQ(acked, 0);
  ExpectStatus(late.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "stream 0: the migration had already ended: " + cause);
  ExpectServing();
}

TEST_F(HostileClientTest, RunStraddlingASlotEndIsRefused) {
  for (auto [gpa, slot] : {std::pair{kLowBytes - 8 * kPageSize, 0}, std::pair{kHighGpa + kHighBytes - kPageSize, 1}}) {
    ExpectBatchRefused(
        1,
        [&](uint64_t session, uint64_t seq) {
          proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
          b.mutable_runs(0)->set_gpa(gpa);
          Reseal(&b);
          return Wire(b);
        },
        grpc::StatusCode::INVALID_ARGUMENT,
        "stream 0: batch 1: run 0: gpa " + FormatHex(gpa) + " (+16 pages) straddles the end of slot " + std::to_string(slot));
  }
  // A second run that straddles, after a valid first one.
  ExpectBatchRefused(
      0,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 32);  // zero run, then data run
        EXPECT_EQ(b.runs_size(), 2);
        b.mutable_runs(1)->set_gpa(kLowBytes - kPageSize);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "run 1: gpa " + FormatHex(kLowBytes - kPageSize) + " (+16 pages) straddles the end of slot 0");
}

TEST_F(HostileClientTest, UnalignedGpaIsRefused) {
  for (uint64_t gpa : {uint64_t{0x1001}, uint64_t{0x800}, kHighGpa + 1}) {
    ExpectBatchRefused(
        1,
        [&](uint64_t session, uint64_t seq) {
          proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
          b.mutable_runs(0)->set_gpa(gpa);
          Reseal(&b);
          return Wire(b);
        },
        grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 1: run 0: gpa " + FormatHex(gpa) + " is not page aligned");
  }
}

// ------------------------------------------------------------- page counts

TEST_F(HostileClientTest, PageCountNotMatchingUncompressedLengthIsRefused) {
  // One more page in the run than in the payload.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
        b.mutable_runs(0)->set_pages(17);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: uncompressed_length 65536 does not match 17 data pages (69632 bytes)");
  // uncompressed_length one page short.
  ExpectBatchRefused(
      0,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
        b.set_uncompressed_length(15 * kPageSize);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 0: uncompressed_length 61440 does not match 16 data pages (65536 bytes)");
  // Runs and length agree, the payload is a page short.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
        b.mutable_payload()->resize(15 * kPageSize);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: payload is 61440 bytes, expected 65536 (uncompressed)");
  // A zero run whose pages were sent as data anyway.
  ExpectBatchRefused(
      0,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        EXPECT_EQ(b.runs(0).flags(), proto::PAGE_RUN_ZERO);
        b.set_payload(std::string(16 * kPageSize, '\0'));
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 0: payload is 65536 bytes, expected 0 (uncompressed)");
  // A run of 0 pages, and a batch with no runs at all.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        b.mutable_runs(0)->set_pages(0);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: run 0: 0 pages");
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        b.clear_runs();
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: no pages");
}

TEST_F(HostileClientTest, OversizedBatchIsRefused) {
  // 1025 zero pages in two runs.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        b.mutable_runs(0)->set_gpa(0);
        b.mutable_runs(0)->set_pages(1024);
        proto::PageRun* r = b.add_runs();
        r->set_gpa(kHighGpa);
        r->set_pages(1);
        r->set_flags(proto::PAGE_RUN_ZERO);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: more than 1024 pages (oversized batch)");
  // 1025 runs of one zero page each.
  ExpectBatchRefused(
      0,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        b.clear_runs();
        for (uint64_t p = 0; p < 1025; ++p) {
          proto::PageRun* r = b.add_runs();
          r->set_gpa(p < 1024 ? p * kPageSize : kHighGpa);
          r->set_pages(1);
          r->set_flags(proto::PAGE_RUN_ZERO);
        }
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 0: 1025 runs, more than the 1024 pages a batch may hold");
  // One run of 2^32-1 pages (whose byte length overflows 32 bits).
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 16 * kPageSize, 16);
        b.mutable_runs(0)->set_pages(0xffffffffu);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: more than 1024 pages (oversized batch)");
  // 1025 data pages: the payload alone is over the 4 MiB a batch may carry.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) { return PayloadOver4MiB(session, seq); },
      grpc::StatusCode::INVALID_ARGUMENT, "malformed PageBatch at byte 45: payload of 4198400 bytes, more than 4194304");
  // A header field over 1 MiB (an unknown field: protobuf would keep it).
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        std::string w = Wire(Batch(session, seq, 16 * kPageSize));
        std::string big = std::string("\x72", 1);  // field 14, length-delimited
        const uint64_t len = (1u << 20) + 1;
        for (uint64_t v = len; v != 0; v >>= 7) big.push_back(static_cast<char>((v & 0x7f) | (v >= 0x80 ? 0x80 : 0)));
        big.append(len, 'h');
        return big + w;
      },
      grpc::StatusCode::INVALID_ARGUMENT, "malformed PageBatch at byte 4: field of 1048577 bytes");
}

TEST_F(HostileClientTest, MessageOverTheGrpcLimitIsRefused) {
  const std::string huge((kMaxMessageBytes) + (1 << 20), '\x01');
  // As the first message of a call, before it names a session: refused by
  // gRPC itself; the migration in progress goes on.
  uint64_t session = 0;
  auto control = Session(&session);
  {
    PagesCall pages(channel_.get());
    pages.Send(huge);
    ExpectStatus(pages.Finish(), grpc::StatusCode::RESOURCE_EXHAUSTED, "larger than max");
  }
  {
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_TRUE(pages.SendAll({Wire(Batch(session, 0))}, &acked));
    EXPECT_TRUE(pages.Finish().ok());
  }
  proto::ControlRequest abort;
  abort.mutable_abort()->set_reason("next case");
  control->Send(abort);
  ExpectStatus(control->Finish(), grpc::StatusCode::ABORTED, "next case");
  auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->session_id, session);
  EXPECT_EQ(out->outcome, engine::Outcome::kCancelled);
  EXPECT_EQ(out->totals.batches, 1u);
  ExpectServing();

  // On a call attached to a stream: the stream breaks, which fails the
  // migration.
  control = Session(&session);
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_FALSE(pages.SendAll({Wire(Batch(session, 0)), huge}, &acked));
  EXPECT_EQ(acked, 1);
  ExpectStatus(pages.Finish(), grpc::StatusCode::RESOURCE_EXHAUSTED, "larger than max");
  EXPECT_FALSE(control->Finish().ok());
  ExpectFailedOutcome(session, "stream 0");
  ExpectServing();
}

// ------------------------------------------------------------- sequence

TEST_F(HostileClientTest, DuplicatedBatchIsRefused) {
  ExpectBatchRefused(
      1, [&](uint64_t session, uint64_t) { return Wire(Batch(session, 0, 16 * kPageSize)); },
      grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 0: expected batch 1 (a batch is missing or repeated)");
  ExpectBatchRefused(
      2, [&](uint64_t session, uint64_t) { return Wire(Batch(session, 1, 16 * kPageSize)); },
      grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 1: expected batch 2 (a batch is missing or repeated)");
}

TEST_F(HostileClientTest, MissingBatchIsRefused) {
  ExpectBatchRefused(
      1, [&](uint64_t session, uint64_t) { return Wire(Batch(session, 2, 16 * kPageSize)); },
      grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 2: expected batch 1 (a batch is missing or repeated)");
  ExpectBatchRefused(
      0, [&](uint64_t session, uint64_t) { return Wire(Batch(session, 1)); }, grpc::StatusCode::INVALID_ARGUMENT,
      "stream 0: batch 1: expected batch 0 (a batch is missing or repeated)");
  ExpectBatchRefused(
      1, [&](uint64_t session, uint64_t) { return Wire(Batch(session, ~uint64_t{0})); },
      grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 18446744073709551615: expected batch 1");
}

TEST_F(HostileClientTest, RoundGoingBackIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session);
  PagesCall pages(channel_.get());
  int acked = 0;
  EXPECT_FALSE(pages.SendAll({Wire(Batch(session, 0, 0, 16, Compression::kNone, 0, 3)),
                              Wire(Batch(session, 1, 0, 16, Compression::kNone, 0, 2))},
                             &acked));
  EXPECT_EQ(acked, 1);
  const std::string what = "stream 0: batch 1: round 2 after round 3";
  ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
}

TEST_F(HostileClientTest, StreamIndexOutsideTheSetupIsRefused) {
  for (uint32_t stream : {1u, 64u, 1u << 31, 0xffffffffu}) {
    ExpectBatchRefused(
        0,
        [&](uint64_t session, uint64_t seq) {
          return Wire(Batch(session, seq, 0, 16, Compression::kNone, stream));
        },
        grpc::StatusCode::INVALID_ARGUMENT, "stream " + std::to_string(stream) + ": stream index outside 0..0");
  }
  // A batch naming another stream than the one its call is attached to.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        return Wire(Batch(session, seq, 16 * kPageSize, 16, Compression::kNone, 1u << 31));
      },
      grpc::StatusCode::INVALID_ARGUMENT, "stream 0: batch 1 names session");
}

TEST_F(HostileClientTest, SecondCallOnTheSameStreamIsRefused) {
  uint64_t session = 0;
  auto control = Session(&session, 2);
  PagesCall first(channel_.get());
  int acked = 0;
  ASSERT_TRUE(first.SendAll({Wire(Batch(session, 0))}, &acked));
  PagesCall second(channel_.get());
  acked = 0;
  EXPECT_FALSE(second.SendAll({Wire(Batch(session, 1, 16 * kPageSize))}, &acked));
  EXPECT_EQ(acked, 0);
  const std::string what = "stream 0: already attached to another call";
  ExpectStatus(second.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectStatus(first.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);  // the failed migration ends it too
  ExpectStatus(control->Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
  ExpectFailedOutcome(session, what);
  ExpectServing();
}

// ------------------------------------------------------------- compression

TEST_F(HostileClientTest, GarbageCompressedPayloadsAreRefused) {
  std::string garbage(3000, '\0');
  FillRandom(reinterpret_cast<uint8_t*>(garbage.data()), garbage.size(), 1234);
  for (auto [c, name] : {std::pair{proto::COMPRESSION_LZ4, "lz4"}, std::pair{proto::COMPRESSION_ZSTD, "zstd"}}) {
    ExpectBatchRefused(
        1,
        [&, c = c](uint64_t session, uint64_t seq) {
          proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
          b.set_compression(c);
          b.set_payload(garbage);
          return Wire(b);
        },
        grpc::StatusCode::DATA_LOSS, "stream 0: batch 1: " + std::string(name) + " payload");
  }
}

TEST_F(HostileClientTest, ValidFrameOfTheWrongLengthIsRefused) {
  // Frames of 8 compressible pages, declared as 16 pages of data; and
  // frames of 16 pages declared as 8.
  const uint8_t* data = src_.At(32 * kPageSize);
  auto lz4 = [&](uint64_t len) {
    std::string out(static_cast<size_t>(LZ4_compressBound(static_cast<int>(len))), '\0');
    const int n = LZ4_compress_default(reinterpret_cast<const char*>(data), out.data(), static_cast<int>(len),
                                       static_cast<int>(out.size()));
    EXPECT_GT(n, 0);
    out.resize(static_cast<size_t>(n));
    return out;
  };
  auto zstd = [&](uint64_t len) {
    std::string out(ZSTD_compressBound(len), '\0');
    const size_t n = ZSTD_compress(out.data(), out.size(), data, len, 1);
    EXPECT_FALSE(ZSTD_isError(n));
    out.resize(n);
    return out;
  };
  struct Case {
    proto::Compression c;
    std::string frame;
    uint32_t declared_pages;
    grpc::StatusCode code;
    std::string what;
  };
  const std::vector<Case> cases = {
      {proto::COMPRESSION_LZ4, lz4(8 * kPageSize), 16, grpc::StatusCode::DATA_LOSS,
       "batch 1: lz4 payload decompresses to 32768 bytes, expected 65536"},
      {proto::COMPRESSION_ZSTD, zstd(8 * kPageSize), 16, grpc::StatusCode::DATA_LOSS,
       "batch 1: zstd payload decompresses to 32768 bytes, expected 65536"},
      {proto::COMPRESSION_LZ4, lz4(16 * kPageSize), 8, grpc::StatusCode::DATA_LOSS,
       "batch 1: lz4 payload is corrupt (does not decompress)"},
      {proto::COMPRESSION_ZSTD, zstd(16 * kPageSize), 8, grpc::StatusCode::DATA_LOSS,
       "batch 1: zstd payload is corrupt: Destination buffer is too small"},
  };
  for (const Case& k : cases) {
    ExpectBatchRefused(
        1,
        [&](uint64_t session, uint64_t seq) {
          proto::PageBatch b = Batch(session, seq, 32 * kPageSize, k.declared_pages);
          b.set_compression(k.c);
          b.set_payload(k.frame);
          Reseal(&b, std::string(reinterpret_cast<const char*>(data), k.declared_pages * kPageSize));
          return Wire(b);
        },
        k.code, k.what);
  }
  // A "compressed" payload larger than the data it claims to hold.
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 32 * kPageSize, 1);
        b.set_compression(proto::COMPRESSION_LZ4);
        b.set_payload(std::string(kPageSize + 1, 'p'));
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: lz4 payload of 4097 bytes for 4096 bytes of data");
}

TEST_F(HostileClientTest, UnknownCompressionOrRunFlagIsRefused) {
  for (int c : {3, 7, 0x7fffffff, -1}) {
    ExpectBatchRefused(
        1,
        [&](uint64_t session, uint64_t seq) {
          proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
          b.set_compression(static_cast<proto::Compression>(c));
          Reseal(&b);
          return Wire(b);
        },
        grpc::StatusCode::INVALID_ARGUMENT, "batch 1: unknown compression " + std::to_string(c));
  }
  ExpectBatchRefused(
      1,
      [&](uint64_t session, uint64_t seq) {
        proto::PageBatch b = Batch(session, seq, 32 * kPageSize);
        b.mutable_runs(0)->set_flags(2);
        Reseal(&b);
        return Wire(b);
      },
      grpc::StatusCode::INVALID_ARGUMENT, "batch 1: run 0: unknown flags 0x2");
}

// ------------------------------------------------------------- not protobuf

TEST_F(HostileClientTest, PageBatchThatIsNotProtobufIsRefused) {
  struct Case {
    std::string wire;
    std::string what;
  };
  const std::vector<Case> cases = {
      {std::string(11, '\xff'), "malformed PageBatch at byte 10: truncated field tag"},
      {std::string("\x08\x80", 2), "malformed PageBatch at byte 2: truncated varint"},
      {std::string("\x07\x00", 2), "malformed PageBatch at byte 1: field number 0"},
      {std::string("\x0f\x00", 2), "malformed PageBatch at byte 1: unsupported wire type 7"},
      {std::string("\x7f\x00", 2), "malformed PageBatch at byte 1: payload field with wire type 7"},
      {std::string("\x7a\x00\x7a\x00", 4), "malformed PageBatch at byte 3: payload given twice"},
      {std::string("\x7a\x10" "ab", 4), "malformed PageBatch at byte 4: payload truncated"},
      {std::string("\x09\x01\x02", 3), "malformed PageBatch at byte 3: truncated fixed64"},
      {std::string("\x2a\x02\xff\xff", 4), "malformed PageBatch: its fields do not parse"},
  };
  // On a new call, before any batch names a session: refused, and the
  // migration in progress carries on.
  uint64_t session = 0;
  auto control = Session(&session);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_FALSE(pages.SendAll({c.wire}, &acked));
    ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT, "Pages: " + c.what);
  }
  {
    // Bytes that parse, to a batch naming no session.
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_FALSE(pages.SendAll({std::string()}, &acked));
    ExpectStatus(pages.Finish(), grpc::StatusCode::INVALID_ARGUMENT,
                 "stream 0: batch names session 0x0, which is not the migration in progress");
  }
  {
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_TRUE(pages.SendAll({Wire(Batch(session, 0)), Wire(Batch(session, 1, kHighGpa, 8, Compression::kLz4))},
                              &acked));
    EXPECT_EQ(acked, 2);
    EXPECT_TRUE(pages.Finish().ok());
  }
  proto::ControlRequest abort;
  abort.mutable_abort()->set_reason("next case");
  control->Send(abort);
  ExpectStatus(control->Finish(), grpc::StatusCode::ABORTED, "next case");
  auto out = server_->WaitForMigration(Clock::now() + std::chrono::seconds(20));
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->session_id, session);
  EXPECT_EQ(out->outcome, engine::Outcome::kCancelled);
  EXPECT_EQ(out->totals.batches, 2u);
  ExpectServing();

  // On a call attached to a stream of the session: the migration fails.
  for (const Case& c : cases) {
    ExpectBatchRefused(
        1, [&](uint64_t, uint64_t) { return c.wire; }, grpc::StatusCode::INVALID_ARGUMENT, "stream 0: " + c.what);
  }
}

TEST_F(HostileClientTest, ControlRequestThatIsNotProtobufIsRefused) {
  // gRPC's typed reader takes such bytes for the end of the stream; the
  // receiver must name them instead, whatever phase the session is in.
  const std::vector<std::string> cases = {
      std::string(11, '\xff'),        // a field tag that never ends
      std::string("\x08\x80", 2),     // a truncated varint
      std::string("\x07\x00", 2),     // field number 0
      std::string("\x0f\x00", 2),     // wire type 7
      std::string("\x0a\x05" "ab", 4),  // Hello, 5 bytes long, 2 present
      std::string("\x0a\x02\xff\xff", 4),  // Hello whose own fields do not parse
  };
  for (const std::string& wire : cases) {
    const std::string what =
        "malformed ControlRequest: " + std::to_string(wire.size()) + " bytes that are not a valid protobuf message";
    SCOPED_TRACE(what);
    {
      // Before Hello: no session, so nothing is recorded.
      RawControlCall call(channel_.get());
      call.Send(wire);
      ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
      ExpectServing();
    }
    for (bool after_setup : {false, true}) {
      SCOPED_TRACE(after_setup ? "after Setup" : "after Hello");
      RawControlCall call(channel_.get());
      const uint64_t session = call.Hello();
      ASSERT_NE(session, 0u);
      if (after_setup) {
        ASSERT_TRUE(call.Send(ValidSetup()));
        proto::ControlReply rep;
        ASSERT_TRUE(call.Read(&rep));
        ASSERT_TRUE(rep.has_setup());
      }
      call.Send(wire);
      ExpectStatus(call.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
      ExpectFailedOutcome(session, what);
      ExpectServing();
    }
  }
}

// ------------------------------------------------------------- first cause

TEST_F(HostileClientTest, RefusedNewCallIsTheCauseWhenTheSourceThenLeaves) {
  // A source's new Pages call is refused at its first message, whose bytes
  // do not decode (so it never named the session and does not fail it by
  // itself); the source then drops its other calls, as GrpcMigrationSink
  // does when a stream fails. Whichever of those the receiver notices
  // first, its report names the refusal, not a dropped call.
  const std::string what = "Pages: malformed PageBatch at byte 45: payload of 4198400 bytes, more than 4194304";
  for (int i = 0; i < 6; ++i) {
    const bool control_first = i % 2 == 0;
    SCOPED_TRACE(control_first ? "control call dropped first" : "stream 0 dropped first");
    uint64_t session = 0;
    auto control = Session(&session, 2);
    PagesCall stream0(channel_.get());
    int acked = 0;
    ASSERT_TRUE(stream0.SendAll({Wire(Batch(session, 0))}, &acked));
    {
      PagesCall stream1(channel_.get());
      EXPECT_FALSE(stream1.SendAll({PayloadOver4MiB(session, 0, 1)}, &acked));
      ExpectStatus(stream1.Finish(), grpc::StatusCode::INVALID_ARGUMENT, what);
    }
    if (control_first) {
      control->Cancel();
      stream0.Cancel();
    } else {
      stream0.Cancel();
      control->Cancel();
    }
    EXPECT_FALSE(stream0.Finish().ok());
    EXPECT_FALSE(control->Finish().ok());
    ExpectFailedOutcome(session, what);
    ExpectServing();
  }
}

TEST_F(HostileClientTest, MessageOverTheGrpcLimitIsTheCauseWhicheverCallEndsFirst) {
  // gRPC ends an attached stream whose message is over its limit (the
  // sender reads "larger than max"); the sender then drops its control call
  // at once, as GrpcMigrationSink does. Every time, the report must name the
  // broken stream, not the control call that the receiver sometimes sees
  // closing first.
  const std::string huge(kMaxMessageBytes + (1 << 20), '\x01');
  const std::string what =
      "stream 0 broke (cancelled by the source, connection lost, or a message over the 16 MiB limit)";
  for (int i = 0; i < 20; ++i) {
    SCOPED_TRACE(i);
    uint64_t session = 0;
    auto control = Session(&session);
    PagesCall pages(channel_.get());
    int acked = 0;
    EXPECT_FALSE(pages.SendAll({Wire(Batch(session, 0)), huge}, &acked));
    ExpectStatus(pages.Finish(), grpc::StatusCode::RESOURCE_EXHAUSTED, "larger than max");
    control->Cancel();
    EXPECT_FALSE(control->Finish().ok());
    ExpectFailedOutcome(session, what);
  }
  ExpectServing();
}

}  // namespace
}  // namespace pmlmig::transport::hostile
