// The C ABI (include/pmlmig/pmlmig.h) over the C++ API: the engine's
// MigrationController on the source, the transport's MigrationServer with an
// engine::VmMigrationTarget on the target, and the embedder's VM (c_vm.h).
// No C++ exception leaves a function defined here: each entry point catches
// everything and turns it into -EIO with a message.
#include "pmlmig/pmlmig.h"

#include <cmath>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>

#include "c_receiver.h"
#include "c_vm.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/migration_controller.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/transport/control.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"

namespace capi = pmlmig::capi;
namespace engine = pmlmig::engine;
namespace transport = pmlmig::transport;
using pmlmig::Code;
using pmlmig::InvalidArgument;
using pmlmig::Result;
using pmlmig::Status;

#define PMLMIG_STR2(x) #x
#define PMLMIG_STR(x) PMLMIG_STR2(x)

using capi::Guard;

namespace {

std::string Str(const char* s) { return s != nullptr ? std::string(s) : std::string(); }

pmlmig_outcome OutcomeOf(engine::Outcome o) {
  switch (o) {
    case engine::Outcome::kNone: return PMLMIG_OUTCOME_NONE;
    case engine::Outcome::kCompleted: return PMLMIG_OUTCOME_COMPLETED;
    case engine::Outcome::kFailed: return PMLMIG_OUTCOME_FAILED;
    case engine::Outcome::kCancelled: return PMLMIG_OUTCOME_CANCELLED;
    case engine::Outcome::kInDoubt: return PMLMIG_OUTCOME_IN_DOUBT;
    case engine::Outcome::kPostcopyFailed: return PMLMIG_OUTCOME_POSTCOPY_FAILED;
  }
  return PMLMIG_OUTCOME_FAILED;
}

pmlmig_phase PhaseOf(engine::Phase p) {
  switch (p) {
    case engine::Phase::kSetup: return PMLMIG_PHASE_SETUP;
    case engine::Phase::kRound: return PMLMIG_PHASE_ROUND;
    case engine::Phase::kStopAndCopy: return PMLMIG_PHASE_STOP_AND_COPY;
    case engine::Phase::kCommit: return PMLMIG_PHASE_COMMIT;
    case engine::Phase::kDone: return PMLMIG_PHASE_DONE;
    case engine::Phase::kPostcopy: return PMLMIG_PHASE_POSTCOPY;
  }
  return PMLMIG_PHASE_DONE;
}

pmlmig_progress ProgressOf(const engine::MigrationProgress& p) {
  pmlmig_progress out{};
  out.size = sizeof out;
  out.phase = PhaseOf(p.phase);
  out.round = p.round;
  out.remaining_pages = p.remaining_pages;
  out.bandwidth_mbps = p.bandwidth_mbps;
  out.expected_downtime_ms = p.expected_downtime_ms;
  out.wire_bytes = p.wire_bytes;
  out.elapsed_ms = p.elapsed_ms;
  return out;
}

// The embedder's policy callback as the engine's SwitchoverPolicy.
class CPolicy final : public engine::SwitchoverPolicy {
 public:
  CPolicy(pmlmig_decision (*fn)(void*, pmlmig_round_stats), void* user, const pmlmig::Clock& clock)
      : fn_(fn), user_(user), clock_(clock) {}
  void Begin() override { start_ = clock_.Now(); }
  engine::SwitchoverDecision Decide(const engine::RoundSummary& r) override {
    pmlmig_round_stats s{};
    s.size = sizeof s;
    s.round = r.round;
    s.remaining_pages = r.remaining_pages;
    s.bytes_per_page = r.bytes_per_page;
    s.bandwidth_mbps = r.bandwidth_bytes_per_s * 8 / 1e6;
    s.expected_downtime_ms = r.expected_downtime_ms;
    s.dirty_pages_rate = r.dirty_pages_rate;
    s.elapsed_ms = pmlmig::MsSince(clock_, start_);
    s.wire_bytes = r.wire_bytes;
    const int decision = static_cast<int>(fn_(user_, s));
    if (decision == PMLMIG_DECISION_CONTINUE) return engine::SwitchoverDecision::Continue();
    if (decision == PMLMIG_DECISION_STOP_AND_COPY) {
      return {engine::SwitchoverAction::kStopAndCopy, engine::SwitchoverReason::kPolicy, ""};
    }
    return {engine::SwitchoverAction::kAbort, engine::SwitchoverReason::kPolicy,
            decision == PMLMIG_DECISION_ABORT
                ? "the embedder's switch-over policy aborted the migration in round " + std::to_string(r.round)
                : "the embedder's switch-over policy returned " + std::to_string(decision) +
                      ", which is no pmlmig_decision (taken as abort)"};
  }

