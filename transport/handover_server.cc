// HandoverServer: the receiver's side of a same-host handover
// (proto/handover.proto). One thread accepts connections, and each is served
// on a thread of its own, so a peer that connects and says nothing (or a
// refused one) holds up nobody: a Resolve is answered at once, and a setup
// waits only for a handover in progress (handovers run one at a time).
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

#include "handover_wire.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/transport/handover.h"

namespace pmlmig::transport {
namespace {

Deadline In(std::chrono::milliseconds d) {
  return d.count() > 0 ? std::chrono::steady_clock::now() + d : Deadline::max();
}

// A listening socket bound at a path, and which file that path named when
// it was bound (the path is unlinked at the end only if it still names it).
struct Bound {
  UniqueFd sock;
  dev_t dev = 0;
  ino_t ino = 0;
};

// Binds a listening socket at `path`, mode 0600 from the start: it is bound
// under a private name, restricted, then linked into place (a link, unlike
// a rename, never replaces what another receiver put there meanwhile), so
// nobody can connect while it is still open to all. A stale socket
// (nothing accepts on it) is replaced; anything else at `path` is refused.
Result<Bound> Listen(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string temp = path + ".pmlmig-" + std::to_string(::getpid());
  if (temp.size() >= sizeof addr.sun_path) {
    return InvalidArgument("unix:" + path + ": the path is too long (at most " +
                           std::to_string(sizeof addr.sun_path - 1 - (temp.size() - path.size())) +
                           " bytes: the socket is bound as PATH" + temp.substr(path.size()) + " first)");
  }
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return InvalidArgument("unix:" + path + ": exists and is not a socket");
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (probe.valid() && ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      return InvalidArgument("unix:" + path + ": another receiver listens there");
    }
    ::unlink(path.c_str());
  }
  UniqueFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return Status::FromErrno(errno, "socket(AF_UNIX)");
  std::memcpy(addr.sun_path, temp.c_str(), temp.size() + 1);
  ::unlink(temp.c_str());
  if (::bind(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, "bind unix:" + path + " (as " + temp + ")");
  }
  if (::chmod(temp.c_str(), 0600) != 0) {
    Status s = Status::FromErrno(errno, "make unix:" + path + " private (0600)");
    ::unlink(temp.c_str());
    return s;
  }
  if (::link(temp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    if (err == EEXIST) return InvalidArgument("unix:" + path + ": another receiver took the path first");
    return Status::FromErrno(err, "bind unix:" + path);
  }
  ::unlink(temp.c_str());
  Bound b;
  if (::lstat(path.c_str(), &st) == 0) b.dev = st.st_dev, b.ino = st.st_ino;
  if (::listen(sock.get(), 4) != 0) {
    ::unlink(path.c_str());
    return Status::FromErrno(errno, "listen on unix:" + path);
  }
  b.sock = std::move(sock);
  return b;
}

proto::HandoverMessage SetupReply(const Status& s, const std::string& receiver) {
  proto::HandoverMessage m;
  m.mutable_setup_reply()->set_ok(s.ok());
  m.mutable_setup_reply()->set_error(s.message());
  m.mutable_setup_reply()->set_receiver(receiver);
  return m;
}

}  // namespace

class HandoverServer::Impl {
 public:
  Impl(std::string path, UniqueFd listen, TargetFactory factory, HandoverServerOptions o)
      : path_(std::move(path)), listen_(std::move(listen)), factory_(std::move(factory)), options_(std::move(o)) {
    thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~Impl() { Shutdown(); }

  Result<ReceivedMigration> Wait(Deadline deadline) {
    std::unique_lock lock(mu_);
    cv_.wait_until(lock, deadline, [&] { return !done_.empty() || stopped_; });
    if (done_.empty()) {
      return stopped_ ? Unavailable("the receiver shut down before a handover ended") : Aborted("no handover ended in time");
    }
    ReceivedMigration r = std::move(done_.front());
    done_.pop_front();
    return r;
  }

  void Refuse(std::string why) {
    std::lock_guard lock(mu_);
    refuse_ = std::move(why);
  }

  void Shutdown() {
    {
      std::lock_guard lock(mu_);
      if (stopped_) return;
      stopped_ = true;
      for (int c : conns_) ::shutdown(c, SHUT_RDWR);  // the handover in progress fails, the others end
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();  // then no worker is added
    for (Worker& w : workers_) w.thread.join();
    workers_.clear();
    // Only our own socket: another receiver may have replaced a stale one.
    struct stat st{};
    if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == bound_dev_ && st.st_ino == bound_ino_) {
      ::unlink(path_.c_str());
    }
  }

  void SetBoundFile(dev_t dev, ino_t ino) {
    bound_dev_ = dev;
    bound_ino_ = ino;
  }

  const std::string& path() const { return path_; }

 private:
  bool stopped() {
    std::lock_guard lock(mu_);
    return stopped_;
  }

  // A connection's thread; `done` is set as it ends.
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };

