// pmlmig probe: what this host offers for dirty tracking and migration.
#include <cstdio>

#include "commands.h"
#include "pmlmig/vmm/capabilities.h"

namespace pmlmig::tools {

Command RegisterProbe(CLI::App& app) {
  auto* cmd = app.add_subcommand("probe", "Report KVM and kernel capabilities for dirty tracking");
  auto json = std::make_shared<bool>(false);
  auto device = std::make_shared<std::string>("/dev/kvm");
  cmd->add_flag("--json", *json, "Print one JSON object instead of a report");
  cmd->add_option("--device", *device, "KVM device to probe")->capture_default_str();
  return [json, device]() {
    const vmm::HostCapabilities caps = vmm::ProbeHost(*device);
    const std::string out = *json ? vmm::CapabilitiesToJson(caps) : vmm::CapabilitiesToText(caps);
    std::fputs(out.c_str(), stdout);
    if (out.empty() || out.back() != '\n') std::fputc('\n', stdout);
    if (!caps.kvm) {
      PrintError(caps.kvm_error);
      return kExitFailure;
    }
    return kExitOk;
  };
}

}  // namespace pmlmig::tools
