// pmlmig run: run a test VM with a workload and report its write rate.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <atomic>
#include <mutex>
#include <thread>

#include "commands.h"
#include "converge_flags.h"
#include "security_flags.h"
#include "pmlmig/base/units.h"
#include "migration_json.h"
#include "pmlmig/engine/migration_controller.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/transport/control.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/vmm/capabilities.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/description.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

struct RunFlags {
  std::string memory = "1G";
  uint32_t vcpus = 1;
  std::string workload = "random";
  std::vector<std::string> vcpu_workloads;  // "N=SPEC" each, checked against vcpus in Run
  std::string fill = "random";
  uint64_t seed = vmm::TestGuestConfig{}.seed;
  std::string duration = "10s";
  bool json = false;
  bool check = false;
  bool huge_pages = false;
  bool no_irqchip = false;
  bool quiet = false;
  std::string tracker;         // default: none, or ring when migrating
  uint32_t ring_entries = 0;  // 0: the default, 65536 or the host's maximum
  // Migration.
  std::string migrate_to;
  std::string migrate_after = "1s";
  uint32_t downtime_limit_ms = 300;
  uint32_t max_rounds = 50;
  std::string timeout = "0";
  std::string on_timeout = "cancel";
  uint32_t streams = transport::DefaultStreams();
  std::string compress = "none";
  std::string data_path = "direct";
  std::string max_bandwidth = "0";
  bool verify = false;
  std::string verify_order = "after-commit";
  std::string linger = "1s";  // the VM keeps running this long after a failed migration
  SecurityFlags security;
  ConvergeFlags converge;
  std::string control;  // unix socket for the control API
  bool local = false;   // same-host handover
  std::string snapshot_to;
  bool live = false;           // snapshot: pre-copy rounds while the VM runs
  bool snapshot_stop = false;  // snapshot: stop the VM once it is written
};

// The dirty ring's size: a power of two in [256, host maximum] (KVM wants at
// least one page of 16-byte entries).
Result<uint32_t> RingEntries(const vmm::Kvm& kvm, uint32_t requested) {
  const vmm::HostCapabilities caps = vmm::ProbeHost(kvm);
  if (!caps.dirty_ring) return Unavailable("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING is 0)");
  const uint32_t max = caps.dirty_ring_max_entries;
  if (requested == 0) return std::min<uint32_t>(65536, max);
  if ((requested & (requested - 1)) != 0 || requested < 256 || requested > max) {
    return InvalidArgument("--ring-entries " + std::to_string(requested) +
                           ": must be a power of two from 256 to this host's maximum of " + std::to_string(max));
  }
  return requested;
}

// The per-vCPU overrides as the --json outputs show them: {"2": "random:rate=1000"}.
nlohmann::ordered_json VcpuWorkloadsJson(const vmm::TestGuestConfig& guest) {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [vcpu, spec] : guest.vcpu_workloads) out[std::to_string(vcpu)] = spec.ToString();
  return out;
}

