// Translation between the VMM's description of a test VM and its wire form
// (proto VmConfig). The engine and the VMM never see protobuf types; this is
// where they meet the wire, and where the receiver validates what arrives.
#pragma once

#include <string>

#include "pmlmig/base/status.h"
#include "pmlmig/vmm/boot.h"

namespace pmlmig::transport {

// Serialized proto VmConfig.
std::string EncodeVmConfig(const vmm::TestGuestConfig& config, bool irqchip);
// Parses and validates (sizes, vCPU count, enum values, fractions), naming
// the first field that is wrong.
Status DecodeVmConfig(const std::string& bytes, vmm::TestGuestConfig* config, bool* irqchip);

}  // namespace pmlmig::transport