 private:
  pmlmig_decision (*fn_)(void*, pmlmig_round_stats);
  void* user_;
  const pmlmig::Clock& clock_;
  pmlmig::Clock::TimePoint start_{};
};

// The integer stored in an enum field of a caller's struct, read without
// assuming it is one of the enum's values.
template <typename E>
uint32_t RawEnum(const E& field) {
  static_assert(sizeof(E) == sizeof(uint32_t));
  uint32_t v;
  std::memcpy(&v, &field, sizeof v);
  return v;
}

Result<engine::TrackerKind> TrackerKindOf(uint32_t t, const pmlmig_vm& vm) {
  switch (t) {
    case PMLMIG_TRACKER_AUTO:
      return vm.dirty_ring_entries() != 0 ? engine::TrackerKind::kRing : engine::TrackerKind::kBitmap;
    case PMLMIG_TRACKER_RING:
      if (vm.dirty_ring_entries() == 0) return InvalidArgument("tracker RING: the VM was created without a dirty ring");
      return engine::TrackerKind::kRing;
    case PMLMIG_TRACKER_BITMAP: return engine::TrackerKind::kBitmap;
    case PMLMIG_TRACKER_BITMAP_CLEAR: return engine::TrackerKind::kBitmapClear;
  }
  return InvalidArgument("pmlmig_migrate_options: unknown tracker " + std::to_string(t));
}

// The tracker a source's migration uses: KVM's log (chosen per migration)
// OR the VMM's own marks. Swapped only while no migration is in flight.
class SourceTracker final : public engine::DirtyTracker {
 public:
  explicit SourceTracker(pmlmig_vm& vm) : vm_(vm) {}
  Status Select(engine::TrackerKind kind) {
    if (kvm_ && kind == kind_) return Status::Ok();
    PMLMIG_ASSIGN_OR_RETURN(kvm_, engine::CreateTracker(kind, vm_, {}));
    kind_ = kind;
    both_ = std::make_unique<engine::UnionTracker>(std::vector<engine::DirtyTracker*>{kvm_.get(), &vm_.marks()});
    return Status::Ok();
  }
  std::string_view name() const override { return kvm_ ? kvm_->name() : "none"; }
  Status Enable() override { return both_->Enable(); }
  Status Collect(engine::DirtySet& out) override { return both_->Collect(out); }
  Status Disable() override { return both_->Disable(); }
  engine::TrackerStats stats() const override { return both_ ? both_->stats() : engine::TrackerStats{}; }
  // The VMM's own marks say nothing per vCPU: the rates are KVM's (the ring's).
  bool vcpu_counts(std::vector<engine::VcpuDirtyCount>& out) const override {
    return kvm_ && kvm_->vcpu_counts(out);
  }

 private:
  pmlmig_vm& vm_;
  engine::TrackerKind kind_ = engine::TrackerKind::kNone;
  std::unique_ptr<engine::DirtyTracker> kvm_;
  std::unique_ptr<engine::UnionTracker> both_;
};

}  // namespace

struct pmlmig_source {
  explicit pmlmig_source(pmlmig_vm& v) : vm(v), tracker(v), controller(v, tracker, v.description()) {}
  pmlmig_vm& vm;
  SourceTracker tracker;  // before controller: the controller uses it
  capi::ErrorSlot error;
  std::mutex start_mu;    // one Start at a time (it selects the tracker)
  bool started = false;   // guarded by start_mu
  engine::MigrationController controller;
  capi::CallGate waiters;  // pmlmig_source_wait callers, which destroy lets return first
};

