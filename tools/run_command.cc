// pmlmig run: run a test VM with a workload and report its write rate.
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
#include "security_flags.h"
#include "pmlmig/base/units.h"
#include "migration_json.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/transport/config_codec.h"
#include "pmlmig/transport/control.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/vmm/capabilities.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

struct RunFlags {
  std::string memory = "1G";
  uint32_t vcpus = 1;
  std::string workload = "random";
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
  uint32_t streams = 1;
  std::string compress = "none";
  std::string max_bandwidth = "0";
  bool verify = false;
  std::string linger = "1s";  // the VM keeps running this long after a failed migration
  SecurityFlags security;
  std::string control;  // unix socket for the control API
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

// Bytes of host memory available for new allocations (MemAvailable).
uint64_t AvailableHostMemory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

uint64_t PeakRssBytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

std::string Rate(double pages_per_second) {
  char buf[32];
  if (pages_per_second >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", pages_per_second / 1e6);
  else if (pages_per_second >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", pages_per_second / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", pages_per_second);
  return buf;
}

// The control API of a running VM: one migration at a time, on its own thread.
class RunControl final : public transport::ControlHandler {
 public:
  RunControl(const vmm::MachineOptions& options, vmm::Machine& m, engine::DirtyTracker& tracker)
      : options_(options), m_(m), tracker_(tracker) {}
  ~RunControl() override { Join(); }

  Status StartMigration(const transport::MigrateCommand& c) override {
    std::lock_guard lock(mu_);
    if (active_) return Status(Code::kInvalidArgument, "a migration is already in progress");
    if (migrated_) return Status(Code::kInvalidArgument, "this VM has already migrated away");
    if (last_.status == "in-doubt") {
      return Status(Code::kInvalidArgument,
                    "the last switch-over is in doubt: the VM stays paused here until you know whether the target runs it");
    }
    auto compress = transport::ParseCompression(c.compress);
    if (!compress.ok()) return compress.status();
    transport::GrpcSinkOptions so;
    so.target = c.to;
    so.streams = c.streams;
    so.compress = *compress;
    so.max_bandwidth = c.max_bandwidth;
    auto sec = transport::LoadTransportSecurity(c.tls_ca, c.tls_cert, c.tls_key, c.token_file, c.tls_server_name);
    if (!sec.ok()) return sec.status();
    so.security = std::move(*sec);
    auto sink = transport::GrpcMigrationSink::Create(so);
    if (!sink.ok()) return sink.status();
    engine::MigrationOptions mo;
    mo.downtime_limit = std::chrono::milliseconds(c.downtime_limit_ms);
    mo.max_rounds = c.max_rounds;
    mo.timeout = std::chrono::milliseconds(c.timeout_ms);
    mo.force_on_timeout = c.force_on_timeout;
    mo.verify = c.verify;
    if (thread_.joinable()) thread_.join();  // the previous, finished migration
    sink_ = std::move(*sink);
    source_ = std::make_unique<engine::MigrationSource>(m_, tracker_, *sink_, mo,
                                                        transport::EncodeVmConfig(options_.guest, options_.irqchip));
    active_ = true;
    last_ = engine::MigrationStats{};
    std::fprintf(stderr, "pmlmig run: control API: migrating to %s\n", c.to.c_str());
    thread_ = std::thread([this] {
      engine::MigrationStats st = source_->Run();
      std::lock_guard l(mu_);
      last_ = st;
      active_ = false;
      migrated_ = st.status == "completed";
      std::fprintf(stderr, "pmlmig run: control API: migration %s%s%s\n", st.status.c_str(),
                   st.error.empty() ? "" : ": ", st.error.c_str());
    });
    return Status::Ok();
  }

  transport::ControlStatus GetStatus() override {
    transport::ControlStatus s;
    for (const vmm::VcpuStats& v : m_.Stats()) s.pages_written += v.pages_written;
    std::lock_guard lock(mu_);
    s.vm = migrated_ ? "migrated"
                     : last_.status == "in-doubt" ? "paused-in-doubt"
                                                  : (m_.error().ok() ? "running" : "failed");
    if (active_) {
      const engine::MigrationProgress p = source_->progress();
      s.migration = "active";
      s.phase = p.phase;
      s.round = p.round;
      s.remaining_pages = p.remaining_pages;
      s.bandwidth_mbps = p.bandwidth_mbps;
      s.expected_downtime_ms = p.expected_downtime_ms;
      s.sent_bytes = p.wire_bytes;
      s.elapsed_ms = p.elapsed_ms;
    } else if (source_) {
      s.migration = last_.status;
      s.error = last_.error;
      s.stats_json = MigrationStatsJson(last_).dump();
    }
    return s;
  }

  Status CancelMigration() override {
    std::lock_guard lock(mu_);
    if (!active_) return Status(Code::kInvalidArgument, "no migration in progress");
    source_->Cancel();
    return Status::Ok();
  }

  bool migrated() {
    std::lock_guard lock(mu_);
    return migrated_;
  }
  // Cancels a migration in progress and waits for its thread.
  void Join() {
    {
      std::lock_guard lock(mu_);
      if (active_ && source_) source_->Cancel();
    }
    if (thread_.joinable()) thread_.join();
  }
  engine::MigrationStats last() {
    std::lock_guard lock(mu_);
    return last_;
  }

 private:
  const vmm::MachineOptions& options_;
  vmm::Machine& m_;
  engine::DirtyTracker& tracker_;
  std::mutex mu_;
  bool active_ = false;                          // guarded by mu_
  bool migrated_ = false;                        // guarded by mu_
  engine::MigrationStats last_;                  // guarded by mu_
  std::unique_ptr<transport::GrpcMigrationSink> sink_;
  std::unique_ptr<engine::MigrationSource> source_;
  std::thread thread_;
};

// Migrates the running VM; prints the statistics; 0 only when completed.
int Migrate(const RunFlags& f, const vmm::MachineOptions& options, vmm::Machine& m, engine::DirtyTracker& tracker,
            const transport::GrpcSinkOptions& sink_options, const engine::MigrationOptions& migration,
            std::chrono::steady_clock::time_point vm_start, std::chrono::nanoseconds linger) {
  auto sink = transport::GrpcMigrationSink::Create(sink_options);
  if (!sink.ok()) return PrintError(sink.status().message()), kExitFailure;
  const std::vector<vmm::VcpuStats> before = m.Stats();
  engine::MigrationSource source(m, tracker, **sink, migration,
                                 transport::EncodeVmConfig(options.guest, options.irqchip));
  const bool tty = isatty(STDERR_FILENO) != 0;
  if (!f.quiet) {
    std::fprintf(stderr, "pmlmig run: migrating to %s (tracker %s, %u stream%s, compress %s%s%s)\n",
                 f.migrate_to.c_str(), std::string(tracker.name()).c_str(), f.streams, f.streams == 1 ? "" : "s",
                 f.compress.c_str(), f.max_bandwidth != "0" ? (", max " + f.max_bandwidth + "B/s").c_str() : "",
                 f.verify ? ", verify" : "");
    source.SetProgressCallback([tty](const engine::MigrationProgress& p) {
      std::fprintf(stderr, tty ? "\r%-110s" : "%s\n", ProgressLine(p).c_str());
      if (tty && p.phase == "done") std::fputc('\n', stderr);
    });
  }
  // Ctrl-C cancels the migration (the VM stays here).
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    while (!done.load()) {
      if (Interrupted()) {
        source.Cancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  const engine::MigrationStats stats = source.Run();
  done = true;
  watcher.join();
  const std::vector<vmm::VcpuStats> after = m.Stats();
  const double ran = std::chrono::duration<double>(std::chrono::steady_clock::now() - vm_start).count();
  // Failed or cancelled: the source resumed the VM; it keeps running here
  // (for --linger, so the report can show it running) before the run ends.
  const bool failed_here = stats.status == "failed" || stats.status == "cancelled";
  std::vector<vmm::VcpuStats> lingered = after;
  if (failed_here && !Interrupted()) {
    if (!f.quiet) {
      std::fprintf(stderr, "pmlmig run: migration %s; the VM keeps running here (for %s more)\n",
                   stats.status.c_str(), f.linger.c_str());
    }
    const auto until = std::chrono::steady_clock::now() + linger;
    while (std::chrono::steady_clock::now() < until && !Interrupted() && m.error().ok()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    lingered = m.Stats();
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
    out["tracker"] = std::string(tracker.name());
    out["streams"] = f.streams;
    out["compress"] = f.compress;
    out["memory_bytes"] = options.guest.memory_bytes;
    out["workload"] = options.guest.workload.ToString();
    out["pages_written"] = written;
    out["source_run_s"] = ran;
    out["source_vm_error"] = m.error().ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(m.error().message());
    out["vcpus"] = vcpus;
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::fputs(MigrationStatsText(stats).c_str(), stdout);
  }
  if (stats.status == "in-doubt") {
    PrintError("migration in doubt: " + stats.error);
    return kExitInDoubt;
  }
  if (stats.status != "completed") {
    PrintError("migration " + stats.status + ": " + stats.error + " (the VM kept running here)");
    return kExitFailure;
  }
  return kExitOk;
}

int Run(const RunFlags& f) {
  vmm::MachineOptions options;
  auto memory = ParseSize(f.memory);
  if (!memory.ok()) return PrintError("--memory: " + memory.status().message()), kExitUsage;
  auto workload = vmm::ParseWorkload(f.workload);
  if (!workload.ok()) return PrintError("--workload: " + workload.status().message()), kExitUsage;
  auto fill = vmm::ParseFillMode(f.fill);
  if (!fill.ok()) return PrintError("--fill: " + fill.status().message()), kExitUsage;
  auto duration = ParseDuration(f.duration);
  if (!duration.ok()) return PrintError("--duration: " + duration.status().message()), kExitUsage;
  if (auto layout = vmm::PcLayout(*memory); !layout.ok()) {
    return PrintError("--memory: " + layout.status().message()), kExitUsage;
  }
  if (*fill == vmm::FillMode::kRandom) {
    const uint64_t avail = AvailableHostMemory();
    if (avail != 0 && *memory > avail / 10 * 9) {
      PrintError("--fill random needs " + FormatBytes(*memory) + " of host memory but only " +
                 FormatBytes(avail) + " is available; use --fill zero or a smaller --memory");
      return kExitUsage;
    }
  }
  options.guest.memory_bytes = *memory;
  options.guest.vcpus = f.vcpus;
  options.guest.workload = *workload;
  options.guest.fill = *fill;
  options.guest.seed = f.seed;
  options.irqchip = !f.no_irqchip;
  options.huge_pages = f.huge_pages;

  const bool migrating = !f.migrate_to.empty();
  auto linger = ParseDuration(f.linger);
  if (!linger.ok()) return PrintError("--linger: " + linger.status().message()), kExitUsage;
  const bool can_migrate = migrating || !f.control.empty();
  auto tracker_kind = engine::ParseTrackerKind(f.tracker.empty() ? (can_migrate ? "ring" : "none") : f.tracker);
  if (!tracker_kind.ok()) return PrintError("--tracker: " + tracker_kind.status().message()), kExitUsage;
  if (f.ring_entries != 0 && *tracker_kind != engine::TrackerKind::kRing) {
    return PrintError("--ring-entries needs --tracker ring"), kExitUsage;
  }
  if (!f.control.empty() && *tracker_kind == engine::TrackerKind::kNone) {
    return PrintError("--control needs a tracker (ring, bitmap or bitmap-clear) for migrations"), kExitUsage;
  }
  // Migration flags, all checked before anything starts.
  transport::GrpcSinkOptions sink_options;
  engine::MigrationOptions migration;
  std::chrono::nanoseconds migrate_after{0};
  if (migrating) {
    if (*tracker_kind == engine::TrackerKind::kNone) return PrintError("--migrate-to needs a tracker (ring, bitmap or bitmap-clear)"), kExitUsage;
    auto after = ParseDuration(f.migrate_after);
    if (!after.ok()) return PrintError("--migrate-after: " + after.status().message()), kExitUsage;
    migrate_after = *after;
    auto timeout = ParseDuration(f.timeout);
    if (!timeout.ok()) return PrintError("--timeout: " + timeout.status().message()), kExitUsage;
    migration.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(*timeout);
    if (f.on_timeout != "cancel" && f.on_timeout != "force") {
      return PrintError("--on-timeout: '" + f.on_timeout + "' is not cancel or force"), kExitUsage;
    }
    migration.force_on_timeout = f.on_timeout == "force";
    migration.downtime_limit = std::chrono::milliseconds(f.downtime_limit_ms);
    migration.max_rounds = f.max_rounds;
    migration.verify = f.verify;
    auto bw = ParseSize(f.max_bandwidth);
    if (!bw.ok()) return PrintError("--max-bandwidth: " + bw.status().message()), kExitUsage;
    auto compress = transport::ParseCompression(f.compress);
    if (!compress.ok()) return PrintError("--compress: " + compress.status().message()), kExitUsage;
    sink_options.target = f.migrate_to;
    sink_options.streams = f.streams;
    sink_options.compress = *compress;
    sink_options.max_bandwidth = *bw;
    auto sec = LoadSecurity(f.security);
    if (!sec.ok()) return PrintError(sec.status().message()), kExitUsage;
    sink_options.security = std::move(*sec);
    if (auto check = transport::GrpcMigrationSink::Create(sink_options); !check.ok()) {
      return PrintError(check.status().message()), kExitUsage;
    }
  } else if (f.verify || f.streams != 1 || f.compress != "none" || f.max_bandwidth != "0") {
    return PrintError("--verify, --streams, --compress and --max-bandwidth need --migrate-to"), kExitUsage;
  }
  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  uint32_t ring_entries = 0;
  if (*tracker_kind == engine::TrackerKind::kRing) {
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
  auto tracker = engine::CreateTracker(*tracker_kind, m, {});
  if (!tracker.ok()) return PrintError(tracker.status().message()), kExitFailure;
  engine::DirtySet collected(m.memory_slots());
  // When migrating (now or through the control API), the migration owns the
  // tracker (it enables it before round 0); otherwise it collects once a
  // second from the start.
  std::unique_ptr<RunControl> control;
  std::unique_ptr<transport::ControlServer> control_server;
  if (!f.control.empty()) {
    control = std::make_unique<RunControl>(options, m, **tracker);
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
                 FormatBytes(*memory).c_str(), f.vcpus, f.vcpus == 1 ? "" : "s",
                 workload->ToString().c_str(), f.fill.c_str(), std::string(engine::TrackerKindName(*tracker_kind)).c_str(), ring.c_str(), setup_s,
                 duration->count() == 0 ? "; Ctrl-C to stop" : "");
  }

  if (Status s = m.Start(); !s.ok()) return PrintError(s.message()), kExitFailure;
  const auto start = std::chrono::steady_clock::now();
  const auto end = migrating ? start + migrate_after : start + *duration;
  auto last_tick = start;
  std::vector<vmm::VcpuStats> last = m.Stats();
  Status failure;
  while (!Interrupted()) {
    const auto now = std::chrono::steady_clock::now();
    if ((migrating || duration->count() != 0) && now >= end) break;
    if (failure = m.error(); !failure.ok()) break;
    if (control && control->migrated()) break;
    auto next = std::min(last_tick + std::chrono::seconds(1),
                         migrating || duration->count() != 0 ? end : now + std::chrono::seconds(1));
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
  if (migrating && failure.ok() && !Interrupted()) return Migrate(f, options, m, **tracker, sink_options, migration, start, *linger);
  if (control) {
    control->Join();  // a migration still in progress is cancelled: the VM stays here
    // A 'pmlmig migrate' polls every 200 ms: let it read the outcome first.
    if (control->migrated()) std::this_thread::sleep_for(std::chrono::seconds(1));
    control_server.reset();
    if (control->migrated()) {
      m.Stop();
      const engine::MigrationStats st = control->last();
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

  uint64_t total = 0;
  nlohmann::ordered_json vcpus = nlohmann::ordered_json::array();
  for (size_t i = 0; i < stats.size(); ++i) {
    total += stats[i].pages_written;
    vcpus.push_back({{"id", i},
                     {"pages_written", stats[i].pages_written},
                     {"pages_per_second", static_cast<double>(stats[i].pages_written) / elapsed},
                     {"loops", stats[i].loops},
                     {"started", stats[i].started}});
  }
  nlohmann::ordered_json out = {
      {"status", failure.ok() ? (Interrupted() ? "interrupted" : "completed") : "failed"},
      {"duration_s", elapsed},
      {"pages_written", total},
      {"pages_per_second", static_cast<double>(total) / elapsed},
      {"bytes_written_per_second", static_cast<double>(total) * 4096.0 / elapsed},
      {"memory_bytes", *memory},
      {"workload", workload->ToString()},
      {"fill", f.fill},
      {"setup_s", setup_s},
      {"tracker", std::string(engine::TrackerKindName(*tracker_kind))},
      {"pages_collected", tstats.pages_collected},
      {"collect_ms_total", static_cast<double>(tstats.collect_ns_total) / 1e6},
      {"collections", tstats.collections},
      {"ring_entries", ring_entries},
      {"ring_full_exits", tstats.ring_full_exits},
      {"ring_overflows", tstats.overflows},
      {"peak_rss_bytes", PeakRssBytes()},
      {"vcpus", vcpus},
      {"check", check},
      {"error", failure.ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(failure.message())},
  };
  if (f.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("Summary: %.2f s, %" PRIu64 " pages written (%s pages/s, %s/s of dirtied pages), peak RSS %s\n",
                elapsed, total, Rate(static_cast<double>(total) / elapsed).c_str(),
                FormatBytes(static_cast<uint64_t>(static_cast<double>(total) * 4096.0 / elapsed)).c_str(),
                FormatBytes(PeakRssBytes()).c_str());
    for (size_t i = 0; i < stats.size(); ++i) {
      std::printf("  vcpu %zu: %" PRIu64 " pages (%s pages/s), %" PRIu64 " loops\n", i, stats[i].pages_written,
                  Rate(static_cast<double>(stats[i].pages_written) / elapsed).c_str(), stats[i].loops);
    }
    if (per_second != nullptr) {
      std::printf("  tracker %s: %" PRIu64 " pages collected in %" PRIu64 " collections, %.2f ms collecting",
                  std::string(engine::TrackerKindName(*tracker_kind)).c_str(), tstats.pages_collected, tstats.collections,
                  static_cast<double>(tstats.collect_ns_total) / 1e6);
      if (ring_entries != 0) {
        std::printf(", %" PRIu64 " ring-full exits, %" PRIu64 " overflows", tstats.ring_full_exits, tstats.overflows);
      }
      std::printf("\n");
    }
    if (!check.is_null()) {
      std::printf("  memory check: %s, %" PRIu64 " pages checked, %" PRIu64 " stamped\n",
                  check["ok"].get<bool>() ? "passed" : "FAILED", check["pages_checked"].get<uint64_t>(),
                  check["pages_stamped"].get<uint64_t>());
    }
  }
  if (!failure.ok()) {
    PrintError(failure.message());
    return kExitFailure;
  }
  return Interrupted() ? kExitInterrupted : kExitOk;
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
  cmd->add_option("--migrate-to", f->migrate_to, "Migrate the VM to a 'pmlmig receive' at HOST:PORT")->group(mig);
  cmd->add_option("--migrate-after", f->migrate_after, "Run this long before migrating")->capture_default_str()->group(mig);
  cmd->add_option("--downtime-limit", f->downtime_limit_ms, "Switch over once the expected downtime is at most this (ms)")
      ->capture_default_str()->group(mig);
  cmd->add_option("--max-rounds", f->max_rounds, "Live rounds before acting on --on-timeout")->capture_default_str()->group(mig);
  cmd->add_option("--timeout", f->timeout, "Give the migration at most this long (0 = no limit)")->capture_default_str()->group(mig);
  cmd->add_option("--on-timeout", f->on_timeout, "cancel (keep the VM here) or force (switch over anyway)")
      ->capture_default_str()->group(mig);
  cmd->add_option("--streams", f->streams, "Parallel data streams (1-64)")->capture_default_str()->group(mig);
  cmd->add_option("--compress", f->compress, "none, lz4 or zstd")->capture_default_str()->group(mig);
  cmd->add_option("--max-bandwidth", f->max_bandwidth, "Bytes per second on the wire, K/M/G suffixes; 0 = unlimited")
      ->capture_default_str()->group(mig);
  cmd->add_option("--linger", f->linger, "After a failed or cancelled migration, keep the VM running this long before the run ends")
      ->capture_default_str()
      ->group(mig);
  AddSecurityFlags(cmd, &f->security, /*sender=*/true);
  cmd->add_flag("--verify", f->verify, "Compare a digest of all memory on both sides and run the checker on the target")
      ->group(mig);
  cmd->add_option("--control", f->control,
                  "Serve the control API on this unix socket (mode 0600) for 'pmlmig migrate/status/cancel'")
      ->group(mig);
  return [f]() { return Run(*f); };
}

}  // namespace pmlmig::tools
