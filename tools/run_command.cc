// pmlmig run: run a test VM with a workload and report its write rate.
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/tracker.h"
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
  std::string tracker = "none";
  uint32_t ring_entries = 0;  // 0: the default, 65536 or the host's maximum
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

  auto tracker_kind = engine::ParseTrackerKind(f.tracker);
  if (!tracker_kind.ok()) return PrintError("--tracker: " + tracker_kind.status().message()), kExitUsage;
  if (f.ring_entries != 0 && *tracker_kind != engine::TrackerKind::kRing) {
    return PrintError("--ring-entries needs --tracker ring"), kExitUsage;
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
  if (*tracker) {
    if (Status s = (*tracker)->Enable(); !s.ok()) return PrintError(s.message()), kExitFailure;
  }
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_setup).count();
  if (!f.quiet) {
    const std::string ring = ring_entries ? " (" + std::to_string(ring_entries) + " entries)" : "";
    std::fprintf(stderr, "pmlmig run: %s guest, %u vCPU%s, workload %s, fill %s, tracker %s%s (setup %.2f s)%s\n",
                 FormatBytes(*memory).c_str(), f.vcpus, f.vcpus == 1 ? "" : "s",
                 workload->ToString().c_str(), f.fill.c_str(), f.tracker.c_str(), ring.c_str(), setup_s,
                 duration->count() == 0 ? "; Ctrl-C to stop" : "");
  }

  if (Status s = m.Start(); !s.ok()) return PrintError(s.message()), kExitFailure;
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + *duration;
  auto last_tick = start;
  std::vector<vmm::VcpuStats> last = m.Stats();
  Status failure;
  while (!Interrupted()) {
    const auto now = std::chrono::steady_clock::now();
    if (duration->count() != 0 && now >= end) break;
    if (failure = m.error(); !failure.ok()) break;
    auto next = std::min(last_tick + std::chrono::seconds(1), duration->count() != 0 ? end : now + std::chrono::seconds(1));
    std::this_thread::sleep_until(std::min(next, now + std::chrono::milliseconds(100)));
    if (std::chrono::steady_clock::now() - last_tick >= std::chrono::seconds(1)) {
      uint64_t pages_collected = 0;
      double collect_ms = 0;
      if (*tracker) {
        const auto c0 = std::chrono::steady_clock::now();
        if (failure = (*tracker)->Collect(collected); !failure.ok()) break;
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
      if (*tracker) {
        char col[96];
        std::snprintf(col, sizeof col, "  | collected %" PRIu64 " pages in %.2f ms", pages_collected, collect_ms);
        line += col;
      }
      if (!f.quiet) std::fprintf(stderr, "%s\n", line.c_str());
      last = std::move(cur);
      last_tick = t;
    }
  }
  const Status paused = m.Pause();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (failure.ok()) failure = paused;
  engine::TrackerStats tstats;
  if (*tracker) {
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
      {"tracker", f.tracker},
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
    if (*tracker) {
      std::printf("  tracker %s: %" PRIu64 " pages collected in %" PRIu64 " collections, %.2f ms collecting",
                  f.tracker.c_str(), tstats.pages_collected, tstats.collections,
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
  return [f]() { return Run(*f); };
}

}  // namespace pmlmig::tools