extern "C" {

uint32_t pmlmig_version(void) { return PMLMIG_VERSION; }
const char* pmlmig_version_string(void) {
  return PMLMIG_STR(PMLMIG_VERSION_MAJOR) "." PMLMIG_STR(PMLMIG_VERSION_MINOR) "." PMLMIG_STR(PMLMIG_VERSION_PATCH);
}
uint32_t pmlmig_abi_version(void) { return PMLMIG_ABI_VERSION; }
uint32_t pmlmig_wire_version(void) { return PMLMIG_WIRE_VERSION; }
const char* pmlmig_last_error(void) { return capi::ThreadError().c_str(); }
void pmlmig_set_error(const char* message) {
  try {
    capi::SetThreadError(Str(message));
  } catch (...) {
  }
}

uint64_t pmlmig_features(void) {
  uint64_t f = PMLMIG_FEATURE_MIGRATION | PMLMIG_FEATURE_TLS | PMLMIG_FEATURE_LZ4 | PMLMIG_FEATURE_ZSTD |
               PMLMIG_FEATURE_MARK_DIRTY | PMLMIG_FEATURE_HANDOVER | PMLMIG_FEATURE_SNAPSHOT;
  const int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm >= 0) {
    pmlmig::UniqueFd owner(kvm);
    if (::ioctl(kvm, KVM_GET_API_VERSION, 0) == KVM_API_VERSION) {
      f |= PMLMIG_FEATURE_DIRTY_BITMAP;
      if (::ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 ||
          ::ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING) > 0) {
        f |= PMLMIG_FEATURE_DIRTY_RING;
      }
    }
  }
  return f;
}

int pmlmig_buffer_append(pmlmig_buffer* buffer, const void* data, size_t length) {
  return Guard(nullptr, [&] {
    if (buffer == nullptr || (data == nullptr && length > 0)) return capi::Fail(nullptr, InvalidArgument("pmlmig_buffer_append: NULL"));
    if (length > pmlmig_buffer::kLimit - buffer->bytes.size()) {
      return capi::Fail(nullptr, pmlmig::ResourceExhausted("pmlmig_buffer_append: the state would exceed 1 GiB"));
    }
    const auto* p = static_cast<const uint8_t*>(data);
    buffer->bytes.insert(buffer->bytes.end(), p, p + length);
    return 0;
  });
}

// ---- VM

void pmlmig_vm_config_init(pmlmig_vm_config* config) {
  if (config == nullptr) return;
  *config = pmlmig_vm_config{};
  config->size = sizeof *config;
  config->vm_fd = -1;
}

void pmlmig_vm_ops_init(pmlmig_vm_ops* ops) {
  if (ops == nullptr) return;
  *ops = pmlmig_vm_ops{};
  ops->size = sizeof *ops;
}

