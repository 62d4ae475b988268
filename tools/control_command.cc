// pmlmig migrate / status / cancel: drive a VM that `pmlmig run --control
// PATH` is running.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.h"
#include "converge_flags.h"
#include "migration_json.h"
#include "security_flags.h"
#include "pmlmig/base/units.h"
#include "pmlmig/transport/control.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/transport/security.h"

namespace pmlmig::tools {
namespace {

struct ControlFlags {
  std::string control;
  bool json = false;
  // migrate
  transport::MigrateCommand command;
  std::string max_bandwidth = "0";
  std::string timeout = "0";
  std::string on_timeout = "cancel";
  SecurityFlags security;
  ConvergeFlags converge;
  std::string snapshot_to;  // `snapshot --to`, made absolute
  std::string data_path = "direct";
};

void AddControlOption(CLI::App* cmd, ControlFlags* f) {
  cmd->add_option("--control", f->control, "The unix socket of a 'pmlmig run --control PATH'")->required();
}

std::string StatusLine(const transport::ControlStatus& s) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "[%7.1fs] %-13s round %u | %s sent | %" PRIu64 " pages to send | %.0f Mbit/s | expected downtime %.1f ms",
                s.elapsed_ms / 1000, s.phase.c_str(), s.round, FormatBytes(s.sent_bytes).c_str(), s.remaining_pages,
                s.bandwidth_mbps, s.expected_downtime_ms);
  std::string out = buf;
  if (s.phase == "postcopy") out += " | post-copy: " + std::to_string(s.postcopy_requests) + " requests answered";
  return out + VcpuRatesText(s.throttle_pct, s.vcpu_quota_pages_per_s, s.vcpus);
}

int Migrate(ControlFlags& f) {
  // What this side can check is a usage error here, as it is for 'run'.
  if (f.command.snapshot_to.empty() && !f.command.local) {
    if (auto a = transport::ParseHostPort(f.command.to); !a.ok()) {
      return PrintError("--to: " + a.status().message()), kExitUsage;
    } else if (a->port == 0) {
      return PrintError("--to: port 0 (expected the receiver's port, 1..65535)"), kExitUsage;
    }
  }
  if (f.command.streams > transport::kMaxStreams) {
    return PrintError("--streams: " + std::to_string(f.command.streams) + " is above " +
                      std::to_string(transport::kMaxStreams)),
           kExitUsage;
  }
  auto bw = ParseSize(f.max_bandwidth);
  if (!bw.ok()) return PrintError("--max-bandwidth: " + bw.status().message()), kExitUsage;
  auto timeout = ParseDuration(f.timeout);
  if (!timeout.ok()) return PrintError("--timeout: " + timeout.status().message()), kExitUsage;
  if (f.on_timeout != "cancel" && f.on_timeout != "force") {
    return PrintError("--on-timeout: '" + f.on_timeout + "' is not cancel or force"), kExitUsage;
  }
  f.command.max_bandwidth = *bw;
  f.command.timeout_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(*timeout).count());
  f.command.force_on_timeout = f.on_timeout == "force";
  f.command.grpc_data = f.data_path == "grpc";
  if (Status s = ApplyConvergeFlags(f.converge, &f.command); !s.ok()) return PrintError(s.message()), kExitUsage;
  // Checked here for a clear error; the VM's process reads the files again.
  if (auto sec = LoadSecurity(f.security); !sec.ok()) return PrintError(sec.status().message()), kExitUsage;
  const SecurityFlags abs = AbsolutePaths(f.security);
  f.command.tls_ca = abs.tls_ca;
  f.command.tls_cert = abs.tls_cert;
  f.command.tls_key = abs.tls_key;
  f.command.tls_server_name = abs.tls_server_name;
  f.command.token_file = abs.token_file;
  if (Status s = transport::ControlMigrate(f.control, f.command); !s.ok()) return PrintError(s.message()), kExitFailure;
  InstallInterruptHandler();
  const bool tty = isatty(STDERR_FILENO) != 0;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (Interrupted()) (void)transport::ControlCancel(f.control);
    auto st = transport::ControlGetStatus(f.control);
    if (!st.ok()) return PrintError(st.status().message()), kExitFailure;
    if (st->migration == "active") {
      if (!f.json) std::fprintf(stderr, tty ? "\r%-110s" : "%s\n", StatusLine(*st).c_str());
      continue;
    }
    if (tty && !f.json) std::fputc('\n', stderr);
    if (f.json) {
      std::printf("%s\n", st->stats_json.c_str());
    } else {
      std::printf("%s %s%s%s\n", f.command.snapshot_to.empty() ? "Migration" : "Snapshot", st->migration.c_str(),
                  st->error.empty() ? "" : ": ", st->error.c_str());
    }
    return st->migration == "completed" ? kExitOk : st->migration == "in-doubt" ? kExitInDoubt : kExitFailure;
  }
}

