#include "c_receiver.h"

#include <cstring>
#include <string>
#include <vector>

#include "pmlmig/transport/handover.h"

namespace pmlmig::capi {

Result<std::unique_ptr<engine::VmControl>> FactoryResult(int rc, pmlmig_vm* vm) {
  if (rc >= 0 && vm != nullptr) return std::unique_ptr<engine::VmControl>(vm);
  if (vm != nullptr) pmlmig_vm_destroy(vm);  // wrapped, then refused: released here
  const int err = rc < 0 ? -rc : EINVAL;
  const std::string why = !ThreadError().empty() ? ThreadError()
                          : rc < 0               ? std::string(std::strerror(err))
                                                 : std::string("it returned no VM");
  return Status(Status::FromErrno(err, "").code(), "the embedder's VM factory refused: " + why);
}

VmBuilder BuilderOf(pmlmig_vm_factory factory, void* user) {
  return [=](const engine::MigrationSetup& setup) -> Result<std::unique_ptr<engine::VmControl>> {
    std::vector<pmlmig_region_layout> layout;
    for (const engine::MemoryRange& m : setup.memory) layout.push_back({m.slot, 0, m.gpa, m.size});
    pmlmig_vm* vm = nullptr;
    SetThreadError("");
    const int rc = factory(user, setup.vm_description.data(), setup.vm_description.size(), setup.vcpus,
                           layout.data(), static_cast<uint32_t>(layout.size()), &vm);
    return FactoryResult(rc, vm);
  };
}

engine::VmMigrationTarget::Check CheckOf(pmlmig_vm_check check, void* user) {
  if (check == nullptr) return nullptr;
  return [=](engine::VmControl& vm) -> Result<std::string> {
    SetThreadError("");
    const int rc = check(user, static_cast<pmlmig_vm*>(&vm));
    if (rc < 0) {
      const std::string why = ThreadError().empty() ? std::strerror(-rc) : ThreadError();
      return DataLoss("the receiver's check refused the VM: " + why);
    }
    return std::string("the receiver's check passed");
  };
}

std::function<std::unique_ptr<engine::MigrationTarget>()> TargetsOf(const pmlmig_receive_options& o, VmBuilder build) {
  const bool require_verify = o.require_verify != 0;
  engine::VmMigrationTarget::Check check = CheckOf(o.check, o.user);
  return [=]() -> std::unique_ptr<engine::MigrationTarget> {
    auto checked = [=](const engine::MigrationSetup& setup) -> Result<std::unique_ptr<engine::VmControl>> {
      if (require_verify && !setup.verify) {
        return InvalidArgument("this receiver requires memory verification and the source did not ask for it");
      }
      return build(setup);
    };
    return std::make_unique<engine::VmMigrationTarget>(checked, check);
  };
}

int StartHandoverReceiver(std::unique_ptr<pmlmig_receiver> r, pmlmig_receiver** out) {
  const pmlmig_receive_options& o = r->options;
  auto path = transport::ParseUnixAddress(o.listen);
  if (!path.ok()) return Fail(nullptr, path.status());
  if (o.shared_factory == nullptr) {
    return Fail(nullptr, InvalidArgument("pmlmig_receive_options: listen is unix:PATH (same-host handovers) but "
                                         "shared_factory is NULL"));
  }
  if (o.tls_ca != nullptr || o.tls_cert != nullptr || o.tls_key != nullptr || o.token_file != nullptr ||
      o.allow_insecure != 0) {
    return Fail(nullptr, InvalidArgument("pmlmig_receive_options: TLS, tokens and allow_insecure do not apply to a "
                                         "unix:PATH receiver (the socket is 0600 and the peer's uid is checked)"));
  }
  if (o.max_vcpus == 0 || o.handshake_timeout_ms == 0 || o.commit_timeout_ms == 0) {
    return Fail(nullptr, InvalidArgument("pmlmig_receive_options: max_vcpus, handshake_timeout_ms and "
                                         "commit_timeout_ms must be > 0"));
  }
  transport::HandoverServerOptions ho;
  ho.max_vcpus = o.max_vcpus;
  ho.handshake_timeout = std::chrono::milliseconds(o.handshake_timeout_ms);
  ho.commit_timeout = std::chrono::milliseconds(o.commit_timeout_ms);
  if (o.idle_timeout_ms > 0) ho.idle_timeout = std::max(ho.idle_timeout, std::chrono::milliseconds(o.idle_timeout_ms));
  const pmlmig_vm_factory_shared factory = o.shared_factory;
  void* const user = o.user;
  auto build = [=](const engine::MigrationSetup& setup) -> Result<std::unique_ptr<engine::VmControl>> {
    std::vector<pmlmig_region> regions;
    for (size_t i = 0; i < setup.memory.size(); ++i) {
      pmlmig_region g{};
      g.slot = setup.memory[i].slot;
      g.gpa = setup.memory[i].gpa;
      g.size = setup.memory[i].size;
      g.host = nullptr;
      g.memfd = setup.shared_memory.at(i).fd;
      g.memfd_offset = setup.shared_memory[i].offset;
      regions.push_back(g);
    }
    pmlmig_vm* vm = nullptr;
    SetThreadError("");
    const int rc = factory(user, setup.vm_description.data(), setup.vm_description.size(), setup.vcpus,
                           regions.data(), static_cast<uint32_t>(regions.size()), &vm);
    return FactoryResult(rc, vm);
  };
  auto make_target = TargetsOf(o, build);
  auto server = transport::HandoverServer::Start(*path, make_target, std::move(ho));
  if (!server.ok()) return Fail(nullptr, server.status());
  r->server = std::move(*server);
  *out = r.release();
  return 0;
}

}  // namespace pmlmig::capi