int pmlmig_vm_create(const pmlmig_vm_config* config, const pmlmig_vm_ops* ops, void* opaque, pmlmig_vm** out) {
  return Guard(nullptr, [&] {
    if (out == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_vm_create: out is NULL"));
    *out = nullptr;
    pmlmig_vm_config c{};
    pmlmig_vm_ops o{};
    if (Status s = capi::ReadSized(config, &c, "pmlmig_vm_config"); !s.ok()) return capi::Fail(nullptr, s);
    if (Status s = capi::ReadSized(ops, &o, "pmlmig_vm_ops"); !s.ok()) return capi::Fail(nullptr, s);
    auto vm = pmlmig_vm::Create(c, o, opaque);
    if (!vm.ok()) return capi::Fail(nullptr, vm.status());
    *out = *vm;
    return 0;
  });
}

void pmlmig_vm_destroy(pmlmig_vm* vm) {
  (void)Guard(nullptr, [&] {
    delete vm;
    return 0;
  });
}

void* pmlmig_vm_opaque(const pmlmig_vm* vm) { return vm != nullptr ? vm->opaque() : nullptr; }
const char* pmlmig_vm_last_error(const pmlmig_vm* vm) {
  return vm != nullptr ? const_cast<pmlmig_vm*>(vm)->error().c_str() : "";
}

int pmlmig_vm_dirty_ring_full(pmlmig_vm* vm, uint32_t vcpu) {
  if (vm == nullptr) return -EINVAL;
  return Guard(&vm->error(), [&] { return vm->OnDirtyRingFull(vcpu); });
}

uint64_t pmlmig_vm_throttle_ns(pmlmig_vm* vm, uint32_t vcpu) {
  if (vm == nullptr) return 0;
  return vm->ThrottleNs(vcpu);
}

int pmlmig_vm_mark_dirty(pmlmig_vm* vm, uint64_t gpa, uint64_t length) {
  if (vm == nullptr) return -EINVAL;
  return Guard(&vm->error(), [&] { return capi::Fail(&vm->error(), vm->marks().MarkDirty(gpa, length)); });
}

// ---- Source

const char* pmlmig_outcome_name(pmlmig_outcome outcome) {
  switch (outcome) {
    case PMLMIG_OUTCOME_NONE: return "none";
    case PMLMIG_OUTCOME_COMPLETED: return "completed";
    case PMLMIG_OUTCOME_FAILED: return "failed";
    case PMLMIG_OUTCOME_CANCELLED: return "cancelled";
    case PMLMIG_OUTCOME_IN_DOUBT: return "in-doubt";
    case PMLMIG_OUTCOME_POSTCOPY_FAILED: return "postcopy-failed";
  }
  return "unknown";
}

void pmlmig_migrate_options_init(pmlmig_migrate_options* o) {
  if (o == nullptr) return;
  *o = pmlmig_migrate_options{};
  o->size = sizeof *o;
  const engine::DowntimeLimitOptions d;
  o->streams = transport::DefaultStreams();
  o->compression = PMLMIG_COMPRESSION_NONE;
  o->downtime_limit_ms = static_cast<uint32_t>(d.downtime_limit.count());
  o->max_rounds = d.max_rounds;
  o->timeout_ms = static_cast<uint64_t>(d.timeout.count());
  o->tracker = PMLMIG_TRACKER_AUTO;
  o->converge = PMLMIG_CONVERGE_NONE;
  o->stall_rounds = d.stall_rounds;
  o->dirty_limit_pages_per_s = 0;
  o->postcopy_recovery_ms = static_cast<uint32_t>(transport::GrpcSinkOptions{}.postcopy_recovery.count());
}

void pmlmig_migration_stats_init(pmlmig_migration_stats* s) {
  if (s == nullptr) return;
  *s = pmlmig_migration_stats{};
  s->size = sizeof *s;
}

int pmlmig_source_create(pmlmig_vm* vm, pmlmig_source** out) {
  return Guard(nullptr, [&] {
    if (vm == nullptr || out == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_source_create: NULL"));
    *out = new pmlmig_source(*vm);
    return 0;
  });
}

int pmlmig_source_start(pmlmig_source* source, const pmlmig_migrate_options* options) {
  if (source == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_source_start: source is NULL"));
  return Guard(&source->error, [&] {
    pmlmig_migrate_options o;
    pmlmig_migrate_options_init(&o);
    if (Status s = capi::ReadSized(options, &o, "pmlmig_migrate_options"); !s.ok()) return capi::Fail(&source->error, s);
    std::lock_guard lock(source->start_mu);
    if (source->controller.busy()) {
      capi::Fail(&source->error, InvalidArgument("a migration is already in progress"));
      return -EBUSY;
    }
    const bool snapshot = o.snapshot_to != nullptr && *o.snapshot_to != '\0';
    if (!snapshot && (o.target == nullptr || *o.target == '\0')) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: target is empty (expected host:port, "
                                                        "or unix:PATH with local; or a snapshot_to file)"));
    }
    if (snapshot && o.target != nullptr && *o.target != '\0') {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: set target or snapshot_to, not both"));
    }
    if (o.snapshot_live != 0 && (o.snapshot_live != 1 || !snapshot)) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: snapshot_live must be 0, or 1 with "
                                                        "a snapshot_to file"));
    }
    // Enum fields are read as integers: a C caller may store any value there.
    if (const uint32_t comp = RawEnum(o.compression); comp > PMLMIG_COMPRESSION_ZSTD) {
      return capi::Fail(&source->error,
                        InvalidArgument("pmlmig_migrate_options: unknown compression " + std::to_string(comp)));
    }
    if (o.force_on_timeout != 0 && o.force_on_timeout != 1) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: force_on_timeout must be 0 or 1"));
    }
    // pmlmig_migrate_options_init sets the default; 0 is a caller's mistake here.
    if (o.streams == 0 || o.streams > transport::kMaxStreams) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: streams " + std::to_string(o.streams) +
                                                            " is outside 1.." + std::to_string(transport::kMaxStreams)));
    }
    transport::MigrateCommand c;
    c.to = Str(o.target);
    c.snapshot_to = Str(o.snapshot_to);
    c.live = o.snapshot_live == 1;
    c.streams = o.streams;
    c.compress = transport::CompressionName(static_cast<transport::Compression>(RawEnum(o.compression)));
    c.max_bandwidth = o.max_bandwidth;
    c.downtime_limit_ms = o.downtime_limit_ms;
    c.max_rounds = o.max_rounds;
    c.timeout_ms = o.timeout_ms;
    c.force_on_timeout = o.force_on_timeout == 1;
    if (o.verify < PMLMIG_VERIFY_OFF || o.verify > PMLMIG_VERIFY_AFTER_COMMIT) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: verify must be 0, 1 or 2"));
    }
    c.verify = o.verify != PMLMIG_VERIFY_OFF;
    c.verify_order = o.verify == PMLMIG_VERIFY_AFTER_COMMIT ? engine::VerifyOrder::kAfterCommit
                                                            : engine::VerifyOrder::kBeforeCommit;
    c.tls_ca = Str(o.tls_ca);
    c.tls_cert = Str(o.tls_cert);
    c.tls_key = Str(o.tls_key);
    c.tls_server_name = Str(o.tls_server_name);
    c.token_file = Str(o.token_file);
    switch (RawEnum(o.converge)) {
      case PMLMIG_CONVERGE_NONE: c.aid = engine::ConvergeAid::kNone; break;
      case PMLMIG_CONVERGE_DIRTY_LIMIT: c.aid = engine::ConvergeAid::kDirtyLimit; break;
      case PMLMIG_CONVERGE_AUTO: c.aid = engine::ConvergeAid::kAutoConverge; break;
      default:
        return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: unknown converge " +
                                                              std::to_string(RawEnum(o.converge))));
    }
    if (!(o.dirty_limit_pages_per_s >= 0) || !std::isfinite(o.dirty_limit_pages_per_s)) {
      return capi::Fail(&source->error,
                        InvalidArgument("pmlmig_migrate_options: dirty_limit_pages_per_s must be a finite rate >= 0"));
    }
    if (o.dirty_limit_pages_per_s > 0 && c.aid != engine::ConvergeAid::kDirtyLimit) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: dirty_limit_pages_per_s is set "
                                                        "but converge is not PMLMIG_CONVERGE_DIRTY_LIMIT"));
    }
    c.dirty_limit_pages_per_s = o.dirty_limit_pages_per_s;
    c.stall_rounds = o.stall_rounds;
    c.postcopy_recovery_ms = o.postcopy_recovery_ms;
    switch (RawEnum(o.postcopy)) {
      case PMLMIG_POSTCOPY_OFF: c.postcopy = engine::PostcopyMode::kOff; break;
      case PMLMIG_POSTCOPY_AUTO: c.postcopy = engine::PostcopyMode::kAuto; break;
      case PMLMIG_POSTCOPY_NOW: c.postcopy = engine::PostcopyMode::kNow; break;
      default:
        return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: unknown postcopy " +
                                                              std::to_string(RawEnum(o.postcopy))));
    }
    c.local = o.local != 0;
    if (c.local && (c.aid != engine::ConvergeAid::kNone || c.postcopy != engine::PostcopyMode::kOff)) {
      return capi::Fail(&source->error, InvalidArgument("pmlmig_migrate_options: a local handover copies no memory: "
                                                        "converge and postcopy must be off"));
    }
    auto sink = transport::SinkFor(c);
    if (!sink.ok()) return capi::Fail(&source->error, sink.status());
    auto kind = TrackerKindOf(RawEnum(o.tracker), source->vm);
    if (!kind.ok()) return capi::Fail(&source->error, kind.status());
    if (Status s = source->tracker.Select(*kind); !s.ok()) return capi::Fail(&source->error, s);

    engine::MigrationOptions mo = transport::MigrationOptionsFor(c);
    if (o.policy != nullptr) mo.policy = std::make_shared<CPolicy>(o.policy, o.user, pmlmig::Clock::Steady());
    engine::MigrationCallbacks callbacks;
    if (o.on_progress != nullptr) {
      callbacks.on_progress = [fn = o.on_progress, user = o.user](const engine::MigrationProgress& p) {
        const pmlmig_progress cp = ProgressOf(p);
        fn(user, &cp);
      };
    }
    if (Status s = source->controller.Start(std::move(*sink), std::move(mo), std::move(callbacks)); !s.ok()) {
      return capi::Fail(&source->error, s);
    }
    source->started = true;
    return 0;
  });
}

