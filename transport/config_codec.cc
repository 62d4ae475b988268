#include "pmlmig/transport/config_codec.h"

#include "migration.pb.h"
#include "pmlmig/vmm/guest_memory.h"

namespace pmlmig::transport {

std::string EncodeVmConfig(const vmm::TestGuestConfig& c, bool irqchip) {
  proto::VmConfig p;
  p.set_memory_bytes(c.memory_bytes);
  p.set_vcpus(c.vcpus);
  p.set_workload(static_cast<proto::Workload>(c.workload.kind));
  p.set_hot_fraction(c.workload.hot_fraction);
  p.set_hot_share(c.workload.hot_share);
  p.set_rate(c.workload.rate);
  p.set_fill(c.fill == vmm::FillMode::kZero ? proto::FILL_ZERO : proto::FILL_RANDOM);
  p.set_seed(c.seed);
  p.set_irqchip(irqchip);
  return p.SerializeAsString();
}

Status DecodeVmConfig(const std::string& bytes, vmm::TestGuestConfig* config, bool* irqchip) {
  proto::VmConfig p;
  if (!p.ParseFromString(bytes)) return InvalidArgument("VmConfig: not a valid protobuf message");
  if (auto layout = vmm::PcLayout(p.memory_bytes()); !layout.ok()) {
    return layout.status().WithContext("VmConfig.memory_bytes");
  }
  if (p.vcpus() == 0 || p.vcpus() > PMLMIG_MAX_VCPUS) {
    return InvalidArgument("VmConfig.vcpus: " + std::to_string(p.vcpus()) + " is outside 1.." +
                           std::to_string(PMLMIG_MAX_VCPUS));
  }
  if (!proto::Workload_IsValid(p.workload())) {
    return InvalidArgument("VmConfig.workload: unknown value " + std::to_string(p.workload()));
  }
  if (!(p.hot_fraction() > 0.0 && p.hot_fraction() <= 1.0)) {
    return InvalidArgument("VmConfig.hot_fraction: must be in (0, 1]");
  }
  if (!(p.hot_share() >= 0.0 && p.hot_share() <= 1.0)) {
    return InvalidArgument("VmConfig.hot_share: must be in [0, 1]");
  }
  if (!proto::Fill_IsValid(p.fill())) return InvalidArgument("VmConfig.fill: unknown value " + std::to_string(p.fill()));
  config->memory_bytes = p.memory_bytes();
  config->vcpus = p.vcpus();
  config->workload.kind = static_cast<pmlmig_workload>(p.workload());
  config->workload.hot_fraction = p.hot_fraction();
  config->workload.hot_share = p.hot_share();
  config->workload.rate = p.rate();
  config->fill = p.fill() == proto::FILL_ZERO ? vmm::FillMode::kZero : vmm::FillMode::kRandom;
  config->seed = p.seed();
  *irqchip = p.irqchip();
  return Status::Ok();
}

}  // namespace pmlmig::transport
