// HandoverSink: the source's side of a same-host handover
// (proto/handover.proto). One connection carries the whole switch-over;
// only a lost commit answer opens a second one, to resolve.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "handover_wire.h"
#include "pmlmig/transport/handover.h"

namespace pmlmig::transport {
namespace {

Deadline In(std::chrono::milliseconds d) { return std::chrono::steady_clock::now() + d; }

// Connects to the receiver's socket, retrying while it is missing or
// refuses (a receiver still starting), and checks who listens there.
Result<UniqueFd> Connect(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return InvalidArgument("unix:" + path + ": the path is too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const Deadline until = In(timeout);
  for (;;) {
    UniqueFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!sock.valid()) return Status::FromErrno(errno, "socket(AF_UNIX)");
    if (::connect(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
      PMLMIG_ASSIGN_OR_RETURN(PeerCredentials peer, PeerOf(sock.get()));
      const uid_t root[] = {0};
      PMLMIG_RETURN_IF_ERROR(CheckPeer(peer, ::geteuid(), root, "receiver").WithContext("unix:" + path));
      return sock;
    }
    const int err = errno;
    if ((err != ENOENT && err != ECONNREFUSED && err != EAGAIN) || std::chrono::steady_clock::now() >= until) {
      Status s = Status::FromErrno(err, "connect to unix:" + path);
      if (err == ENOENT || err == ECONNREFUSED) s = Unavailable(s.message() + " (is a receiver listening on it?)");
      return s;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// The peer's answer of the expected kind, or the error it reports instead.
template <typename Pred>
Result<proto::HandoverMessage> Expect(int sock, Deadline deadline, std::string_view what, Pred is_kind) {
  PMLMIG_ASSIGN_OR_RETURN(HandoverFrame f, ReceiveFrame(sock, deadline, 0, what));
  if (!is_kind(f.message)) return InvalidArgument(std::string(what) + ": the receiver answered out of turn");
  return std::move(f.message);
}

}  // namespace

Result<std::string> ParseUnixAddress(const std::string& address) {
  constexpr std::string_view kPrefix = "unix:";
  if (address.rfind(kPrefix, 0) != 0 || address.size() == kPrefix.size()) {
    return InvalidArgument("'" + address + "' is not unix:PATH: a same-host handover shares memory, so it needs a "
                           "unix socket on this host");
  }
  return address.substr(kPrefix.size());
}

class HandoverSink::Impl {
 public:
  explicit Impl(HandoverSinkOptions o) : options_(std::move(o)) {
    std::random_device rd;
    session_id_ = (uint64_t(rd()) << 32) | rd();
  }

  Status Begin(const engine::MigrationSetup& setup) {
    PMLMIG_ASSIGN_OR_RETURN(UniqueFd sock, Connect(options_.path, options_.connect_timeout));
    {
      std::lock_guard lock(mu_);
      if (aborted_) return Aborted("handover: " + why_);
      sock_ = std::move(sock);
    }
    proto::HandoverMessage m;
    proto::HandoverSetup* s = m.mutable_setup();
    s->set_version(kHandoverVersion);
    s->set_session_id(session_id_);
    s->set_vm_description(setup.vm_description);
    s->set_vcpus(setup.vcpus);
    s->set_verify(setup.verify);
    s->set_sender(options_.sender_name);
    std::vector<int> fds;
    for (size_t i = 0; i < setup.memory.size(); ++i) {
      proto::HandoverRegion* r = s->add_regions();
      r->set_slot(setup.memory[i].slot);
      r->set_gpa(setup.memory[i].gpa);
      r->set_size(setup.memory[i].size);
      r->set_file_offset(setup.shared_memory.at(i).offset);
      fds.push_back(setup.shared_memory[i].fd);
    }
    const Deadline deadline = In(options_.reply_timeout);
    PMLMIG_RETURN_IF_ERROR(Fail(Send(sock_.get(), m, deadline, fds)));
    auto reply = Expect(sock_.get(), deadline, "handover setup", [](auto& r) { return r.has_setup_reply(); });
    PMLMIG_RETURN_IF_ERROR(Fail(reply.status()));
    if (!reply->setup_reply().ok()) return Fail(InvalidArgument("the receiver refused: " + reply->setup_reply().error()));
    return Status::Ok();
  }

  Result<engine::FinalReply> Finish(const engine::FinalState& state) {
    proto::HandoverMessage m;
    m.mutable_final()->set_vm_state(state.vm_state.data(), state.vm_state.size());
    m.mutable_final()->set_source_paused_ms(state.source_paused_ms);
    const Deadline deadline = In(options_.reply_timeout);
    PMLMIG_RETURN_IF_ERROR(Fail(Send(sock_.get(), m, deadline)));
    auto reply = Expect(sock_.get(), deadline, "handover final state", [](auto& r) { return r.has_final_reply(); });
    PMLMIG_RETURN_IF_ERROR(Fail(reply.status()));
    const proto::HandoverFinalReply& r = reply->final_reply();
    if (!r.prepared()) {
      return Fail(r.data_loss() ? DataLoss(r.error()) : InvalidArgument("the receiver refused: " + r.error()));
    }
    engine::FinalReply out;
    out.prepared = true;
    out.chunk_digests.assign(r.chunk_digests().begin(), r.chunk_digests().end());
    out.chunk_bytes = r.chunk_bytes();
    out.target_restore_ms = r.target_restore_ms();
    out.verify_detail = r.verify_detail();
    out.source_paused_ms = state.source_paused_ms;
    return out;
  }

  engine::CommitResult Commit() {
    proto::HandoverMessage m;
    m.mutable_commit();
    {
      std::lock_guard lock(mu_);
      committing_ = true;  // from here an abort no longer tells the target anything
    }
    const Deadline deadline = In(options_.commit_timeout);
    Status sent = Send(sock_.get(), m, deadline);
    if (!sent.ok()) {  // the commit may not have reached the target; ask
      return Resolve(sent);
    }
    auto reply = Expect(sock_.get(), deadline, "handover commit", [](auto& r) { return r.has_commit_reply(); });
    if (!reply.ok()) return Resolve(reply.status());
    engine::CommitResult result;
    if (!reply->commit_reply().resumed()) {
      result.state = engine::CommitState::kNotCommitted;
      result.detail = Internal("the receiver did not resume the VM: " + reply->commit_reply().error());
      return result;
    }
    result.state = engine::CommitState::kCommitted;
    result.target_resume_ms = reply->commit_reply().target_resume_ms();
    return result;
  }

  void Abort(const std::string& why) {
    std::lock_guard lock(mu_);
    if (aborted_) return;
    aborted_ = true;
    why_ = why;
    if (!sock_.valid()) return;
    // Best effort, and never into the middle of a frame the controlling
    // thread is sending: the broken connection says the same.
    std::unique_lock send(send_mu_, std::try_to_lock);
    if (!committing_ && send.owns_lock()) {
      proto::HandoverMessage m;
      m.mutable_abort()->set_why(why);
      (void)SendFrame(sock_.get(), m, In(std::chrono::milliseconds(100)));
    }
    ::shutdown(sock_.get(), SHUT_RDWR);  // wakes a call blocked on it
  }

 private:
  // Any failure before Commit: the target must not run the VM (it discards
  // it once the connection closes).
  Status Fail(const Status& s) {
    if (s.ok()) return s;
    std::lock_guard lock(mu_);
    if (aborted_) return Aborted("handover: " + why_);
    if (sock_.valid()) ::shutdown(sock_.get(), SHUT_RDWR);
    return s;
  }

  // The commit's answer was lost: ask on a new connection. Memory is shared,
  // so unless the receiver says the VM never ran there, this side must not
  // resume it.
  engine::CommitResult Resolve(const Status& lost) {
    engine::CommitResult result;
    result.state = engine::CommitState::kInDoubt;
    auto sock = Connect(options_.path, options_.commit_timeout);
    if (!sock.ok()) {
      result.detail = lost.WithContext("the commit's answer was lost and the receiver cannot be asked (" +
                                       sock.status().message() + "); it may have run the guest on the shared memory");
      return result;
    }
    proto::HandoverMessage m;
    m.mutable_resolve()->set_session_id(session_id_);
    const Deadline deadline = In(options_.commit_timeout);
    Status sent = SendFrame(sock->get(), m, deadline);
    auto reply = sent.ok() ? Expect(sock->get(), deadline, "handover resolve", [](auto& r) { return r.has_resolve_reply(); })
                           : Result<proto::HandoverMessage>(sent);
    if (!reply.ok()) {
      result.detail = lost.WithContext("the commit's answer was lost and asking again failed (" +
                                       reply.status().message() + "); it may have run the guest on the shared memory");
      return result;
    }
    result.resolved = true;
    switch (reply->resolve_reply().state()) {
      case proto::HandoverResolveReply::COMMITTED:
        result.state = engine::CommitState::kCommitted;
        result.detail = Status::Ok();
        return result;
      case proto::HandoverResolveReply::DISCARDED:
        result.state = engine::CommitState::kNotCommitted;
        result.detail = lost.WithContext("the receiver discarded the VM");
        return result;
      default:
        result.detail = lost.WithContext("the receiver does not know this handover (another process?); the one "
                                         "that took it may have run the guest on the shared memory");
        return result;
    }
  }

  // One frame at a time on the socket (the controlling thread's and an
  // abort's).
  Status Send(int sock, const proto::HandoverMessage& m, Deadline deadline, std::span<const int> fds = {}) {
    std::lock_guard lock(send_mu_);
    return SendFrame(sock, m, deadline, fds);
  }

  const HandoverSinkOptions options_;
  std::mutex send_mu_;
  uint64_t session_id_ = 0;
  UniqueFd sock_;  // set once by Begin (under mu_), then read by the controlling thread
  std::mutex mu_;
  bool aborted_ = false;     // guarded by mu_
  bool committing_ = false;  // guarded by mu_
  std::string why_;          // guarded by mu_
};

Result<std::unique_ptr<HandoverSink>> HandoverSink::Create(HandoverSinkOptions options) {
  if (options.path.empty()) return InvalidArgument("handover: no socket path");
  if (options.path.size() >= sizeof(sockaddr_un::sun_path)) {
    return InvalidArgument("unix:" + options.path + ": the path is too long for a unix socket");
  }
  return std::unique_ptr<HandoverSink>(new HandoverSink(std::make_unique<Impl>(std::move(options))));
}

HandoverSink::HandoverSink(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HandoverSink::~HandoverSink() = default;

Status HandoverSink::Begin(const engine::MigrationSetup& setup, const engine::SlotTable&) {
  if (setup.shared_memory.size() != setup.memory.size()) {
    return InvalidArgument("handover: every memory range needs its memory file");
  }
  return impl_->Begin(setup);
}

Result<engine::TransferStats> HandoverSink::SendPages(uint32_t, engine::PageList&) {
  return Internal("a same-host handover sends no pages");
}

Result<engine::FinalReply> HandoverSink::Finish(const engine::FinalState& state) {
  if (state.postcopy) return InvalidArgument("a same-host handover has no post-copy");
  return impl_->Finish(state);
}

engine::CommitResult HandoverSink::Commit() { return impl_->Commit(); }
void HandoverSink::Abort(const std::string& why) { impl_->Abort(why); }

}  // namespace pmlmig::transport
