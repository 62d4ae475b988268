#include "pmlmig/engine/migration_controller.h"

namespace pmlmig::engine {

std::string_view VmPlacementName(VmPlacement placement) {
  switch (placement) {
    case VmPlacement::kHere: return "running";
    case VmPlacement::kMigrated: return "migrated";
    case VmPlacement::kPausedInDoubt: return "paused-in-doubt";
    case VmPlacement::kPausedPostcopyFailed: return "paused-postcopy-failed";
  }
  return "unknown";
}

MigrationController::MigrationController(VmControl& vm, DirtyTracker& tracker, std::string vm_description,
                                         const Clock& clock)
    : vm_(vm), tracker_(tracker), vm_description_(std::move(vm_description)), clock_(clock) {
  last_.outcome = Outcome::kNone;
}

MigrationController::~MigrationController() {
  (void)Cancel();
  (void)Wait();
  Joined();
}

void MigrationController::Joined() {
  std::thread t;
  {
    std::lock_guard lock(mu_);
    if (active_) return;
    t = std::move(thread_);
  }
  if (t.joinable()) t.join();
}

Status MigrationController::Start(std::unique_ptr<MigrationSink> sink, MigrationOptions options,
                                  MigrationCallbacks callbacks) {
  if (!sink) return InvalidArgument("no migration sink");
  Joined();  // the previous, finished migration's thread
  std::lock_guard lock(mu_);
  if (active_) return InvalidArgument("a migration is already in progress");
  if (placement_ == VmPlacement::kMigrated) return InvalidArgument("this VM has already migrated away");
  if (placement_ == VmPlacement::kPausedPostcopyFailed) {
    return InvalidArgument("the last migration failed in post-copy: the VM stays paused here as of its switch");
  }
  if (placement_ == VmPlacement::kPausedInDoubt) {
    return InvalidArgument(
        "the last switch-over is in doubt: the VM stays paused here until you know whether the target runs it");
  }
  if (thread_.joinable()) return InvalidArgument("a migration is already in progress");  // Start raced Start
  sink_ = std::move(sink);
  auto source = std::make_unique<MigrationSource>(vm_, tracker_, *sink_, std::move(options), vm_description_, clock_);
  if (Status s = source->CheckAid(); !s.ok()) {  // refused now, not as a failed migration
    sink_.reset();
    return s;
  }
  source_ = std::move(source);
  source_->SetCallbacks(std::move(callbacks));
  active_ = true;
  thread_ = std::thread([this, source = source_.get()] {
    MigrationStats st = source->Run();
    {
      std::lock_guard l(mu_);
      if (st.outcome == Outcome::kCompleted && !st.source_kept) placement_ = VmPlacement::kMigrated;
      if (st.outcome == Outcome::kInDoubt) placement_ = VmPlacement::kPausedInDoubt;
      if (st.outcome == Outcome::kPostcopyFailed) placement_ = VmPlacement::kPausedPostcopyFailed;
      last_ = std::move(st);
      active_ = false;
    }
    cv_.notify_all();
  });
  return Status::Ok();
}

Status MigrationController::Cancel() {
  std::lock_guard lock(mu_);
  if (!active_) return InvalidArgument("no migration in progress");
  if (source_->progress().phase == Phase::kPostcopy) {
    return InvalidArgument("the migration is in post-copy: the VM runs on the target, which still needs pages from "
                           "here, so it cannot be cancelled; it ends once the target holds every page");
  }
  source_->Cancel();
  return Status::Ok();
}

MigrationStats MigrationController::Wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return !active_; });
  return last_;
}

ControllerStatus MigrationController::status() const {
  std::lock_guard lock(mu_);
  ControllerStatus s;
  s.vm = placement_;
  s.active = active_;
  if (source_) s.progress = source_->progress();
  s.last = last_.outcome;
  s.last_stats = last_;
  return s;
}

bool MigrationController::OnMigrationThread() const {
  std::lock_guard lock(mu_);
  return thread_.get_id() == std::this_thread::get_id();
}

bool MigrationController::busy() const {
  std::lock_guard lock(mu_);
  return active_;
}

}  // namespace pmlmig::engine
