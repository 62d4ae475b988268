// pmlmig_restore_*: a snapshot file brought back as the embedder's VM, over
// engine::SnapshotRestore, the VM built by the embedder's factory (the same
// one a migration's target uses).
#include <chrono>
#include <memory>

#include "c_receiver.h"
#include "c_vm.h"
#include "pmlmig/engine/snapshot_restore.h"
#include "pmlmig/pmlmig.h"

namespace capi = pmlmig::capi;
namespace engine = pmlmig::engine;
using capi::Guard;
using pmlmig::InvalidArgument;
using pmlmig::Status;

struct pmlmig_restore {
  std::unique_ptr<engine::SnapshotRestore> restore;
  bool handed_over = false;  // pmlmig_restore_wait gave the VM to the caller
  capi::ErrorSlot error;
};

namespace {

pmlmig_restore_stats StatsOf(const engine::RestoreStats& s) {
  pmlmig_restore_stats out{};
  out.size = sizeof out;
  out.lazy = s.lazy ? 1 : 0;
  out.verified = s.verified ? 1 : 0;
  out.open_ms = s.open_ms;
  out.build_ms = s.build_ms;
  out.load_ms = s.load_ms;
  out.running_ms = s.running_ms;
  out.complete_ms = s.complete_ms;
  out.guest_bytes = s.guest_bytes;
  out.bytes_read = s.bytes_read;
  out.faults = s.faults;
  out.latency_p50_ms = s.latency_p50_ms;
  out.latency_p99_ms = s.latency_p99_ms;
  out.latency_max_ms = s.latency_max_ms;
  return out;
}

}  // namespace

extern "C" {

void pmlmig_restore_options_init(pmlmig_restore_options* o) {
  if (o == nullptr) return;
  *o = pmlmig_restore_options{};
  o->size = sizeof *o;
  o->threads = engine::RestoreOptions{}.threads;
}

void pmlmig_restore_stats_init(pmlmig_restore_stats* s) {
  if (s == nullptr) return;
  *s = pmlmig_restore_stats{};
  s->size = sizeof *s;
}

int pmlmig_restore_start(const pmlmig_restore_options* options, pmlmig_restore** out) {
  return Guard(nullptr, [&] {
    if (out == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_start: out is NULL"));
    *out = nullptr;
    pmlmig_restore_options o;
    pmlmig_restore_options_init(&o);
    if (Status s = capi::ReadSized(options, &o, "pmlmig_restore_options"); !s.ok()) return capi::Fail(nullptr, s);
    if (o.path == nullptr || *o.path == '\0') {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_options: path is empty"));
    }
    if (o.factory == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_options: factory is NULL"));
    if (o.lazy != 0 && o.lazy != 1) {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_options: lazy must be 0 or 1"));
    }
    if (o.threads == 0 || o.threads > 256) {
      return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_options: threads " + std::to_string(o.threads) +
                                                     " is outside 1..256"));
    }
    engine::RestoreOptions ro;
    ro.lazy = o.lazy == 1;
    ro.threads = o.threads;
    auto r = std::make_unique<pmlmig_restore>();  // first: nothing may fail once the VM runs
    auto restored = engine::SnapshotRestore::Start(o.path, capi::BuilderOf(o.factory, o.user), ro);
    if (!restored.ok()) return capi::Fail(nullptr, restored.status());
    r->restore = std::move(*restored);
    *out = r.release();
    return 0;
  });
}

int pmlmig_restore_wait(pmlmig_restore* restore, int64_t timeout_ms, pmlmig_vm** vm, pmlmig_restore_stats* stats) {
  if (restore == nullptr) return capi::Fail(nullptr, InvalidArgument("pmlmig_restore_wait: restore is NULL"));
  if (vm == nullptr) return capi::Fail(&restore->error, InvalidArgument("pmlmig_restore_wait: vm is NULL"));
  return Guard(&restore->error, [&] {
    *vm = nullptr;
    if (restore->handed_over) {
      return capi::Fail(&restore->error, InvalidArgument("pmlmig_restore_wait: the VM was handed over already"));
    }
    // -1, or anything longer than any restore, is a wait of 100 days (no clock overflows).
    constexpr int64_t kLongest = int64_t{100} * 24 * 3600 * 1000;
    const auto timeout = std::chrono::milliseconds(timeout_ms < 0 || timeout_ms > kLongest ? kLongest : timeout_ms);
    const Status complete = restore->restore->WaitComplete(timeout);
    capi::WriteSized(StatsOf(restore->restore->stats()), stats);
    if (complete.code() == pmlmig::Code::kUnavailable && restore->restore->remaining() > 0) {
      capi::Fail(&restore->error, complete);
      return -ETIMEDOUT;
    }
    std::unique_ptr<engine::VmControl> taken = restore->restore->TakeVm();
    if (taken == nullptr) return capi::Fail(&restore->error, complete.ok() ? pmlmig::Internal("no VM") : complete);
    restore->handed_over = true;
    *vm = static_cast<pmlmig_vm*>(taken.release());  // the embedder's factory's VM: a pmlmig_vm
    return capi::Fail(&restore->error, complete);    // 0, or -EBADMSG: the file was damaged
  });
}

const char* pmlmig_restore_last_error(const pmlmig_restore* restore) {
  return restore != nullptr ? restore->error.c_str() : "";
}

void pmlmig_restore_destroy(pmlmig_restore* restore) {
  (void)Guard(nullptr, [&] {
    if (restore == nullptr) return 0;
    if (!restore->handed_over) restore->restore->Abandon();
    delete restore;  // releases a VM not handed over
    return 0;
  });
}

}  // extern "C"
