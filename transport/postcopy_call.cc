#include "postcopy_call.h"

#include <thread>

#include "grpc_status.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/postcopy.h"
#include "receiver_checks.h"

namespace pmlmig::transport {
namespace {

std::string Metadata(const grpc::ServerContext& ctx, const char* key) {
  const auto& md = ctx.client_metadata();
  auto it = md.find(key);
  return it == md.end() ? std::string() : std::string(it->second.data(), it->second.size());
}

}  // namespace

grpc::Status PostcopyCall::Run() {
  if (Status a = r_.Authorize(*ctx_); !a.ok()) return ToGrpc(a);
  if (Status a = Attach(); !a.ok()) return ToGrpc(a);
  std::thread writer;
  if (requests_) {
    // A vCPU waits at the end of each request: both of its threads run
    // ahead of the guest's busy vCPUs and the push.
    (void)SetThreadNice(-10);
    writer = std::thread([this] {
      (void)SetThreadNice(-10);
      WriteRequests();
    });
  } else if (push_acks_) {
    // The push's window is sized by its round trips: a handler that waits
    // behind the guest's vCPUs for a core makes them look like a queue.
    (void)SetThreadNice(-5);
  }
  Status s = Serve();
  Detach(s);
  if (writer.joinable()) writer.join();
  if (requests_ || push_acks_) (void)SetThreadNice(0);  // gRPC's thread, back as it was
  return ToGrpc(s);
}

Status PostcopyCall::Attach() {
  const std::string role = Metadata(*ctx_, "pmlmig-postcopy");
  const std::string id_text = Metadata(*ctx_, "pmlmig-session");
  if (role != "requests" && role != "push") {
    return InvalidArgument("Postcopy: metadata pmlmig-postcopy is \"" + role + "\", expected requests or push");
  }
  uint64_t id = 0;
  try {
    size_t used = 0;
    id = std::stoull(id_text, &used, 16);
    if (used != id_text.size()) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    return InvalidArgument("Postcopy: metadata pmlmig-session \"" + id_text + "\" is not a hex session id");
  }
  requests_ = role == "requests";
  push_acks_ = !requests_ && Metadata(*ctx_, "pmlmig-push-acks") == "1";
  std::lock_guard lock(r_.mu_);
  if (!r_.current_ || r_.current_->id != id) {
    return InvalidArgument("Postcopy: session " + FormatHex(id) + " is not the migration in progress");
  }
  if (r_.current_->state != SessionState::kPostcopy) {
    return InvalidArgument("Postcopy: session " + FormatHex(id) + " is not in post-copy");
  }
  if (r_.current_->postcopy_paused) {
    return InvalidArgument("Postcopy: session " + FormatHex(id) +
                              " lost its link and waits for a PostcopyResume on a new Control call first");
  }
  bool& attached = requests_ ? r_.current_->requests_attached : r_.current_->push_attached;
  if (attached) return InvalidArgument("Postcopy: a " + role + " call is already open");
  attached = true;
  session_ = r_.current_;
  link_ = session_->postcopy_link;
  session_->postcopy_calls.push_back(ctx_);
  applier_.set_checksum(session_->checksum);
  return Status::Ok();
}

void PostcopyCall::WriteRequests() {
  // The latency so far goes to the source about twice a second (its
  // progress line), with the requests or alone.
  constexpr std::chrono::milliseconds kLatencyEvery{500};
  proto::PostcopyRequest req;
  auto next_latency = Session::Clock::now() + kLatencyEvery;
  for (;;) {
    {
      std::unique_lock lock(r_.mu_);
      auto over = [&] {
        return stop_ || session_->state != SessionState::kPostcopy || session_->postcopy_link != link_ ||
               session_->postcopy_paused;
      };
      r_.cv_.wait_until(lock, next_latency, [&] { return over() || !session_->requests.empty(); });
      if (over()) return;  // requests still queued go out on the next link
      req.Clear();
      for (uint64_t gpa : session_->requests) req.add_gpa(gpa);
      session_->requests.clear();
      if (Session::Clock::now() >= next_latency) {
        next_latency = Session::Clock::now() + kLatencyEvery;
        if (session_->postcopy != nullptr) {
          // Under mu_: the session's PostcopyMemory goes only with the session.
          const engine::PostcopyStats st = session_->postcopy->stats();
          req.set_latency_p50_ms(st.latency_p50_ms);
          req.set_latency_p99_ms(st.latency_p99_ms);
        }
      }
    }
    if (req.gpa_size() == 0 && req.latency_p99_ms() == 0) continue;
    if (!stream_->Write(req)) return;
  }
}

Status PostcopyCall::Serve() {
  const uint32_t index = requests_ ? 0 : 1;
  const std::string name = requests_ ? "post-copy requests" : "post-copy push";
  StreamCursor cursor;
  proto::PageBatch batch;
  while (stream_->Read(&batch)) {
    engine::PostcopyMemory* postcopy = nullptr;
    const engine::SlotTable* memory = nullptr;
    {
      std::lock_guard lock(r_.mu_);
      if (session_->state != SessionState::kPostcopy || session_->postcopy == nullptr) {
        return Status::Ok();  // over (complete, or failed elsewhere)
      }
      PMLMIG_RETURN_IF_ERROR(AdmitBatch(session_->id, index, cursor, batch).WithContext(name));
      postcopy = session_->postcopy;
      memory = &session_->target->memory();
      ++session_->applying;
    }
    const std::span<const uint8_t> payload(reinterpret_cast<const uint8_t*>(batch.payload().data()),
                                           batch.payload().size());
    Result<ApplyResult> applied = applier_.Apply(batch, Chunks(&payload, 1), *memory, nullptr, nullptr, postcopy);
    {
      std::lock_guard lock(r_.mu_);
      --session_->applying;
      if (applied.ok()) {
        ++cursor.next_sequence;
        cursor.last_round = batch.round();
        session_->totals.pages += applied->normal_pages + applied->zero_pages;
        session_->totals.normal_pages += applied->normal_pages;
        session_->totals.zero_pages += applied->zero_pages;
        session_->totals.payload_bytes += applied->normal_pages << engine::kPageShift;
        session_->totals.wire_bytes += batch.ByteSizeLong();
        ++session_->totals.batches;
        session_->last_activity = Session::Clock::now();
      }
      r_.cv_.notify_all();
    }
    if (!applied.ok()) return applied.status().WithContext(name);
    if (push_acks_) {
      // The push's window moves on (the source reads it: HelloReply.postcopy_push_acks).
      proto::PostcopyRequest ack;
      ack.set_push_placed(cursor.next_sequence);
      if (!stream_->Write(ack)) break;
    }
    FailPoint("receiver.postcopy");
  }
  // The source half-closed (the push is over) or the call ended. Only a
  // break while pages are still owed breaks the link.
  std::lock_guard lock(r_.mu_);
  const bool owed = session_->state == SessionState::kPostcopy && session_->postcopy != nullptr &&
                    session_->postcopy->remaining() > 0;
  if (owed && ctx_->IsCancelled()) return Unavailable(name + " call broke (source gone or connection lost)");
  return Status::Ok();
}

bool PostcopyCall::StaleLocked() const { return session_->postcopy_link != link_; }

void PostcopyCall::Detach(const Status& why) {
  std::lock_guard lock(r_.mu_);
  stop_ = true;
  auto& calls = session_->postcopy_calls;
  calls.erase(std::remove(calls.begin(), calls.end(), ctx_), calls.end());
  if (!StaleLocked()) {
    (requests_ ? session_->requests_attached : session_->push_attached) = false;
    if (!why.ok()) {
      // A broken connection pauses the link (the source may resume); a
      // batch that fails its checks fails the migration.
      if (why.code() == Code::kUnavailable) {
        r_.PausePostcopyLocked(*session_, link_, why);
      } else {
        r_.MarkFailedLocked(*session_, why, nullptr);
      }
    }
  }
  r_.cv_.notify_all();
}

}  // namespace pmlmig::transport
