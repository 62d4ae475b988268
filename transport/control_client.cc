#include "control_client.h"

namespace pmlmig::transport {

void ControlClient::Start(const std::shared_ptr<grpc::Channel>& channel) {
  stub_ = proto::Migration::NewStub(channel);
  call_ = stub_->Control(calls_.NewContext());
  reader_ = std::thread([this] { ReadLoop(); });
  std::lock_guard lock(mu_);
  started_ = true;
}

void ControlClient::ReadLoop() {
  proto::ControlReply reply;
  while (call_->Read(&reply)) {
    std::lock_guard lock(mu_);
    replies_.push_back(std::move(reply));
    reply.Clear();
    cv_.notify_all();
  }
  // Read returned false: the receiver ended the call (or it was cancelled,
  // or the connection died); nothing more will arrive, so Finish is safe.
  grpc::Status st = call_->Finish();
  std::lock_guard lock(mu_);
  ended_ = true;
  status_ = std::move(st);
  cv_.notify_all();
}

bool ControlClient::Write(const proto::ControlRequest& req) {
  std::lock_guard lock(write_mu_);
  if (writes_done_) return false;
  return call_->Write(req);
}

Result<proto::ControlReply> ControlClient::WaitReply(std::chrono::milliseconds timeout, const std::string& what) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, timeout, [&] {
    return !replies_.empty() || ended_ || calls_.stop().load(std::memory_order_relaxed);
  });
  if (Status f = calls_.failure(); !f.ok()) return f;
  if (!replies_.empty()) {
    proto::ControlReply r = std::move(replies_.front());
    replies_.pop_front();
    return r;
  }
  if (ended_) {
    Status s = FromGrpc(status_, "receiver ended the migration while " + what);
    if (s.ok()) s = Internal("receiver closed the control stream while " + what);
    lock.unlock();
    calls_.Fail(s);
    return s;
  }
  lock.unlock();
  calls_.Fail(Unavailable("no answer from " + target_ + " within " + SecondsText(timeout) + " while " + what));
  return calls_.failure();
}

Status ControlClient::End(std::chrono::milliseconds timeout, const std::string& what) {
  std::unique_lock lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return ended_; })) {
    return Unavailable("receiver did not close the control stream within " + SecondsText(timeout) + " after " + what);
  }
  return FromGrpc(status_, "control stream");
}

void ControlClient::Close(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(write_mu_);
    call_->WritesDone();
    writes_done_ = true;
  }
  (void)End(grace, "Commit");
}

void ControlClient::TryAbort(const std::string& why, std::chrono::milliseconds grace) {
  // Bounded: another writer may hold the control stream, or the receiver
  // may not read; then the caller's cancel speaks for us.
  std::unique_lock wl(write_mu_, std::defer_lock);
  if (!wl.try_lock_for(grace) || writes_done_) return;
  proto::ControlRequest req;
  req.mutable_abort()->set_reason(why);
  if (!call_->Write(req)) return;
  call_->WritesDone();
  writes_done_ = true;
  wl.unlock();
  (void)End(grace, "Abort");
}

bool ControlClient::open() const {
  std::lock_guard lock(mu_);
  return started_ && !ended_;
}

void ControlClient::Wake() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

void ControlClient::Join() {
  if (reader_.joinable()) reader_.join();
}

}  // namespace pmlmig::transport
