#include "postcopy_client.h"

#include <algorithm>
#include <cstdio>
#include <thread>

#include "migration.grpc.pb.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "push_window.h"

namespace pmlmig::transport {
namespace {

// PostcopyDone may take as long as the whole memory takes over the link;
// a dead peer fails the calls long before (keepalive).
constexpr std::chrono::hours kPostcopyWait{24};
// 64 KiB: half a millisecond at 1 Gbit/s, the least an answer may wait
// behind at a bottleneck (docs/BENCHMARKS.md, "Post-copy": 32 pages gave a
// higher p50 at the same window target).
constexpr uint32_t kPushBatchPages = 16;

std::string SessionHex(uint64_t id) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(id));
  return buf;
}

void AddStats(engine::TransferStats& t, const proto::PageBatch& b) {
  uint64_t pages = 0;
  for (const proto::PageRun& r : b.runs()) pages += r.pages();
  const uint64_t data = b.uncompressed_length() >> engine::kPageShift;
  t.pages += pages;
  t.normal_pages += data;
  t.zero_pages += pages - data;
  t.payload_bytes += b.uncompressed_length();
  t.wire_bytes += b.ByteSizeLong();
  ++t.batches;
}

// One link after a resume: calls of its own, cancelled together, and its
// own control call.
struct PostcopyLink {
  PostcopyLink(const GrpcSinkOptions& o, TokenBucket* bucket) : calls(o.security), control(calls, o.target) {
    calls.AddWaker([this, bucket] {
      if (bucket != nullptr) bucket->Wake();
      control.Wake();
    });
  }
  ~PostcopyLink() {
    calls.Fail(Aborted("post-copy link closed"), true);
    control.Join();
  }
  SinkCalls calls;
  ControlClient control;
};

// Serves post-copy on one link until the target's PostcopyDone (*result
// then holds its figures) or the link's first failure. Either way the
// source's own counters in *result grow by what this link carried.
Status RunLink(const GrpcSinkOptions& o, SinkCalls& calls, ControlClient& control, const engine::SlotTable& source,
               const PostcopyCallOptions& p, engine::PostcopyBacklog& backlog, engine::PostcopyResult& result);

// Opens `link` and resumes session p.session_id on it: the pages the target
// still lacks (or that it completed already). *definitive: the target
// cannot resume (its port refuses connections, or it says the session is
// over), so trying again is pointless.
struct Resumed {
  bool completed = false;
  std::vector<engine::PageRun> missing;
};
Result<Resumed> Resume(const GrpcSinkOptions& o, PostcopyLink& link, const engine::SlotTable& source,
                       const PostcopyCallOptions& p, bool* definitive) {
  *definitive = false;
  std::shared_ptr<grpc::Channel> channel = MakeChannel(o, 0);
  bool refused = false;
  if (Status c = WaitConnected(o, *channel, "post-copy resume", &refused); !c.ok()) {
    if (refused) {
      *definitive = true;
      return c.WithContext("the target's process is gone (nothing listens on its port any more)");
    }
    return c;
  }
  link.control.Start(channel);
  proto::ControlRequest req;
  proto::PostcopyResume* pr = req.mutable_resume();
  pr->set_version(kProtocolVersion);
  pr->set_session_id(p.session_id);
  pr->set_sender(o.sender_name);
  if (!link.control.Write(req)) return link.control.End(o.connect_timeout, "PostcopyResume");
  Resumed out;
  for (bool more = true; more;) {
    Result<proto::ControlReply> r = link.control.WaitReply(o.setup_timeout, "waiting for PostcopyResumed");
    if (!r.ok()) {
      // The receiver answered, and not with a resume: it says why.
      *definitive = r.status().code() == Code::kInvalidArgument;
      return r.status();
    }
    if (!r->has_resumed()) return InvalidArgument("post-copy resume: the target answered with something else");
    const proto::PostcopyResumed& m = r->resumed();
    if (m.completed()) {
      out.completed = true;
      return out;
    }
    for (const proto::PageRun& run : m.missing()) {
      if ((run.gpa() & (engine::kPageSize - 1)) != 0 || run.pages() == 0 ||
          source.HostAddress(run.gpa(), uint64_t{run.pages()} << engine::kPageShift) == nullptr) {
        *definitive = true;
        return InvalidArgument("post-copy resume: the target lacks gpa " + FormatHex(run.gpa()) + " (+" +
                               std::to_string(run.pages()) + " pages), which is not guest memory here");
      }
      out.missing.push_back({run.gpa(), run.pages()});
    }
    more = m.more();
  }
  return out;
}

}  // namespace

