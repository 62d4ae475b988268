#include "converge_flags.h"

#include "pmlmig/base/units.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::tools {

void AddConvergeFlags(CLI::App* cmd, ConvergeFlags* f, const std::string& group) {
  cmd->add_option("--dirty-limit", f->dirty_limit,
                  "When the migration does not converge, cap each vCPU's dirty rate: 'auto' (half the measured "
                  "bandwidth shared between the vCPUs, halved while it still does not converge) or bytes per second "
                  "per vCPU with K/M/G suffixes. Only vCPUs above it are slowed. Needs --tracker ring")
      ->group(group);
  cmd->add_flag("--auto-converge", f->auto_converge,
                "When the migration does not converge, throttle every vCPU: 20% of the time, then 10 more per step, "
                "at most 99% (QEMU's defaults)")
      ->group(group);
  cmd->add_option("--stall-rounds", f->stall_rounds,
                  "Rounds in a row without a smaller dirty set before the migration counts as not converging "
                  "(then: the next throttle step, or --on-timeout; 0 = wait for --max-rounds or --timeout)")
      ->capture_default_str()
      ->group(group);
  cmd->add_option("--postcopy", f->postcopy,
                  "Post-copy: 'auto' pre-copies and, once the rounds do not converge, moves the VM at once and sends "
                  "its remaining pages while it runs on the target (a vCPU that touches a missing page waits for "
                  "it); 'now' moves the VM before any round. The source keeps its paused copy until the target "
                  "holds every page. If the connection breaks in post-copy, the target's VM runs on (a vCPU on a "
                  "missing page waits) while this side reconnects (--postcopy-recovery)")
      ->check(CLI::IsMember({"auto", "now"}))
      ->group(group);
  cmd->add_option("--postcopy-recovery", f->postcopy_recovery,
                  "How long to keep trying to reconnect after the connection breaks in post-copy before the "
                  "migration fails (this side keeps its paused copy either way); 0 = fail at once")
      ->capture_default_str()
      ->group(group);
}

Status ApplyConvergeFlags(const ConvergeFlags& f, transport::MigrateCommand* command) {
  command->stall_rounds = f.stall_rounds;
  {
    auto recovery = ParseDuration(f.postcopy_recovery);
    if (!recovery.ok()) return InvalidArgument("--postcopy-recovery: " + recovery.status().message());
    command->postcopy_recovery_ms =
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(*recovery).count());
  }
  if (!f.postcopy.empty()) {
    command->postcopy = f.postcopy == "now" ? engine::PostcopyMode::kNow : engine::PostcopyMode::kAuto;
    if (command->postcopy == engine::PostcopyMode::kNow && (f.auto_converge || !f.dirty_limit.empty())) {
      return InvalidArgument("--postcopy now sends no pre-copy round, so --dirty-limit and --auto-converge have "
                             "nothing to do (use --postcopy auto to throttle first)");
    }
    if (command->verify && command->verify_order == engine::VerifyOrder::kBeforeCommit) {
      return InvalidArgument("--postcopy: verification runs once every page has arrived, after the VM runs on the "
                             "target; before-commit verification cannot apply (use the default order)");
    }
  }
  if (!f.dirty_limit.empty() && f.auto_converge) {
    return InvalidArgument("--dirty-limit and --auto-converge exclude each other (pick one)");
  }
  if (f.auto_converge) {
    command->aid = engine::ConvergeAid::kAutoConverge;
    return Status::Ok();
  }
  if (f.dirty_limit.empty()) return Status::Ok();
  command->aid = engine::ConvergeAid::kDirtyLimit;
  if (f.dirty_limit == "auto") return Status::Ok();
  auto bytes = ParseSize(f.dirty_limit);
  if (!bytes.ok()) return InvalidArgument("--dirty-limit: " + bytes.status().message() + " (or 'auto')");
  if (*bytes < engine::kPageSize) {
    return InvalidArgument("--dirty-limit: '" + f.dirty_limit + "' is less than one page (4 KiB) per second per vCPU");
  }
  command->dirty_limit_pages_per_s = static_cast<double>(*bytes) / static_cast<double>(engine::kPageSize);
  return Status::Ok();
}

}  // namespace pmlmig::tools