  void AcceptLoop() {
    while (!stopped()) {
      // Finished connections' threads first.
      for (auto it = workers_.begin(); it != workers_.end();) {
        if (!it->done->load()) {
          ++it;
          continue;
        }
        it->thread.join();
        it = workers_.erase(it);
      }
      pollfd p{listen_.get(), POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      auto conn = std::make_shared<UniqueFd>(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn->valid()) continue;
      {
        std::lock_guard lock(mu_);
        if (stopped_) break;
        conns_.insert(conn->get());
      }
      auto done = std::make_shared<std::atomic<bool>>(false);
      workers_.push_back({std::thread([this, conn, done] {
                            Serve(conn->get());
                            {
                              std::lock_guard lock(mu_);
                              conns_.erase(conn->get());  // before it closes: Shutdown never sees a reused fd
                            }
                            conn->Reset();
                            done->store(true);
                          }),
                          done});
    }
  }

  void Serve(int conn) {
    auto peer = PeerOf(conn);
    Status allowed = peer.ok() ? CheckPeer(*peer, ::geteuid(), options_.allowed_uids, "source") : peer.status();
    if (!allowed.ok()) {  // answered at once: not a word of its is read
      (void)SendFrame(conn, SetupReply(allowed, options_.receiver_name), In(std::chrono::milliseconds(1000)));
      return;
    }
    auto first = ReceiveFrame(conn, In(options_.handshake_timeout), kMaxHandoverFds, "handover setup");
    if (!first.ok()) return;  // nothing was built: not a migration
    if (first->message.has_resolve()) return AnswerResolve(conn, first->message.resolve().session_id());
    if (!first->message.has_setup()) {
      (void)SendFrame(conn, SetupReply(InvalidArgument("the first message must be a setup"), options_.receiver_name),
                      In(std::chrono::milliseconds(1000)));
      return;
    }
    std::unique_lock one_at_a_time(receive_mu_);  // behind a handover in progress, if any
    if (stopped()) {
      (void)SendFrame(conn, SetupReply(Unavailable("the receiver is shutting down"), options_.receiver_name),
                      In(std::chrono::milliseconds(1000)));
      return;
    }
    ReceivedMigration r = Receive(conn, first->message.setup(), std::move(first->fds));
    one_at_a_time.unlock();
    std::lock_guard lock(mu_);
    done_.push_back(std::move(r));
    cv_.notify_all();
  }

  void AnswerResolve(int conn, uint64_t session) {
    proto::HandoverMessage m;
    proto::HandoverResolveReply::State state = proto::HandoverResolveReply::UNKNOWN;
    {
      std::lock_guard lock(mu_);
      if (auto it = sessions_.find(session); it != sessions_.end()) state = it->second;
    }
    m.mutable_resolve_reply()->set_state(state);
    (void)SendFrame(conn, m, In(std::chrono::milliseconds(1000)));
  }

  // One handover, from its setup to its end.
  ReceivedMigration Receive(int conn, const proto::HandoverSetup& setup, std::vector<UniqueFd> fds);

  const std::string path_;
  dev_t bound_dev_ = 0;  // what path_ named once bound (SetBoundFile, before the thread starts)
  ino_t bound_ino_ = 0;
  UniqueFd listen_;
  TargetFactory factory_;
  const HandoverServerOptions options_;
  std::thread thread_;              // the accept loop
  std::list<Worker> workers_;       // the accept loop's, then Shutdown's once it is joined
  std::mutex receive_mu_;           // held by the handover in progress
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<ReceivedMigration> done_;  // guarded by mu_
  std::string refuse_;                   // guarded by mu_
  bool stopped_ = false;                 // guarded by mu_
  std::set<int> conns_;                  // guarded by mu_: the connections being served
  std::map<uint64_t, proto::HandoverResolveReply::State> sessions_;  // guarded by mu_
};

ReceivedMigration HandoverServer::Impl::Receive(int conn, const proto::HandoverSetup& setup,
                                                std::vector<UniqueFd> fds) {
  ReceivedMigration r;
  r.session_id = setup.session_id();
  std::unique_ptr<engine::MigrationTarget> target;
  auto record = [&](proto::HandoverResolveReply::State s) {
    std::lock_guard lock(mu_);
    sessions_[r.session_id] = s;
  };
  // Any end before the commit: the target discards its VM (it wrote nothing
  // of the shared memory, so the source may resume on it).
  auto fail = [&](engine::Outcome outcome, const Status& why) {
    if (target) target->OnAbort(why.message());
    record(proto::HandoverResolveReply::DISCARDED);
    r.outcome = outcome;
    r.error = why;
    return std::move(r);
  };
  Status valid = ValidateHandoverSetup(setup, fds, options_.max_regions, options_.max_vcpus);
  {
    std::lock_guard lock(mu_);
    if (valid.ok() && !refuse_.empty()) valid = Unavailable("this receiver takes no more handovers: " + refuse_);
  }
  engine::MigrationSetup ms;
  if (valid.ok()) {
    ms.vm_description = setup.vm_description();
    ms.vcpus = setup.vcpus();
    ms.verify = setup.verify();
    ms.verify_order = engine::VerifyOrder::kAfterCommit;  // the source compares the digests it gets back
    for (int i = 0; i < setup.regions_size(); ++i) {
      const proto::HandoverRegion& reg = setup.regions(i);
      ms.memory.push_back({reg.slot(), reg.gpa(), reg.size()});
      ms.shared_memory.push_back({fds[static_cast<size_t>(i)].get(), reg.file_offset()});
    }
    target = factory_();
    valid = target ? target->OnSetup(ms) : Internal("no target");
  }
  if (!valid.ok()) {
    (void)SendFrame(conn, SetupReply(valid, options_.receiver_name), In(std::chrono::milliseconds(1000)));
    return fail(engine::Outcome::kFailed, valid);
  }
  if (Status s = SendFrame(conn, SetupReply(Status::Ok(), options_.receiver_name), In(options_.commit_timeout));
      !s.ok()) {
    return fail(engine::Outcome::kFailed, s);
  }
  FailPoint("handover.setup");
  // The final state, whenever the source pauses.
  auto final = ReceiveFrame(conn, In(options_.idle_timeout), 0, "handover final state");
  if (!final.ok()) return fail(engine::Outcome::kFailed, final.status());
  if (final->message.has_abort()) {
    return fail(engine::Outcome::kCancelled, Aborted("the source aborted: " + final->message.abort().why()));
  }
  if (!final->message.has_final()) return fail(engine::Outcome::kFailed, InvalidArgument("expected the final state"));
  engine::FinalState state;
  const std::string& blob = final->message.final().vm_state();
  state.vm_state.assign(blob.begin(), blob.end());
  state.source_paused_ms = final->message.final().source_paused_ms();
  auto prepared = target->OnFinal(state);
  proto::HandoverMessage reply;
  proto::HandoverFinalReply* fr = reply.mutable_final_reply();
  if (!prepared.ok()) {
    fr->set_prepared(false);
    fr->set_error(prepared.status().message());
    fr->set_data_loss(prepared.status().code() == Code::kDataLoss);
    (void)SendFrame(conn, reply, In(std::chrono::milliseconds(1000)));
    return fail(engine::Outcome::kFailed, prepared.status());
  }
  fr->set_prepared(true);
  for (uint64_t d : prepared->chunk_digests) fr->add_chunk_digests(d);
  fr->set_chunk_bytes(prepared->chunk_bytes);
  fr->set_target_restore_ms(prepared->target_restore_ms);
  fr->set_verify_detail(prepared->verify_detail);
  if (Status s = SendFrame(conn, reply, In(options_.commit_timeout)); !s.ok()) return fail(engine::Outcome::kFailed, s);
  FailPoint("handover.prepared");
  // Prepared: the VM runs only on Commit.
  auto commit = ReceiveFrame(conn, In(options_.commit_timeout), 0, "handover commit");
  if (!commit.ok()) return fail(engine::Outcome::kFailed, commit.status().WithContext("prepared, no commit"));
  if (commit->message.has_abort()) {
    return fail(engine::Outcome::kCancelled, Aborted("the source aborted: " + commit->message.abort().why()));
  }
  if (!commit->message.has_commit()) return fail(engine::Outcome::kFailed, InvalidArgument("expected the commit"));
  auto resumed = target->OnCommit();
  proto::HandoverMessage cr;
  cr.mutable_commit_reply()->set_resumed(resumed.ok());
  if (!resumed.ok()) {
    cr.mutable_commit_reply()->set_error(resumed.status().message());
    (void)SendFrame(conn, cr, In(std::chrono::milliseconds(1000)));
    return fail(engine::Outcome::kFailed, resumed.status());
  }
  record(proto::HandoverResolveReply::COMMITTED);
  if (TamperPoint("tamper.handover_commit_reply")) ::shutdown(conn, SHUT_RDWR);  // the answer lost: the source resolves
  cr.mutable_commit_reply()->set_target_resume_ms(*resumed);
  // A lost reply is the source's to resolve; the VM runs here either way.
  Status replied = SendFrame(conn, cr, In(std::chrono::milliseconds(1000)));
  r.outcome = engine::Outcome::kCompleted;
  r.error = replied.ok() ? Status::Ok() : replied.WithContext("the commit's answer");
  r.reply = *prepared;
  r.reply.target_resume_ms = *resumed;
  r.reply.source_paused_ms = state.source_paused_ms;
  r.vm = target->TakeVm();
  r.target = std::move(target);
  return r;
}

Result<std::unique_ptr<HandoverServer>> HandoverServer::Start(const std::string& path, TargetFactory factory,
                                                              HandoverServerOptions options) {
  if (path.empty()) return InvalidArgument("handover: no socket path");
  PMLMIG_ASSIGN_OR_RETURN(Bound bound, Listen(path));
  auto impl = std::make_unique<Impl>(path, std::move(bound.sock), std::move(factory), std::move(options));
  impl->SetBoundFile(bound.dev, bound.ino);
  return std::unique_ptr<HandoverServer>(new HandoverServer(std::move(impl)));
}

HandoverServer::HandoverServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HandoverServer::~HandoverServer() { Shutdown(); }
Result<ReceivedMigration> HandoverServer::WaitForMigration(std::chrono::steady_clock::time_point deadline) {
  return impl_->Wait(deadline);
}
void HandoverServer::RefuseNewMigrations(std::string why) { impl_->Refuse(std::move(why)); }
void HandoverServer::Shutdown() { impl_->Shutdown(); }
const std::string& HandoverServer::path() const { return impl_->path(); }

}  // namespace pmlmig::transport