Status ServePostcopy(const GrpcSinkOptions& o, SinkCalls& calls, ControlClient& control,
                     const engine::SlotTable& source, const PostcopyCallOptions& p, engine::PostcopyBacklog& backlog,
                     engine::PostcopyResult& result) {
  using Clock = std::chrono::steady_clock;
  Status broke = RunLink(o, calls, control, source, p, backlog, result);
  if (broke.ok()) return Status::Ok();
  calls.Fail(broke);  // the first link is over: every call of it ends
  const bool recover = p.recover && o.postcopy_recovery.count() > 0;
  // The link of the latest try. Replacing it ends the previous one: its
  // calls are over by then (RunLink joins its threads, the destructor the
  // control call's reader).
  std::unique_ptr<PostcopyLink> link;
  while (recover && broke.code() == Code::kUnavailable) {
    // The target's VM runs on; its vCPUs wait for missing pages. Try to
    // reach it again until the window closes.
    const auto down = Clock::now();
    const auto deadline = down + o.postcopy_recovery;
    backlog.SetLinkDown(true);
    Status last;
    Result<Resumed> resumed = Unavailable("not tried");
    for (;;) {
      link.reset();
      link = std::make_unique<PostcopyLink>(o, p.bucket);
      bool definitive = false;
      resumed = Resume(o, *link, source, p, &definitive);
      if (resumed.ok()) break;
      last = resumed.status();
      if (definitive) {
        return last.WithContext("post-copy could not be resumed after the link broke (" + broke.message() + ")");
      }
      if (Clock::now() + std::chrono::seconds(1) >= deadline) {
        return Unavailable("post-copy: the link to the target broke (" + broke.message() +
                           ") and could not be resumed within " + SecondsText(o.postcopy_recovery) +
                           "; last try: " + last.message());
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    result.link_down_ms += std::chrono::duration<double, std::milli>(Clock::now() - down).count();
    ++result.recoveries;
    backlog.SetLinkDown(false);
    if (resumed->completed) {
      // Every page reached the target; its PostcopyDone was lost with the
      // link, and with it the target's figures and digests.
      result.done_lost = true;
      return Status::Ok();
    }
    backlog.Reset(resumed->missing);
    broke = RunLink(o, link->calls, link->control, source, p, backlog, result);
    if (broke.ok()) return Status::Ok();
    link->calls.Fail(broke);
  }
  return broke;
}

namespace {

Status RunLink(const GrpcSinkOptions& o, SinkCalls& calls, ControlClient& control, const engine::SlotTable& source,
               const PostcopyCallOptions& p, engine::PostcopyBacklog& backlog, engine::PostcopyResult& result) {
  using Call = grpc::ClientReaderWriter<proto::PageBatch, proto::PostcopyRequest>;
  std::vector<std::unique_ptr<proto::Migration::Stub>> stubs;  // outlive their calls
  auto open = [&](int connection, const char* role, grpc::ClientContext** ctx) {
    stubs.push_back(proto::Migration::NewStub(MakeChannel(o, connection)));
    proto::Migration::Stub* stub = stubs.back().get();
    *ctx = calls.NewContext();
    (*ctx)->AddMetadata("pmlmig-session", SessionHex(p.session_id));
    (*ctx)->AddMetadata("pmlmig-postcopy", role);
    if (p.push_acks) (*ctx)->AddMetadata("pmlmig-push-acks", "1");  // this side reads them
    return std::unique_ptr<Call>(stub->Postcopy(*ctx).release());
  };
  grpc::ClientContext* rctx = nullptr;
  grpc::ClientContext* pctx = nullptr;
  // Connections 3000 and 3001: neither shares a connection with the
  // control call (0) or the data streams (1..64).
  std::unique_ptr<Call> requests = open(3000, "requests", &rctx);
  std::unique_ptr<Call> push = open(3001, "push", &pctx);
  grpc::Status requests_status, push_status;  // each written by its thread, read after the joins

  // Requests: each answered at once with its page.
  std::thread answering([&] {
    (void)SetThreadNice(-10);  // a vCPU on the target waits for each answer
    BatchBuilder builder(Compression::kNone);
    builder.set_checksum(p.checksum);
    proto::PostcopyRequest req;
    proto::PageBatch batch;
    uint64_t sequence = 0;
    while (requests->Read(&req)) {
      if (req.latency_p99_ms() > 0) backlog.SetTargetLatency(req.latency_p50_ms(), req.latency_p99_ms());
      for (uint64_t gpa : req.gpa()) {
        if ((gpa & (engine::kPageSize - 1)) != 0 || source.HostAddress(gpa, engine::kPageSize) == nullptr) {
          calls.Fail(InvalidArgument("post-copy: the target asked for gpa " + FormatHex(gpa) +
                                     ", which is not a page of guest memory"));
          requests_status = requests->Finish();
          return;
        }
        (void)backlog.Claim(gpa);  // the push goes on from here
        if (Status s = builder.Build(source, gpa, 1, BatchHeader{p.session_id, 0, p.round, sequence}, &batch);
            !s.ok()) {
          calls.Fail(s.WithContext("post-copy request"));
          requests_status = requests->Finish();
          return;
        }
        if (!requests->Write(batch)) break;
        ++sequence;
        ++result.requests_served;
        AddStats(result.answered, batch);
      }
    }
    // The call ended: at the end (the target ends both calls once it holds
    // every page, maybe before its PostcopyDone is read here) or because it
    // broke, which the target also reports on the control call (it fails
    // the migration). Either way the control call has the verdict.
    requests_status = requests->Finish();
  });

  // The background push, in batches of at most kPushBatchPages, within the
  // window when the receiver acknowledges them.
  const uint32_t push_batch = std::min<uint32_t>(o.batch_pages, kPushBatchPages);
  PushWindow window;
  std::thread acks;
  if (p.push_acks) {
    acks = std::thread([&] {
      proto::PostcopyRequest ack;
      while (push->Read(&ack)) window.Acked(ack.push_placed(), PushWindow::Clock::now());
      window.Close();  // the call is over: a push waiting for room stops
    });
  }
  std::thread pushing([&] {
    BatchBuilder builder(o.compress, o.zstd_level);
    builder.set_checksum(p.checksum);
    std::unique_ptr<uint8_t[]> buf(new uint8_t[uint64_t{o.batch_pages} << engine::kPageShift]);
    std::vector<engine::PageRun> runs;
    proto::PageBatch batch;
    uint64_t sequence = 0;
    bool broke = false;
    while (!calls.stop().load(std::memory_order_relaxed)) {
      runs.clear();
      uint64_t gathered = 0;
      engine::PageRun r;
      while (gathered < push_batch && backlog.Next(push_batch - gathered, &r)) {
        runs.push_back(r);
        gathered += r.pages;
      }
      if (runs.empty()) break;
      size_t len = 0;
      if (Status s = builder.Build(source, runs, BatchHeader{p.session_id, 1, p.round, sequence}, &batch, buf.get(), &len);
          !s.ok()) {
        calls.Fail(s.WithContext("post-copy push"));
        return;
      }
      batch.set_payload(buf.get(), len);
      const uint64_t bytes = batch.ByteSizeLong();
      if (p.bucket != nullptr && !p.bucket->Acquire(bytes, calls.stop())) break;
      if (p.push_acks) {
        if (!window.WaitToSend(bytes, calls.stop())) break;
        window.Sent(bytes, PushWindow::Clock::now());
      }
      if (!push->Write(batch)) {
        broke = true;
        break;
      }
      ++sequence;
      AddStats(result.pushed, batch);
      FailPoint("source.postcopy");
    }
    if (!broke) push->WritesDone();
  });

  auto done = control.WaitReply(kPostcopyWait, "waiting for the target to hold every page");
  rctx->TryCancel();  // both calls are over once the target holds every page
  pctx->TryCancel();
  answering.join();
  pushing.join();
  if (acks.joinable()) acks.join();
  push_status = push->Finish();  // as the requests call: the control call has the verdict
  if (!done.ok()) {
    // The control call's error is the target's reason; a call's own status
    // adds where it broke.
    Status s = done.status();
    for (const auto& [st, what] : {std::pair{&requests_status, "requests"}, std::pair{&push_status, "push"}}) {
      if (!st->ok() && st->error_code() != grpc::StatusCode::CANCELLED &&
          st->error_code() != grpc::StatusCode::UNAVAILABLE) {
        s = s.WithContext(std::string("post-copy ") + what + " call: " + st->error_message());
      }
    }
    return s;
  }
  if (!done->has_postcopy_done()) return InvalidArgument("post-copy: the target answered with something else");
  // Counters of the target's whole post-copy (every link).

  const proto::PostcopyDone& d = done->postcopy_done();
  result.needed_pages = d.needed_pages();
  result.faults = d.faults();
  result.requested_pages = d.requested_pages();
  result.background_pages = d.background_pages();
  result.duplicate_pages = d.duplicate_pages();
  result.zero_faults = d.zero_faults();
  result.latency_p50_ms = d.latency_p50_ms();
  result.latency_p99_ms = d.latency_p99_ms();
  result.latency_max_ms = d.latency_max_ms();
  result.duration_ms = d.duration_ms();
  result.chunk_digests.assign(d.chunk_digests().begin(), d.chunk_digests().end());
  result.chunk_bytes = d.chunk_bytes();
  control.Close(o.abort_grace);
  return Status::Ok();
}

}  // namespace

}  // namespace pmlmig::transport
