// The C ABI's receiver (pmlmig_receiver): what pmlmig.cc and the same-host
// handover's receiver (c_receiver.cc) share. Private to capi/.
#pragma once

#include <functional>
#include <memory>

#include "c_vm.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/pmlmig.h"
#include "pmlmig/transport/received.h"

struct pmlmig_receiver {
  // Before server: a waiter the server's shutdown wakes still writes here.
  pmlmig::capi::ErrorSlot error;
  pmlmig::capi::CallGate waiters;  // pmlmig_receiver_wait callers, which destroy lets return first
  std::unique_ptr<pmlmig::transport::MigrationReceiver> server;
  int port = 0;  // host:port; 0 for unix:PATH
  pmlmig_receive_options options{};
};

namespace pmlmig::capi {

// A factory's answer as a VM or the refusal: its message (pmlmig_set_error)
// or its errno. A VM it wrapped and still refused is released here.
Result<std::unique_ptr<engine::VmControl>> FactoryResult(int rc, pmlmig_vm* vm);
// The embedder's check as the engine's, or nullptr without one.
engine::VmMigrationTarget::Check CheckOf(pmlmig_vm_check check, void* user);
// The targets of a receiver with options `o`: each builds its VM with
// `build` (a call of the embedder's factory) once the setup passed the
// options' require_verify, and checks it with the embedder's check.
using VmBuilder = std::function<Result<std::unique_ptr<engine::VmControl>>(const engine::MigrationSetup&)>;
// The embedder's factory as a VmBuilder (what it needs is copied: the
// builder runs on library threads).
VmBuilder BuilderOf(pmlmig_vm_factory factory, void* user);
std::function<std::unique_ptr<engine::MigrationTarget>()> TargetsOf(const pmlmig_receive_options& o, VmBuilder build);
// pmlmig_receiver_start for listen "unix:PATH", its options read into r.
int StartHandoverReceiver(std::unique_ptr<pmlmig_receiver> r, pmlmig_receiver** out);

}  // namespace pmlmig::capi