int pmlmig_source_wait(pmlmig_source* source, pmlmig_migration_stats* stats) {
  if (source == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_source_wait: source is NULL"));
  capi::CallGate::Pass pass(source->waiters);
  return Guard(&source->error, [&] {
    {
      std::lock_guard lock(source->start_mu);
      if (!source->started) {
        capi::Fail(&source->error, InvalidArgument("no migration was started"));
        return -ENOENT;
      }
    }
    if (source->controller.OnMigrationThread()) {
      capi::Fail(&source->error, InvalidArgument("pmlmig_source_wait: called from a callback on the migration's "
                                                 "own thread, which would wait for itself"));
      return -EDEADLK;
    }
    const engine::MigrationStats st = source->controller.Wait();
    pmlmig_migration_stats out{};
    out.size = sizeof out;
    out.outcome = OutcomeOf(st.outcome);
    out.rounds = st.rounds;
    out.setup_time_ms = st.setup_time_ms;
    out.total_time_ms = st.total_time_ms;
    out.downtime_ms = st.downtime_ms;
    out.expected_downtime_ms = st.expected_downtime_ms;
    out.pages = st.transferred.pages;
    out.zero_pages = st.transferred.zero_pages;
    out.wire_bytes = st.transferred.wire_bytes;
    out.throughput_mbps = st.throughput_mbps;
    out.verified = st.verified ? 1 : 0;
    out.verify_verdict = static_cast<pmlmig_verify_verdict>(st.verification.verdict);
    out.mismatched_chunks = static_cast<uint32_t>(st.verification.mismatch.chunks);
    out.mismatched_bytes = st.verification.mismatch.bytes;
    out.throttle_steps = st.throttle.steps;
    out.throttle_max_pct = st.throttle.at_end.max_duty_pct;
    out.dirty_limit_min_pages_per_s = st.throttle.at_end.min_quota_pages_per_s;
    out.postcopy_used = st.postcopy.used ? 1 : 0;
    out.postcopy_requests = static_cast<uint32_t>(st.postcopy.result.faults);
    out.postcopy_owed_pages = st.postcopy.owed_pages;
    out.postcopy_latency_p50_ms = st.postcopy.result.latency_p50_ms;
    out.postcopy_latency_p99_ms = st.postcopy.result.latency_p99_ms;
    out.postcopy_latency_max_ms = st.postcopy.result.latency_max_ms;
    out.postcopy_ms = st.postcopy.phase_ms;
    out.postcopy_recoveries = st.postcopy.result.recoveries;
    out.source_kept = st.source_kept ? 1 : 0;
    out.source_paused = st.source_paused ? 1 : 0;
    capi::WriteSized(out, stats);
    switch (st.outcome) {
      case engine::Outcome::kCompleted: return 0;
      case engine::Outcome::kCancelled: capi::Fail(&source->error, pmlmig::Aborted(st.error)); return -ECANCELED;
      case engine::Outcome::kInDoubt: capi::Fail(&source->error, pmlmig::Aborted(st.error)); return -ENOTRECOVERABLE;
      case engine::Outcome::kPostcopyFailed: capi::Fail(&source->error, pmlmig::Aborted(st.error)); return -ENOTRECOVERABLE;
      default: break;
    }
    // -EHOSTUNREACH: the receiver unreachable or gone (kUnavailable, as the
    // transport reports it); -EIO: anything else.
    capi::Fail(&source->error, pmlmig::Internal(st.error.empty() ? "the migration failed" : st.error));
    return st.error_code == Code::kUnavailable ? -EHOSTUNREACH : -EIO;
  });
}

int pmlmig_source_status(pmlmig_source* source, pmlmig_progress* progress, pmlmig_outcome* last) {
  if (source == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_source_status: source is NULL"));
  return Guard(&source->error, [&] {
    const engine::ControllerStatus s = source->controller.status();
    capi::WriteSized(ProgressOf(s.progress), progress);
    if (last != nullptr) *last = OutcomeOf(s.last);
    return 0;
  });
}

int pmlmig_source_cancel(pmlmig_source* source) {
  if (source == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_source_cancel: source is NULL"));
  return Guard(&source->error, [&] {
    if (Status s = source->controller.Cancel(); !s.ok()) {
      capi::Fail(&source->error, s);
      return -ENOENT;
    }
    return 0;
  });
}

const char* pmlmig_source_last_error(const pmlmig_source* source) {
  return source != nullptr ? source->error.c_str() : "";
}

void pmlmig_source_destroy(pmlmig_source* source) {
  (void)Guard(nullptr, [&] {
    if (source == nullptr) return 0;
    // A migration in flight ends (cancelled), which lets every waiter
    // return; only then is the handle freed.
    (void)source->controller.Cancel();
    source->waiters.Drain();
    delete source;  // the controller waits for its migration thread
    return 0;
  });
}

// ---- Receiver

void pmlmig_receive_options_init(pmlmig_receive_options* o) {
  if (o == nullptr) return;
  *o = pmlmig_receive_options{};
  o->size = sizeof *o;
  const transport::MigrationServerOptions d;
  o->max_vcpus = d.max_vcpus;
  o->max_streams = d.max_streams;
  o->handshake_timeout_ms = static_cast<uint32_t>(d.handshake_timeout.count());
  o->idle_timeout_ms = static_cast<uint32_t>(d.idle_timeout.count());
  o->postcopy_recovery_ms = static_cast<uint32_t>(d.postcopy_recovery_timeout.count());
  o->commit_timeout_ms = static_cast<uint32_t>(d.commit_timeout.count());
  o->uffd_fill = d.uffd_fill ? 1 : 0;
}

void pmlmig_receive_stats_init(pmlmig_receive_stats* s) {
  if (s == nullptr) return;
  *s = pmlmig_receive_stats{};
  s->size = sizeof *s;
}

int pmlmig_receiver_start(const pmlmig_receive_options* options, pmlmig_receiver** out) {
  return Guard(nullptr, [&] {
    if (out == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_receiver_start: out is NULL"));
    *out = nullptr;
    auto r = std::make_unique<pmlmig_receiver>();
    pmlmig_receive_options& o = r->options;
    pmlmig_receive_options_init(&o);
    if (Status s = capi::ReadSized(options, &o, "pmlmig_receive_options"); !s.ok()) return capi::Fail(nullptr, s);
    if (o.listen == nullptr || *o.listen == '\0') {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_receive_options: listen is empty (expected host:port or unix:PATH)"));
    }
    if (std::string_view(o.listen).rfind("unix:", 0) == 0) return capi::StartHandoverReceiver(std::move(r), out);
    if (o.factory == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_receive_options: factory is NULL"));
    if (o.max_vcpus == 0) return capi::Fail(nullptr, InvalidArgument("pmlmig_receive_options: max_vcpus is 0"));
    if (o.max_streams == 0 || o.max_streams > transport::kMaxStreams) {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_receive_options: max_streams must be 1.." +
                                                     std::to_string(transport::kMaxStreams)));
    }
    if (o.handshake_timeout_ms == 0 || o.commit_timeout_ms == 0) {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_receive_options: handshake_timeout_ms and commit_timeout_ms must be > 0"));
    }
    transport::MigrationServerOptions so;
    so.max_memory_bytes = o.max_memory_bytes;
    so.max_vcpus = o.max_vcpus;
    so.max_streams = o.max_streams;
    so.handshake_timeout = std::chrono::milliseconds(o.handshake_timeout_ms);
    so.idle_timeout = std::chrono::milliseconds(o.idle_timeout_ms);
    so.postcopy_recovery_timeout = std::chrono::milliseconds(o.postcopy_recovery_ms);
    so.commit_timeout = std::chrono::milliseconds(o.commit_timeout_ms);
    so.allow_insecure = o.allow_insecure != 0;
    so.uffd_fill = o.uffd_fill != 0;
    auto sec = transport::LoadTransportSecurity(Str(o.tls_ca), Str(o.tls_cert), Str(o.tls_key), Str(o.token_file));
    if (!sec.ok()) return capi::Fail(nullptr, sec.status());
    so.security = std::move(*sec);
    auto make_target = capi::TargetsOf(o, capi::BuilderOf(o.factory, o.user));
    auto server = transport::MigrationServer::Start(o.listen, make_target, std::move(so));
    if (!server.ok()) return capi::Fail(nullptr, server.status());
    r->port = (*server)->port();
    r->server = std::move(*server);
    *out = r.release();
    return 0;
  });
}

int pmlmig_receiver_port(const pmlmig_receiver* receiver) {
  return receiver != nullptr && receiver->server ? receiver->port : -EINVAL;
}

int pmlmig_receiver_wait(pmlmig_receiver* receiver, int64_t timeout_ms, pmlmig_vm** vm, pmlmig_receive_stats* stats) {
  if (receiver == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_receiver_wait: receiver is NULL"));
  if (vm == nullptr) return capi::Fail(&receiver->error, InvalidArgument("pmlmig_receiver_wait: vm is NULL"));
  capi::CallGate::Pass pass(receiver->waiters);
  return Guard(&receiver->error, [&] {
    *vm = nullptr;
    const auto deadline = timeout_ms < 0 ? std::chrono::steady_clock::time_point::max()
                                         : std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    auto got = receiver->server->WaitForMigration(deadline);
    if (!got.ok()) {
      capi::Fail(&receiver->error, got.status());
      // Unavailable: the receiver is being destroyed; else the deadline passed.
      return got.status().code() == Code::kUnavailable ? -ESHUTDOWN : -ETIMEDOUT;
    }
    transport::ReceivedMigration& m = *got;
    pmlmig_receive_stats out{};
    out.size = sizeof out;
    out.outcome = OutcomeOf(m.outcome);
    out.rounds = m.rounds;
    out.normal_pages = m.totals.normal_pages;
    out.zero_pages = m.totals.zero_pages;
    out.wire_bytes = m.totals.wire_bytes;
    out.target_restore_ms = m.reply.target_restore_ms;
    out.target_resume_ms = m.reply.target_resume_ms;
    out.downtime_ms = m.reply.source_paused_ms > 0
                          ? m.reply.source_paused_ms + m.reply.target_restore_ms + m.reply.target_resume_ms
                          : 0;
    out.verified = m.reply.verified ? 1 : 0;
    out.postcopy = m.postcopy ? 1 : 0;
    out.postcopy_recoveries = m.postcopy_recoveries;
    out.uffd_filled_bytes = m.uffd_filled_bytes;
    capi::WriteSized(out, stats);
    if (m.outcome != engine::Outcome::kCompleted) {
      const int rc = capi::Fail(&receiver->error, m.error.ok() ? pmlmig::Internal("the migration failed") : m.error);
      return m.outcome == engine::Outcome::kCancelled ? -ECANCELED : (rc == 0 ? -EIO : rc);
    }
    // Keep answering Resolve while the VM runs here; take no other migration.
    receiver->server->RefuseNewMigrations("it now runs the VM it received");
    *vm = static_cast<pmlmig_vm*>(m.vm.release());  // our factory's VM: a pmlmig_vm
    return 0;
  });
}

const char* pmlmig_receiver_last_error(const pmlmig_receiver* receiver) {
  return receiver != nullptr ? receiver->error.c_str() : "";
}

void pmlmig_receiver_destroy(pmlmig_receiver* receiver) {
  (void)Guard(nullptr, [&] {
    if (receiver == nullptr) return 0;
    if (receiver->server) receiver->server->Shutdown();  // wakes every waiter (-ESHUTDOWN)
    receiver->waiters.Drain();
    delete receiver;
    return 0;
  });
}

}  // extern "C"