int ShowStatus(const ControlFlags& f) {
  auto st = transport::ControlGetStatus(f.control);
  if (!st.ok()) return PrintError(st.status().message()), kExitFailure;
  if (f.json) {
    nlohmann::ordered_json j = {{"vm", st->vm}, {"pages_written", st->pages_written}, {"migration", st->migration},
                                {"phase", st->phase}, {"round", st->round}, {"remaining_pages", st->remaining_pages},
                                {"bandwidth_mbps", st->bandwidth_mbps},
                                {"expected_downtime_ms", st->expected_downtime_ms}, {"sent_bytes", st->sent_bytes},
                                {"throttle_pct", st->throttle_pct},
                                {"vcpu_quota_pages_per_s", st->vcpu_quota_pages_per_s},
                                {"vcpus", VcpuRatesJson(st->vcpus, 0)},
                                {"postcopy_requests", st->postcopy_requests},
                                {"error", st->error}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("VM %s, %" PRIu64 " pages written; migration: %s\n", st->vm.c_str(), st->pages_written,
                st->migration.c_str());
    if (st->migration == "active") std::printf("  %s\n", StatusLine(*st).c_str());
    if (!st->error.empty()) std::printf("  last error: %s\n", st->error.c_str());
  }
  return kExitOk;
}

}  // namespace

Command RegisterControl(CLI::App& app) {
  auto f = std::make_shared<ControlFlags>();
  auto* migrate = app.add_subcommand("migrate", "Migrate a VM run with 'pmlmig run --control PATH'");
  AddControlOption(migrate, f.get());
  migrate->add_option("--to", f->command.to, "The receiver, HOST:PORT (or unix:PATH with --local)")->required();
  migrate->add_flag("--local", f->command.local,
                    "Same-host handover to a 'pmlmig receive --listen unix:PATH': the memory is shared, not copied");
  migrate->add_option("--streams", f->command.streams,
                      "Parallel data streams (1-64); 0 = the source's default (half its CPUs, 2 to 8)")
      ->capture_default_str();
  migrate->add_option("--compress", f->command.compress, "none, lz4 or zstd")->capture_default_str();
  AddDataPathFlag(migrate, &f->data_path, /*sender=*/true, "Options");
  migrate->add_option("--max-bandwidth", f->max_bandwidth, "Bytes per second on the wire (K/M/G = 1024-based; post-copy's answers to page requests "
                      "are never held back); 0 = unlimited")
      ->capture_default_str();
  migrate->add_option("--downtime-limit", f->command.downtime_limit_ms, "Downtime limit (ms)")->capture_default_str();
  migrate->add_option("--max-rounds", f->command.max_rounds, "Live rounds before acting on --on-timeout")
      ->capture_default_str();
  migrate->add_option("--timeout", f->timeout, "Give the migration at most this long (0 = no limit)")
      ->capture_default_str();
  migrate->add_option("--on-timeout", f->on_timeout, "cancel or force")->capture_default_str();
  migrate->add_flag("--verify", f->command.verify, "Compare memory digests of both sides (after the target resumed)");
  migrate->add_flag_callback(
      "--verify-before-commit", [f] { f->command.verify_order = engine::VerifyOrder::kBeforeCommit; },
      "With --verify: compare before the target runs the VM; a mismatch keeps it here");
  migrate->add_flag("--json", f->json, "Print the statistics as one JSON object");
  AddConvergeFlags(migrate, &f->converge, "Convergence");
  AddSecurityFlags(migrate, &f->security, /*sender=*/true);
  auto* snapshot = app.add_subcommand("snapshot", "Write a snapshot of a VM run with 'pmlmig run --control PATH' to a file");
  AddControlOption(snapshot, f.get());
  snapshot->add_option("--to", f->snapshot_to, "The snapshot file (the VM's process writes it; replaced only once complete)")
      ->required();
  snapshot->add_flag("--live", f->command.live,
                     "Pre-copy rounds into the file while the VM runs (default: the VM pauses for the whole write)");
  snapshot->add_flag("--stop", f->command.snapshot_stop, "Stop the VM once the snapshot is complete (default: it runs on)");
  snapshot->add_flag("--json", f->json, "Print the statistics as one JSON object");
  auto* status = app.add_subcommand("status", "Show a controlled VM and its migration");
  AddControlOption(status, f.get());
  status->add_flag("--json", f->json, "One JSON object");
  auto* cancel = app.add_subcommand("cancel", "Cancel a controlled VM's migration (the VM stays where it is)");
  AddControlOption(cancel, f.get());
  return [f, migrate, snapshot, status, cancel]() {
    if (migrate->parsed()) return Migrate(*f);
    if (snapshot->parsed()) {
      std::error_code ec;
      f->command.snapshot_to = std::filesystem::absolute(f->snapshot_to, ec).string();
      if (ec || f->snapshot_to.empty()) return PrintError("--to: '" + f->snapshot_to + "' is not a file name"), kExitUsage;
      return Migrate(*f);
    }
    if (status->parsed()) return ShowStatus(*f);
    if (cancel->parsed()) {
      if (Status s = transport::ControlCancel(f->control); !s.ok()) return PrintError(s.message()), kExitFailure;
      std::printf("cancel requested\n");
      return kExitOk;
    }
    return kExitUsage;
  };
}

}  // namespace pmlmig::tools
