// The convergence flags, shared by `run --migrate-to` and `migrate`: what the
// switch-over policy may do when the guest dirties memory faster than the
// link carries it (engine/switchover_policy.h, engine/vcpu_throttle.h).
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "pmlmig/base/status.h"
#include "pmlmig/transport/control.h"

namespace pmlmig::tools {

struct ConvergeFlags {
  std::string dirty_limit;  // "", "auto" or a byte rate per vCPU (K/M/G)
  bool auto_converge = false;
  uint32_t stall_rounds = 5;
  std::string postcopy;  // "", "auto" or "now"
  std::string postcopy_recovery = "5m";  // a duration; 0: never
};

// Adds --dirty-limit, --auto-converge, --stall-rounds, --postcopy and
// --postcopy-recovery to
// `cmd`, in `group`.
void AddConvergeFlags(CLI::App* cmd, ConvergeFlags* f, const std::string& group);

// Checks them (an error names the flag) and sets the command's aid, quota,
// stall rounds and post-copy mode. Call after the command's verify fields
// are set (post-copy verifies once every page has arrived, never before the
// VM runs).
Status ApplyConvergeFlags(const ConvergeFlags& f, transport::MigrateCommand* command);

}  // namespace pmlmig::tools