std::string Rate(double pages_per_second) {
  char buf[32];
  if (pages_per_second >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", pages_per_second / 1e6);
  else if (pages_per_second >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", pages_per_second / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", pages_per_second);
  return buf;
}

// The control API of a running VM, over the engine's MigrationController.
class RunControl final : public transport::ControlHandler {
 public:
  RunControl(engine::MigrationController& controller, vmm::Machine& m) : controller_(controller), m_(m) {}

  Status StartMigration(const transport::MigrateCommand& c) override {
    auto sink = transport::SinkFor(c);
    if (!sink.ok()) return sink.status();
    engine::MigrationCallbacks callbacks;
    const bool stop = c.snapshot_stop;
    callbacks.on_done = [this, stop, what = c.snapshot_to.empty() ? "migration" : "snapshot"](const engine::MigrationStats& st) {
      std::fprintf(stderr, "pmlmig run: control API: %s %s%s%s\n", what, std::string(engine::OutcomeName(st.outcome)).c_str(),
                   st.error.empty() ? "" : ": ", ErrorWithAdvice(st).c_str());
      if (stop && st.source_kept) stop_requested_.store(true);  // the snapshot is written: the run ends
    };
    PMLMIG_RETURN_IF_ERROR(controller_.Start(std::move(*sink), transport::MigrationOptionsFor(c), std::move(callbacks)));
    if (c.snapshot_to.empty()) std::fprintf(stderr, "pmlmig run: control API: migrating to %s\n", c.to.c_str());
    else std::fprintf(stderr, "pmlmig run: control API: writing a snapshot to %s\n", c.snapshot_to.c_str());
    return Status::Ok();
  }
  // A snapshot asked to stop the VM once written has completed.
  bool stop_requested() const { return stop_requested_.load(); }

  transport::ControlStatus GetStatus() override {
    transport::ControlStatus s;
    for (const vmm::VcpuStats& v : m_.Stats()) s.pages_written += v.pages_written;
    const engine::ControllerStatus cs = controller_.status();
    s.vm = cs.vm == engine::VmPlacement::kHere && !m_.error().ok() ? "failed"
                                                                  : std::string(engine::VmPlacementName(cs.vm));
    if (cs.active) {
      const engine::MigrationProgress& p = cs.progress;
      s.migration = "active";
      s.phase = engine::PhaseName(p.phase);
      s.round = p.round;
      s.remaining_pages = p.remaining_pages;
      s.bandwidth_mbps = p.bandwidth_mbps;
      s.expected_downtime_ms = p.expected_downtime_ms;
      s.sent_bytes = p.wire_bytes;
      s.elapsed_ms = p.elapsed_ms;
      s.throttle_pct = p.throttle_pct;
      s.vcpu_quota_pages_per_s = p.vcpu_quota_pages_per_s;
      s.postcopy_requests = p.postcopy_requests;
      s.vcpus = p.vcpus;
    } else if (cs.last != engine::Outcome::kNone) {
      s.migration = engine::OutcomeName(cs.last);
      s.error = ErrorWithAdvice(cs.last_stats);
      s.stats_json = MigrationStatsJson(cs.last_stats).dump();
    }
    return s;
  }

  Status CancelMigration() override { return controller_.Cancel(); }

 private:
  engine::MigrationController& controller_;
  vmm::Machine& m_;
  std::atomic<bool> stop_requested_{false};
};

// Migrates the running VM; prints the statistics; 0 only when completed.
int Migrate(const RunFlags& f, const vmm::MachineOptions& options, vmm::Machine& m, engine::DirtyTracker& tracker,
            const transport::MigrateCommand& command, std::chrono::steady_clock::time_point vm_start,
            std::chrono::nanoseconds linger, std::chrono::nanoseconds run_for) {
  auto sink = transport::SinkFor(command);
  if (!sink.ok()) return PrintError(sink.status().message()), kExitFailure;
  const std::vector<vmm::VcpuStats> before = m.Stats();
  engine::MigrationController controller(m, tracker, vmm::EncodeTestVmDescription(options));
  const bool tty = isatty(STDERR_FILENO) != 0;
  engine::MigrationCallbacks callbacks;
  if (!f.quiet) {
    if (!command.snapshot_to.empty()) {
      std::fprintf(stderr, "pmlmig run: writing a snapshot to %s (%s; then the VM %s)\n", command.snapshot_to.c_str(),
                   command.live ? "live: pre-copy rounds while the VM runs" : "the VM paused while it is written",
                   command.snapshot_stop ? "stops" : "runs on");
    } else if (command.local) {
      std::fprintf(stderr, "pmlmig run: handing the VM over to %s (same host: its memory is shared, not copied%s)\n",
                   f.migrate_to.c_str(), f.verify ? ", verify" : "");
    } else std::fprintf(stderr, "pmlmig run: migrating to %s (tracker %s, %u stream%s, compress %s%s%s)\n",
                 f.migrate_to.c_str(), std::string(tracker.name()).c_str(), f.streams, f.streams == 1 ? "" : "s",
                 f.compress.c_str(), f.max_bandwidth != "0" ? (", max " + f.max_bandwidth + "B/s").c_str() : "",
                 f.verify ? ", verify" : "");
    callbacks.on_progress = [tty](const engine::MigrationProgress& p) {
      std::fprintf(stderr, tty ? "\r%-110s" : "%s\n", ProgressLine(p).c_str());
      if (tty && p.phase == engine::Phase::kDone) std::fputc('\n', stderr);
    };
  }
  // The guest's counters when the VM paused for the switch. After a handover
  // its statistics page is the target's (the memory is shared): reading it
  // later would count the target's writes as this side's.
  std::vector<vmm::VcpuStats> at_pause;
  callbacks.on_progress = [show = std::move(callbacks.on_progress), &m, &at_pause](const engine::MigrationProgress& p) {
    if (p.phase == engine::Phase::kStopAndCopy && at_pause.empty()) at_pause = m.Stats();
    if (show) show(p);
  };
  if (Status s = controller.Start(std::move(*sink), transport::MigrationOptionsFor(command), std::move(callbacks));
      !s.ok()) {
    return PrintError(s.message()), kExitFailure;
  }
  // Ctrl-C cancels the migration (the VM stays here).
  while (controller.busy()) {
    if (Interrupted()) {
      if (Status s = controller.Cancel(); !s.ok()) PrintError("not cancelled: " + s.message());
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const engine::MigrationStats stats = controller.Wait();
  const std::vector<vmm::VcpuStats> after = stats.shared_memory && !at_pause.empty() ? at_pause : m.Stats();
  // Failed or cancelled: the source resumed the VM; it keeps running here
  // (for --linger, so the report can show it running) before the run ends.
  // A snapshot made: the VM runs on for the rest of --duration, unless asked
  // to stop.
  const bool failed_here = stats.outcome == engine::Outcome::kFailed || stats.outcome == engine::Outcome::kCancelled;
  const bool runs_on = stats.source_kept && !command.snapshot_stop;
  const std::string outcome(engine::OutcomeName(stats.outcome));
  std::vector<vmm::VcpuStats> lingered = after;
  if ((failed_here || runs_on) && !Interrupted()) {
    auto until = std::chrono::steady_clock::now() + linger;
    if (runs_on) {
      // The rest of --duration, and at least --linger, so the report shows it running on.
      until = run_for.count() == 0 ? std::chrono::steady_clock::time_point::max()
                                   : std::max(vm_start + run_for, std::chrono::steady_clock::now() + linger);
      if (!f.quiet) std::fprintf(stderr, "pmlmig run: snapshot written to %s; the VM runs on%s\n", command.snapshot_to.c_str(),
                                 run_for.count() == 0 ? " until Ctrl-C" : " until --duration ends");
    } else if (!f.quiet) {
      std::fprintf(stderr, "pmlmig run: migration %s; the VM keeps running here (for %s more)\n", outcome.c_str(),
                   f.linger.c_str());
    }
    while (std::chrono::steady_clock::now() < until && !Interrupted() && m.error().ok()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    lingered = m.Stats();
  }
  // The whole run here, the time the VM ran on after the migration included.
  const double ran = std::chrono::duration<double>(std::chrono::steady_clock::now() - vm_start).count();
  // Verified after commit and found different: the target runs a VM whose
  // memory is not the source's. This paused copy is the only right one, so
  // it stays until the user drops it.
  const bool mismatch = stats.outcome == engine::Outcome::kCompleted &&
                        stats.verification.verdict == engine::VerifyVerdict::kMismatch;
  if (mismatch) {
    std::fprintf(stderr,
                 "pmlmig run: VERIFICATION FAILED after the target resumed: %s\n"
                 "pmlmig run: this process keeps the source's paused copy of the VM (pid %d); stop the target's VM, "
                 "then press Ctrl-C or send SIGTERM here to drop this copy\n",
                 stats.verification.detail.c_str(), static_cast<int>(::getpid()));
    while (!Interrupted()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Post-copy broke after the switch: the VM ran on the target, which could
  // not get its pages and discarded it. This paused copy is the VM as of the
  // switch; resuming it would roll the guest back, so that is the user's call.
  if (stats.outcome == engine::Outcome::kPostcopyFailed) {
    std::fprintf(stderr,
                 "pmlmig run: POST-COPY FAILED after the switch: %s\n"
                 "pmlmig run: the VM's run on the target since the switch is lost; this process keeps its paused "
                 "copy as of the switch (pid %d); press Ctrl-C or send SIGTERM here to drop it\n",
                 stats.error.c_str(), static_cast<int>(::getpid()));
    while (!Interrupted()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  m.Stop();  // completed: the VM lives on the target; in doubt: it stays paused and ends with this process
  if (f.json) {
    nlohmann::ordered_json out = MigrationStatsJson(stats);
    uint64_t written = 0;
    nlohmann::ordered_json vcpus = nlohmann::ordered_json::array();
    for (size_t i = 0; i < after.size(); ++i) {
      written += lingered[i].pages_written;
      vcpus.push_back({{"id", i}, {"pages_written", lingered[i].pages_written},
                       {"pages_written_during_migration", after[i].pages_written - before[i].pages_written},
                       {"pages_written_after_migration", lingered[i].pages_written - after[i].pages_written}});
    }
    if (!command.snapshot_to.empty()) {
      // The file this snapshot wrote; after a failure, what is there is an older one's, if any.
      struct stat st{};
      const bool exists = stats.outcome == engine::Outcome::kCompleted && ::stat(command.snapshot_to.c_str(), &st) == 0;
      out["snapshot"] = {{"path", command.snapshot_to}, {"live", command.live},
                         {"file_bytes", exists ? nlohmann::ordered_json(st.st_size) : nlohmann::ordered_json(nullptr)},
                         {"allocated_bytes", exists ? nlohmann::ordered_json(uint64_t(st.st_blocks) * 512)
                                                    : nlohmann::ordered_json(nullptr)}};
    }
    out["tracker"] = std::string(tracker.name());
    out["streams"] = f.streams;
    out["compress"] = f.compress;
    out["memory_bytes"] = options.guest.memory_bytes;
    out["workload"] = options.guest.workload.ToString();
    out["vcpu_workloads"] = VcpuWorkloadsJson(options.guest);
    out["pages_written"] = written;
    out["source_run_s"] = ran;
    out["source_vm_error"] = m.error().ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(m.error().message());
    out["vcpus"] = vcpus;
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::fputs(MigrationStatsText(stats).c_str(), stdout);
  }
  if (stats.outcome == engine::Outcome::kPostcopyFailed) {
    PrintError("migration failed in post-copy: " + stats.error);
    return kExitPostcopyFailed;
  }
  if (stats.outcome == engine::Outcome::kInDoubt) {
    PrintError("migration in doubt: " + stats.error);
    return kExitInDoubt;
  }
  if (stats.outcome == engine::Outcome::kCancelled && Interrupted()) {
    PrintError("migration cancelled by Ctrl-C (or SIGTERM); the VM kept running here");
    return kExitInterrupted;
  }
  if (stats.outcome != engine::Outcome::kCompleted) {
    PrintError("migration " + outcome + ": " + ErrorWithAdvice(stats) + " (the VM kept running here)");
    return kExitFailure;
  }
  if (mismatch) {
    PrintError("migrated, but verification failed: " + stats.verification.detail);
    return kExitMismatch;
  }
  return kExitOk;
}

// The migration (or handover, or snapshot) a run's flags ask for, every flag
// checked; an error is a usage error naming the flag.
Result<transport::MigrateCommand> MigrateCommandOf(const RunFlags& f, engine::TrackerKind tracker) {
  transport::MigrateCommand command;
  auto timeout = ParseDuration(f.timeout);
  if (!timeout.ok()) return InvalidArgument("--timeout: " + timeout.status().message());
  if (f.on_timeout != "cancel" && f.on_timeout != "force") {
    return InvalidArgument("--on-timeout: '" + f.on_timeout + "' is not cancel or force");
  }
  auto bw = ParseSize(f.max_bandwidth);
  if (!bw.ok()) return InvalidArgument("--max-bandwidth: " + bw.status().message());
  if (auto compress = transport::ParseCompression(f.compress); !compress.ok()) {
    return InvalidArgument("--compress: " + compress.status().message());
  }
  if (f.verify_order != "after-commit" && f.verify_order != "before-commit") {
    return InvalidArgument("--verify-order: '" + f.verify_order + "' is not before-commit or after-commit");
  }
  if (f.streams == 0 || f.streams > transport::kMaxStreams) {
    return InvalidArgument("--streams: " + std::to_string(f.streams) + " is outside 1.." +
                           std::to_string(transport::kMaxStreams));
  }
  command.to = f.migrate_to;
  command.streams = f.streams;
  command.compress = f.compress;
  command.grpc_data = f.data_path == "grpc";
  command.max_bandwidth = *bw;
  command.downtime_limit_ms = f.downtime_limit_ms;
  command.max_rounds = f.max_rounds;
  command.timeout_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(*timeout).count());
  command.force_on_timeout = f.on_timeout == "force";
  command.verify = f.verify;
  command.verify_order =
      f.verify_order == "before-commit" ? engine::VerifyOrder::kBeforeCommit : engine::VerifyOrder::kAfterCommit;
  PMLMIG_RETURN_IF_ERROR(ApplyConvergeFlags(f.converge, &command));
  if (command.aid == engine::ConvergeAid::kDirtyLimit && tracker != engine::TrackerKind::kRing) {
    return InvalidArgument("--dirty-limit needs --tracker ring: only the dirty ring says which vCPU wrote a page "
                           "(use --auto-converge with the bitmap)");
  }
  command.tls_ca = f.security.tls_ca;
  command.tls_cert = f.security.tls_cert;
  command.tls_key = f.security.tls_key;
  command.tls_server_name = f.security.tls_server_name;
  command.token_file = f.security.token_file;
  command.local = f.local;
  command.snapshot_to = f.snapshot_to;
  command.live = f.live;
  command.snapshot_stop = f.snapshot_stop;
  if (f.local && (command.aid != engine::ConvergeAid::kNone || command.postcopy != engine::PostcopyMode::kOff)) {
    return InvalidArgument("--local hands the memory over without copying it: --dirty-limit, --auto-converge and "
                           "--postcopy do not apply");
  }
  PMLMIG_RETURN_IF_ERROR(transport::SinkFor(command).status());  // the sink's own checks (files, addresses)
  return command;
}

// What run's flags ask for, every flag checked before anything starts
// (InvalidArgument naming the flag: a usage error).
struct RunPlan {
  vmm::MachineOptions options;
  std::chrono::nanoseconds duration{0}, linger{0}, migrate_after{0};
  engine::TrackerKind tracker = engine::TrackerKind::kNone;
  bool migrating = false;  // --migrate-to or --snapshot-to
  transport::MigrateCommand command;
};

Result<RunPlan> PlanRun(const RunFlags& f) {
  RunPlan plan;
  vmm::MachineOptions& options = plan.options;
  auto memory = ParseSize(f.memory);
  if (!memory.ok()) return InvalidArgument("--memory: " + memory.status().message());
  auto workload = vmm::ParseWorkload(f.workload);
  if (!workload.ok()) return InvalidArgument("--workload: " + workload.status().message());
  auto vcpu_workloads = vmm::ParseVcpuWorkloads(f.vcpu_workloads, f.vcpus);
  if (!vcpu_workloads.ok()) return InvalidArgument("--vcpu-workload: " + vcpu_workloads.status().message());
  auto fill = vmm::ParseFillMode(f.fill);
  if (!fill.ok()) return InvalidArgument("--fill: " + fill.status().message());
  auto duration = ParseDuration(f.duration);
  if (!duration.ok()) return InvalidArgument("--duration: " + duration.status().message());
  plan.duration = *duration;
  if (auto layout = vmm::PcLayout(*memory); !layout.ok()) {
    return InvalidArgument("--memory: " + layout.status().message());
  }
  if (*fill == vmm::FillMode::kRandom) {
    const uint64_t avail = HostAvailableMemory();
    if (avail != 0 && *memory > avail / 10 * 9) {
      return InvalidArgument("--fill random needs " + FormatBytes(*memory) + " of host memory but only " +
                             FormatBytes(avail) + " is available; use --fill zero or a smaller --memory");
    }
  }
  options.guest.memory_bytes = *memory;
  options.guest.vcpus = f.vcpus;
  options.guest.workload = *workload;
  options.guest.vcpu_workloads = *vcpu_workloads;
  options.guest.fill = *fill;
  options.guest.seed = f.seed;
  options.irqchip = !f.no_irqchip;
  options.huge_pages = f.huge_pages;

  const bool snapshotting = !f.snapshot_to.empty();
  if (snapshotting && !f.migrate_to.empty()) return InvalidArgument("choose --migrate-to or --snapshot-to");
  if (f.check && (snapshotting || !f.migrate_to.empty())) {
    return InvalidArgument("--check checks the VM at the end of a run in this process; after --migrate-to the "
                           "target checks it (receive --verify), after --snapshot-to 'pmlmig restore' does");
  }
  if (!snapshotting && (f.live || f.snapshot_stop)) return InvalidArgument("--live and --snapshot-stop need --snapshot-to");
  const bool migrating = !f.migrate_to.empty() || snapshotting;
  plan.migrating = migrating;
  auto linger = ParseDuration(f.linger);
  if (!linger.ok()) return InvalidArgument("--linger: " + linger.status().message());
  plan.linger = *linger;
  const bool can_migrate = migrating || !f.control.empty();
  auto tracker_kind = engine::ParseTrackerKind(f.tracker.empty() ? (can_migrate ? "ring" : "none") : f.tracker);
  if (!tracker_kind.ok()) return InvalidArgument("--tracker: " + tracker_kind.status().message());
  plan.tracker = *tracker_kind;
  if (f.ring_entries != 0 && *tracker_kind != engine::TrackerKind::kRing) {
    return InvalidArgument("--ring-entries needs --tracker ring");
  }
  if (!f.control.empty() && *tracker_kind == engine::TrackerKind::kNone) {
    return InvalidArgument("--control needs a tracker (ring, bitmap or bitmap-clear) for migrations");
  }
  // Migration flags, all checked before anything starts.
  if (migrating) {
    if (*tracker_kind == engine::TrackerKind::kNone) {
      return InvalidArgument("--migrate-to and --snapshot-to need a tracker (ring, bitmap or bitmap-clear)");
    }
    auto after = ParseDuration(f.migrate_after);
    if (!after.ok()) return InvalidArgument("--migrate-after: " + after.status().message());
    plan.migrate_after = *after;
    auto c = MigrateCommandOf(f, *tracker_kind);
    if (!c.ok()) return InvalidArgument(c.status().message());
    plan.command = std::move(*c);
  } else if (f.local) {
    return InvalidArgument("--local needs --migrate-to unix:PATH");
  } else if (f.verify || f.streams != transport::DefaultStreams() || f.compress != "none" || f.max_bandwidth != "0") {
    return InvalidArgument("--verify, --streams, --compress and --max-bandwidth need --migrate-to");
  }
  return plan;
}

// What a run without a migration ended with, for ReportRun.
struct RunOutcome {
  Status failure;
  double elapsed = 0, setup_s = 0;
  uint32_t ring_entries = 0;
  engine::TrackerStats tstats;
  std::vector<vmm::VcpuStats> stats;
  nlohmann::ordered_json check;  // null without --check
  bool collected_per_second = false;
};

// Prints a run's summary (--json or text); its exit code.
int ReportRun(const RunFlags& f, const RunPlan& plan, const RunOutcome& o) {
  const vmm::MachineOptions& options = plan.options;
  uint64_t total = 0;
  nlohmann::ordered_json vcpus = nlohmann::ordered_json::array();
  for (size_t i = 0; i < o.stats.size(); ++i) {
    total += o.stats[i].pages_written;
    vcpus.push_back({{"id", i},
                     {"pages_written", o.stats[i].pages_written},
                     {"pages_per_second", static_cast<double>(o.stats[i].pages_written) / o.elapsed},
                     {"loops", o.stats[i].loops},
                     {"started", o.stats[i].started}});
  }
  nlohmann::ordered_json out = {
      {"status", o.failure.ok() ? (Interrupted() ? "interrupted" : "completed") : "failed"},
      {"duration_s", o.elapsed},
      {"pages_written", total},
      {"pages_per_second", static_cast<double>(total) / o.elapsed},
      {"bytes_written_per_second", static_cast<double>(total) * 4096.0 / o.elapsed},
      {"memory_bytes", options.guest.memory_bytes},
      {"workload", options.guest.workload.ToString()},
      {"vcpu_workloads", VcpuWorkloadsJson(options.guest)},
      {"fill", f.fill},
      {"setup_s", o.setup_s},
      {"tracker", std::string(engine::TrackerKindName(plan.tracker))},
      {"pages_collected", o.tstats.pages_collected},
      {"collect_ms_total", static_cast<double>(o.tstats.collect_ns_total) / 1e6},
      {"collections", o.tstats.collections},
      {"ring_entries", o.ring_entries},
      {"ring_full_exits", o.tstats.ring_full_exits},
      {"ring_overflows", o.tstats.overflows},
      {"peak_rss_bytes", PeakRssBytes()},
      {"vcpus", vcpus},
      {"check", o.check},
      {"error", o.failure.ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(o.failure.message())},
  };
  if (f.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("Summary: %.2f s, %" PRIu64 " pages written (%s pages/s, %s/s of dirtied pages), peak RSS %s\n",
                o.elapsed, total, Rate(static_cast<double>(total) / o.elapsed).c_str(),
                FormatBytes(static_cast<uint64_t>(static_cast<double>(total) * 4096.0 / o.elapsed)).c_str(),
                FormatBytes(PeakRssBytes()).c_str());
    for (size_t i = 0; i < o.stats.size(); ++i) {
      // With per-vCPU workloads, each line says which one it measured.
      const std::string which = options.guest.vcpu_workloads.empty()
                                    ? ""
                                    : ", workload " + options.guest.WorkloadOf(static_cast<uint32_t>(i)).ToString();
      std::printf("  vcpu %zu: %" PRIu64 " pages (%s pages/s), %" PRIu64 " loops%s\n", i, o.stats[i].pages_written,
                  Rate(static_cast<double>(o.stats[i].pages_written) / o.elapsed).c_str(), o.stats[i].loops, which.c_str());
    }
    if (o.collected_per_second) {
      std::printf("  tracker %s: %" PRIu64 " pages collected in %" PRIu64 " collections, %.2f ms collecting",
                  std::string(engine::TrackerKindName(plan.tracker)).c_str(), o.tstats.pages_collected, o.tstats.collections,
                  static_cast<double>(o.tstats.collect_ns_total) / 1e6);
      if (o.ring_entries != 0) {
        std::printf(", %" PRIu64 " ring-full exits, %" PRIu64 " overflows", o.tstats.ring_full_exits, o.tstats.overflows);
      }
      std::printf("\n");
    }
    if (!o.check.is_null()) {
      std::printf("  memory check: %s, %" PRIu64 " pages checked, %" PRIu64 " stamped\n",
                  o.check["ok"].get<bool>() ? "passed" : "FAILED", o.check["pages_checked"].get<uint64_t>(),
                  o.check["pages_stamped"].get<uint64_t>());
    }
  }
  if (!o.failure.ok()) {
    PrintError(o.failure.message());
    return kExitFailure;
  }
  return Interrupted() ? kExitInterrupted : kExitOk;
}

int Run(const RunFlags& f) {
  Result<RunPlan> planned = PlanRun(f);
  if (!planned.ok()) return PrintError(planned.status().message()), kExitUsage;
  RunPlan& plan = *planned;
  vmm::MachineOptions& options = plan.options;
  const bool migrating = plan.migrating;
  const transport::MigrateCommand& command = plan.command;
  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  uint32_t ring_entries = 0;
  if (plan.tracker == engine::TrackerKind::kRing) {
    auto entries = RingEntries(*kvm, f.ring_entries);
    if (!entries.ok()) {
      PrintError(entries.status().message());
      return entries.status().code() == Code::kInvalidArgument ? kExitUsage : kExitFailure;
    }
    ring_entries = *entries;
    options.dirty_ring_bytes = ring_entries * static_cast<uint32_t>(sizeof(kvm_dirty_gfn));
  }
  InstallInterruptHandler();
  const auto t_setup = std::chrono::steady_clock::now();
  auto machine = vmm::Machine::Create(*kvm, options);
  if (!machine.ok()) return PrintError(machine.status().message()), kExitFailure;
  vmm::Machine& m = **machine;
  auto tracker = engine::CreateTracker(plan.tracker, m, {});
  if (!tracker.ok()) return PrintError(tracker.status().message()), kExitFailure;
  engine::DirtySet collected(m.memory_slots());
  // When migrating (now or through the control API), the migration owns the
  // tracker (it enables it before round 0); otherwise it collects once a
  // second from the start.
  std::unique_ptr<engine::MigrationController> controller;
  std::unique_ptr<RunControl> control;
  std::unique_ptr<transport::ControlServer> control_server;
  auto migrated = [&] { return controller && controller->status().vm == engine::VmPlacement::kMigrated; };
  if (!f.control.empty()) {
    controller = std::make_unique<engine::MigrationController>(m, **tracker, vmm::EncodeTestVmDescription(options));
    control = std::make_unique<RunControl>(*controller, m);
    auto server = transport::ControlServer::Start(f.control, *control);
    if (!server.ok()) return PrintError(server.status().message()), kExitFailure;
    control_server = std::move(*server);
  }
  engine::DirtyTracker* per_second = migrating || control ? nullptr : tracker->get();
  if (per_second != nullptr) {
    if (Status s = per_second->Enable(); !s.ok()) return PrintError(s.message()), kExitFailure;
  }
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_setup).count();
  if (!f.quiet) {
    const std::string ring = ring_entries ? " (" + std::to_string(ring_entries) + " entries)" : "";
    std::fprintf(stderr, "pmlmig run: %s guest, %u vCPU%s, workload %s, fill %s, tracker %s%s (setup %.2f s)%s\n",
                 FormatBytes(options.guest.memory_bytes).c_str(), f.vcpus, f.vcpus == 1 ? "" : "s",
                 vmm::DescribeWorkloads(options.guest.workload, options.guest.vcpu_workloads).c_str(), f.fill.c_str(), std::string(engine::TrackerKindName(plan.tracker)).c_str(), ring.c_str(), setup_s,
                 plan.duration.count() == 0 ? "; Ctrl-C to stop" : "");
  }

  if (Status s = m.Start(); !s.ok()) return PrintError(s.message()), kExitFailure;
  const auto start = std::chrono::steady_clock::now();
  const auto end = migrating ? start + plan.migrate_after : start + plan.duration;
  auto last_tick = start;
  std::vector<vmm::VcpuStats> last = m.Stats();
  Status failure;
  while (!Interrupted()) {
    const auto now = std::chrono::steady_clock::now();
    if ((migrating || plan.duration.count() != 0) && now >= end) break;
    if (failure = m.error(); !failure.ok()) break;
    if (migrated()) break;
    if (control && control->stop_requested()) break;
    auto next = std::min(last_tick + std::chrono::seconds(1),
                         migrating || plan.duration.count() != 0 ? end : now + std::chrono::seconds(1));
    std::this_thread::sleep_until(std::min(next, now + std::chrono::milliseconds(100)));
    if (std::chrono::steady_clock::now() - last_tick >= std::chrono::seconds(1)) {
      uint64_t pages_collected = 0;
      double collect_ms = 0;
      if (per_second != nullptr) {
        const auto c0 = std::chrono::steady_clock::now();
        if (failure = per_second->Collect(collected); !failure.ok()) break;
        collect_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
        pages_collected = collected.Count();
        collected.Clear();
      }
      const auto t = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(t - last_tick).count();
      std::vector<vmm::VcpuStats> cur = m.Stats();
      std::string line;
      char head[48];
      std::snprintf(head, sizeof head, "[%6.1fs] writes/s:", std::chrono::duration<double>(t - start).count());
      line = head;
      double total = 0;
      for (size_t i = 0; i < cur.size(); ++i) {
        const double r = static_cast<double>(cur[i].pages_written - last[i].pages_written) / dt;
        total += r;
        if (cur.size() > 1) line += " vcpu" + std::to_string(i) + " " + Rate(r);
      }
      line += (cur.size() > 1 ? "  total " : " ") + Rate(total) + " pages/s";
      if (per_second != nullptr) {
        char col[96];
        std::snprintf(col, sizeof col, "  | collected %" PRIu64 " pages in %.2f ms", pages_collected, collect_ms);
        line += col;
      }
      if (!f.quiet) std::fprintf(stderr, "%s\n", line.c_str());
      last = std::move(cur);
      last_tick = t;
    }
  }
  if (migrating && failure.ok() && !Interrupted()) {
    return Migrate(f, options, m, **tracker, command, start, plan.linger, plan.duration);
  }
  if (controller) {
    (void)controller->Cancel();  // a migration still in progress is cancelled: the VM stays here
    const engine::MigrationStats st = controller->Wait();
    // A 'pmlmig migrate' or 'pmlmig snapshot --stop' polls every 200 ms:
    // let it read the outcome first.
    if (migrated() || control->stop_requested()) std::this_thread::sleep_for(std::chrono::seconds(1));
    control_server.reset();
    if (migrated()) {
      m.Stop();
      if (f.json) {
        std::printf("%s\n", MigrationStatsJson(st).dump().c_str());
      } else {
        std::fputs(MigrationStatsText(st).c_str(), stdout);
      }
      return kExitOk;
    }
  }
  const Status paused = m.Pause();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failure.ok()) failure = paused;
  engine::TrackerStats tstats;
  if (per_second != nullptr) {
    // The final, complete collection with the vCPUs paused.
    Status s = (*tracker)->Collect(collected);
    if (failure.ok()) failure = s;
    tstats = (*tracker)->stats();
    if (Status d = (*tracker)->Disable(); failure.ok()) failure = d;
  }
  const std::vector<vmm::VcpuStats> stats = m.Stats();

  nlohmann::ordered_json check = nullptr;
  if (f.check && failure.ok()) {
    std::vector<uint64_t> counters;
    for (const auto& s : stats) counters.push_back(s.pages_written);
    const vmm::CheckReport report = vmm::CheckGuestMemory(m.memory(), options.guest, counters);
    check = {{"ok", report.ok()}, {"pages_checked", report.pages_checked},
             {"pages_stamped", report.pages_stamped}, {"pages_bad", report.pages_bad}};
    if (!report.ok()) failure = report.ToStatus();
  }
  m.Stop();

  RunOutcome o{failure, elapsed, setup_s, ring_entries, tstats, stats, check, per_second != nullptr};
  return ReportRun(f, plan, o);
}

}  // namespace

Command RegisterRun(CLI::App& app) {
  auto f = std::make_shared<RunFlags>();
  auto* cmd = app.add_subcommand("run", "Run a test VM with a write workload and report its write rate");
  cmd->add_option("--memory", f->memory, "Guest RAM: multiple of 2M, 2M to 256G (K, M, G suffixes)")
      ->capture_default_str();
  cmd->add_option("--vcpus", f->vcpus, "Number of vCPUs")->check(CLI::Range(1, PMLMIG_MAX_VCPUS))->capture_default_str();
  cmd->add_option("--workload", f->workload,
                  "idle | seq | random | hotset:fraction=F,share=S; each may add rate=PAGES_PER_SECOND per vCPU "
                  "(e.g. hotset:fraction=0.05,share=0.9,rate=20000)")
      ->capture_default_str();
  cmd->add_option("--vcpu-workload", f->vcpu_workloads,
                  "N=SPEC: vCPU N (0 to --vcpus minus 1) runs SPEC instead of --workload, in its same share of "
                  "memory; repeat for more vCPUs (e.g. --vcpus 3 --workload hotset:fraction=0.0625,share=0.9 "
                  "--vcpu-workload 2=random:rate=1000)")
      ->allow_extra_args(false);
  cmd->add_option("--fill", f->fill, "Initial guest memory: random (seeded, incompressible) or zero")
      ->capture_default_str();
  cmd->add_option("--seed", f->seed, "Seed of the fill and of the workload's random choices")->capture_default_str();
  cmd->add_option("--duration", f->duration, "How long to run (ms, s, m); 0 = until Ctrl-C")->capture_default_str();
  cmd->add_flag("--json", f->json, "Print the summary as one JSON object on stdout (progress stays on stderr)");
  cmd->add_flag("--check", f->check, "Check every page of guest memory after the run");
  cmd->add_flag("--huge-pages", f->huge_pages, "Back guest RAM with transparent huge pages");
  cmd->add_flag("--no-irqchip", f->no_irqchip, "Do not create KVM's in-kernel interrupt controller");
  cmd->add_flag("--quiet,-q", f->quiet, "No progress lines");
  cmd->add_option("--tracker", f->tracker,
                  "Dirty tracking while the guest runs: ring (KVM dirty ring, the PML path), bitmap "
                  "(KVM_GET_DIRTY_LOG), bitmap-clear (GET + KVM_CLEAR_DIRTY_LOG) or none; collects once a second")
      ->capture_default_str();
  cmd->add_option("--ring-entries", f->ring_entries,
                  "Dirty ring entries per vCPU: a power of two, 256 to the host maximum (default 65536)");
  auto* mig = "Live migration";
  const CLI::Validator non_empty(
      [](std::string& s) { return s.empty() ? std::string("must not be empty") : std::string(); }, "");
  cmd->add_option("--migrate-to", f->migrate_to,
                  "Migrate the VM to a 'pmlmig receive' at HOST:PORT (or, with --local, at unix:PATH)")
      ->check(non_empty)
      ->group(mig);
  cmd->add_flag("--local", f->local,
                "Same-host handover: the receiver at unix:PATH takes the guest's memory itself (shared, no page "
                "copied); only the vCPU state moves, while the VM is paused")
      ->group(mig);
  cmd->add_option("--migrate-after", f->migrate_after, "Run this long before migrating (or snapshotting)")
      ->capture_default_str()
      ->group(mig);
  const char* snap = "Snapshot";
  cmd->add_option("--snapshot-to", f->snapshot_to,
                  "Write a snapshot of the VM to FILE (replaced only once the new one is complete; 'pmlmig restore "
                  "FILE' brings it back), then let the VM run on for the rest of --duration (at least --linger)")
      ->check(non_empty)
      ->group(snap);
  cmd->add_flag("--live", f->live,
                "With --snapshot-to: pre-copy rounds into the file while the VM runs, paused only for the last "
                "pages (default: paused for the whole write)")
      ->group(snap);
  cmd->add_flag("--snapshot-stop", f->snapshot_stop, "With --snapshot-to: stop the VM once the snapshot is complete")
      ->group(snap);
  cmd->add_option("--downtime-limit", f->downtime_limit_ms, "Switch over once the expected downtime is at most this (ms)")
      ->capture_default_str()->group(mig);
  cmd->add_option("--max-rounds", f->max_rounds, "Live rounds before acting on --on-timeout")->capture_default_str()->group(mig);
  cmd->add_option("--timeout", f->timeout, "Give the migration at most this long (0 = no limit)")->capture_default_str()->group(mig);
  cmd->add_option("--on-timeout", f->on_timeout, "cancel (keep the VM here) or force (switch over anyway)")
      ->capture_default_str()->group(mig);
  cmd->add_option("--streams", f->streams, "Parallel data streams (1-64; the default is half this machine's CPUs, 2 to 8)")
      ->capture_default_str()
      ->group(mig);
  cmd->add_option("--compress", f->compress, "none, lz4 or zstd")->capture_default_str()->group(mig);
  AddDataPathFlag(cmd, &f->data_path, /*sender=*/true, mig);
  cmd->add_option("--max-bandwidth", f->max_bandwidth, "Bytes per second on the wire (K/M/G = 1024-based), for the pre-copy rounds and post-copy's "
                  "background push; post-copy's answers to the guest's page requests are never held back; 0 = "
                  "unlimited")
      ->capture_default_str()->group(mig);
  cmd->add_option("--linger", f->linger, "After a failed or cancelled migration, keep the VM running this long before the run ends")
      ->capture_default_str()
      ->group(mig);
  AddConvergeFlags(cmd, &f->converge, mig);
  AddSecurityFlags(cmd, &f->security, /*sender=*/true);
  cmd->add_flag("--verify", f->verify,
                "Compare chunk digests of all memory on both sides at the pause point; a mismatch names the ranges")
      ->group(mig);
  cmd->add_option("--verify-order", f->verify_order,
                  "after-commit: the target runs at once, this side compares afterwards and keeps its paused copy "
                  "on a mismatch; before-commit: compare first, a mismatch keeps the VM here")
      ->capture_default_str()
      ->group(mig);
  cmd->add_option("--control", f->control,
                  "Serve the control API on this unix socket (mode 0600) for 'pmlmig migrate/status/cancel'")
      ->group(mig);
  return [f]() { return Run(*f); };
}

}  // namespace pmlmig::tools
