// pmlmig bench dirty: dirty-page collection on real KVM, ring against bitmap,
// across guest sizes and dirty-set sizes.
//
// For each (guest size, dirty size, tracker): a 1-vCPU test guest whose
// workload sweeps exactly `dirty` bytes over and over (seq:fraction), zero
// fill (so a 16 GiB guest costs only what it writes), tracking enabled from
// the start. A round = the guest sweeps its whole span once, then is paused,
// then one Collect() is timed: wall time, and the calling thread's user and
// kernel CPU time; for the ring, the collector thread's CPU during the round
// is reported too (it drains the rings while the guest runs). The median of
// `--rounds` rounds is reported. Then the guest's write rate is measured over
// `--rate-time` with the tracker collecting every 100 ms, and once per
// (size, dirty) with no tracking at all.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "commands.h"
#include "plot.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/vmm/capabilities.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct DirtyBenchFlags {
  std::string sizes = "256M,1G,4G,16G";
  std::string dirty = "4M,64M";
  std::string trackers = "ring,bitmap,bitmap-clear";
  std::string json, csv, plot;
  uint32_t rounds = 3;
  std::string rate_time = "1s";
  uint32_t ring_entries = 65536;
};

struct CpuTimes {
  uint64_t user_ns = 0, sys_ns = 0;
};

CpuTimes ThreadCpu() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  auto ns = [](const timeval& tv) {
    return static_cast<uint64_t>(tv.tv_sec) * 1000000000ull + static_cast<uint64_t>(tv.tv_usec) * 1000ull;
  };
  return {ns(ru.ru_utime), ns(ru.ru_stime)};
}

template <typename T>
T Median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Result<std::vector<uint64_t>> ParseSizeList(const std::string& flag, const std::string& text) {
  std::vector<uint64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    auto v = ParseSize(item);
    if (!v.ok()) return v.status().WithContext(flag);
    out.push_back(*v);
  }
  if (out.empty()) return InvalidArgument(flag + ": empty list");
  return out;
}

struct Row {
  std::string tracker;
  uint64_t guest_bytes = 0, dirty_bytes = 0;
  double collect_ms = 0, collect_user_ms = 0, collect_sys_ms = 0;
  double background_user_ms = 0, background_sys_ms = 0;
  uint64_t pages_collected = 0;
  double rate_on = 0, rate_off = 0;  // guest pages/s with tracking on / off
  uint64_t ring_full_exits = 0, overflows = 0;
};

struct Setup {
  const vmm::Kvm* kvm;
  uint64_t guest, dirty;
  engine::TrackerKind kind;
  uint32_t ring_entries;
};

Result<std::unique_ptr<vmm::Machine>> MakeGuest(const Setup& s) {
  vmm::MachineOptions o;
  o.guest.memory_bytes = s.guest;
  o.guest.vcpus = 1;
  o.guest.fill = vmm::FillMode::kZero;
  PMLMIG_ASSIGN_OR_RETURN(o.guest.workload, vmm::ParseWorkload("seq"));
  // The sweep covers `dirty` bytes of the workload area.
  auto mem = vmm::GuestMemory::Create({s.guest, false});
  if (!mem.ok()) return mem.status();
  PMLMIG_ASSIGN_OR_RETURN(vmm::GuestLayout layout, vmm::ComputeGuestLayout(*mem, 1));
  const double pages = static_cast<double>(s.dirty / 4096);
  if (pages > static_cast<double>(layout.total_pages)) {
    return InvalidArgument("dirty size " + FormatBytes(s.dirty) + " exceeds guest size " + FormatBytes(s.guest));
  }
  o.guest.workload.hot_fraction = pages / static_cast<double>(layout.total_pages);
  if (s.kind == engine::TrackerKind::kRing) o.dirty_ring_bytes = s.ring_entries * 16;
  return vmm::Machine::Create(*s.kvm, o);
}

// Runs until the guest completed `loops` sweeps (or fails / times out).
Status RunUntilLoops(vmm::Machine& m, uint64_t loops) {
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (m.Stats()[0].loops < loops) {
    if (Status e = m.error(); !e.ok()) return e;
    if (Clock::now() > deadline) return Internal("guest did not finish its sweep within 60 s");
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  return Status::Ok();
}

// Guest write rate over `duration`, collecting every 100 ms when tracked.
Result<double> MeasureRate(vmm::Machine& m, engine::DirtyTracker* tracker, std::chrono::nanoseconds duration) {
  engine::DirtySet set(m.memory_slots());
  PMLMIG_RETURN_IF_ERROR(m.Resume());
  const uint64_t before = m.Stats()[0].pages_written;
  const auto start = Clock::now();
  while (Clock::now() - start < duration) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (tracker != nullptr) {
      PMLMIG_RETURN_IF_ERROR(tracker->Collect(set));
      set.Clear();
    }
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  const uint64_t after = m.Stats()[0].pages_written;
  PMLMIG_RETURN_IF_ERROR(m.Pause());
  return static_cast<double>(after - before) / secs;
}

Result<Row> MeasureOne(const Setup& s, uint32_t rounds, std::chrono::nanoseconds rate_time) {
  PMLMIG_ASSIGN_OR_RETURN(auto m, MakeGuest(s));
  PMLMIG_ASSIGN_OR_RETURN(auto tracker, engine::CreateTracker(s.kind, *m, {}));
  Row row;
  row.tracker = std::string(engine::TrackerKindName(s.kind));
  row.guest_bytes = s.guest;
  row.dirty_bytes = s.dirty;
  PMLMIG_RETURN_IF_ERROR(tracker->Enable());
  PMLMIG_RETURN_IF_ERROR(m->Start());
  engine::DirtySet set(m->memory_slots());
  std::vector<double> wall, user, sys, bg_user, bg_sys;
  std::vector<uint64_t> pages;
  engine::TrackerStats last = tracker->stats();
  for (uint32_t r = 0; r < rounds; ++r) {
    // At least one complete sweep after the previous collection: the guest
    // was paused mid-sweep, so the sweep in progress does not count.
    if (r > 0) PMLMIG_RETURN_IF_ERROR(m->Resume());
    PMLMIG_RETURN_IF_ERROR(RunUntilLoops(*m, m->Stats()[0].loops + (r == 0 ? 1 : 2)));
    PMLMIG_RETURN_IF_ERROR(m->Pause());
    const CpuTimes c0 = ThreadCpu();
    const auto t0 = Clock::now();
    PMLMIG_RETURN_IF_ERROR(tracker->Collect(set));
    const auto t1 = Clock::now();
    const CpuTimes c1 = ThreadCpu();
    const engine::TrackerStats st = tracker->stats();
    wall.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    user.push_back(static_cast<double>(c1.user_ns - c0.user_ns) / 1e6);
    sys.push_back(static_cast<double>(c1.sys_ns - c0.sys_ns) / 1e6);
    bg_user.push_back(static_cast<double>(st.background_user_ns - last.background_user_ns) / 1e6);
    bg_sys.push_back(static_cast<double>(st.background_sys_ns - last.background_sys_ns) / 1e6);
    pages.push_back(set.Count());
    set.Clear();
    last = st;
  }
  row.collect_ms = Median(wall);
  row.collect_user_ms = Median(user);
  row.collect_sys_ms = Median(sys);
  row.background_user_ms = Median(bg_user);
  row.background_sys_ms = Median(bg_sys);
  row.pages_collected = Median(pages);
  PMLMIG_ASSIGN_OR_RETURN(row.rate_on, MeasureRate(*m, tracker.get(), rate_time));
  row.ring_full_exits = tracker->stats().ring_full_exits;
  row.overflows = tracker->stats().overflows;
  PMLMIG_RETURN_IF_ERROR(tracker->Disable());
  m->Stop();
  return row;
}

Result<double> MeasureUntracked(const Setup& s, std::chrono::nanoseconds rate_time) {
  Setup none = s;
  none.kind = engine::TrackerKind::kNone;
  PMLMIG_ASSIGN_OR_RETURN(auto m, MakeGuest(none));
  PMLMIG_RETURN_IF_ERROR(m->Start());
  PMLMIG_RETURN_IF_ERROR(m->Pause());
  return MeasureRate(*m, nullptr, rate_time);
}

std::string MachineDescription() {
  return std::to_string(std::thread::hardware_concurrency()) + " CPUs, " + CpuModelName();
}

int RunDirty(const DirtyBenchFlags& f) {
  auto sizes = ParseSizeList("--sizes", f.sizes);
  if (!sizes.ok()) return PrintError(sizes.status().message()), kExitUsage;
  auto dirty = ParseSizeList("--dirty", f.dirty);
  if (!dirty.ok()) return PrintError(dirty.status().message()), kExitUsage;
  std::vector<engine::TrackerKind> kinds;
  {
    std::stringstream ss(f.trackers);
    std::string item;
    while (std::getline(ss, item, ',')) {
      auto k = engine::ParseTrackerKind(item);
      if (!k.ok() || *k == engine::TrackerKind::kNone) {
        return PrintError("--trackers: " + (k.ok() ? std::string("'none' is measured anyway as the baseline")
                                                    : k.status().message())), kExitUsage;
      }
      kinds.push_back(*k);
    }
  }
  auto rate_time = ParseDuration(f.rate_time);
  if (!rate_time.ok()) return PrintError("--rate-time: " + rate_time.status().message()), kExitUsage;
  if (f.rounds == 0) return PrintError("--rounds must be at least 1"), kExitUsage;
  for (uint64_t s : *sizes) {
    if (auto l = vmm::PcLayout(s); !l.ok()) return PrintError("--sizes: " + l.status().message()), kExitUsage;
    for (uint64_t d : *dirty) {
      if (d == 0 || d % 4096 != 0 || d >= s) {
        return PrintError("--dirty: " + FormatBytes(d) + " must be a whole number of pages below the guest size " +
                          FormatBytes(s)), kExitUsage;
      }
    }
  }
  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  InstallInterruptHandler();

  std::vector<Row> rows;
  std::fprintf(stderr, "pmlmig bench dirty: %zu sizes x %zu dirty sizes x %zu trackers, %u rounds each\n",
               sizes->size(), dirty->size(), kinds.size(), f.rounds);
  for (uint64_t s : *sizes) {
    for (uint64_t d : *dirty) {
      Setup base{&*kvm, s, d, engine::TrackerKind::kNone, f.ring_entries};
      auto off = MeasureUntracked(base, *rate_time);
      if (!off.ok()) return PrintError(off.status().message()), kExitFailure;
      for (engine::TrackerKind k : kinds) {
        if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
        Setup setup = base;
        setup.kind = k;
        auto row = MeasureOne(setup, f.rounds, *rate_time);
        if (!row.ok()) {
          return PrintError(std::string(engine::TrackerKindName(k)) + " " + FormatBytes(s) + "/" + FormatBytes(d) +
                            ": " + row.status().message()), kExitFailure;
        }
        row->rate_off = *off;
        std::fprintf(stderr, "  %-12s guest %-8s dirty %-8s collect %8.3f ms (%" PRIu64 " pages)\n",
                     row->tracker.c_str(), FormatBytes(s).c_str(), FormatBytes(d).c_str(), row->collect_ms,
                     row->pages_collected);
        rows.push_back(*row);
      }
    }
  }

  // The table.
  std::printf("%-12s %9s %8s %11s %9s %9s %10s %9s %10s %10s %8s\n", "tracker", "guest", "dirty", "collect_ms",
              "user_ms", "sys_ms", "bg_cpu_ms", "pages", "rate_on/s", "rate_off/s", "on/off");
  for (const Row& r : rows) {
    std::printf("%-12s %9s %8s %11.3f %9.3f %9.3f %10.3f %9" PRIu64 " %10.0f %10.0f %8.2f\n", r.tracker.c_str(),
                FormatBytes(r.guest_bytes).c_str(), FormatBytes(r.dirty_bytes).c_str(), r.collect_ms,
                r.collect_user_ms, r.collect_sys_ms, r.background_user_ms + r.background_sys_ms, r.pages_collected,
                r.rate_on, r.rate_off, r.rate_off > 0 ? r.rate_on / r.rate_off : 0.0);
  }

  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  nlohmann::ordered_json doc = {{"benchmark", "dirty"}, {"date", date}, {"machine", MachineDescription()},
                                {"rounds", f.rounds}, {"results", nlohmann::ordered_json::array()}};
  for (const Row& r : rows) {
    doc["results"].push_back({{"tracker", r.tracker},
                              {"guest_bytes", r.guest_bytes},
                              {"dirty_bytes", r.dirty_bytes},
                              {"collect_ms", r.collect_ms},
                              {"collect_user_ms", r.collect_user_ms},
                              {"collect_sys_ms", r.collect_sys_ms},
                              {"background_user_ms", r.background_user_ms},
                              {"background_sys_ms", r.background_sys_ms},
                              {"pages_collected", r.pages_collected},
                              {"guest_pages_per_second_tracked", r.rate_on},
                              {"guest_pages_per_second_untracked", r.rate_off},
                              {"ring_full_exits", r.ring_full_exits},
                              {"ring_overflows", r.overflows}});
  }
  std::string json_path = f.json;
  if (!f.json.empty()) {
    std::ofstream(f.json) << doc.dump(2) << "\n";
  } else if (!f.plot.empty()) {
    json_path = f.plot + ".json";
    std::ofstream(json_path) << doc.dump(2) << "\n";
  }
  if (!f.csv.empty()) {
    std::ofstream csv(f.csv);
    csv << "tracker,guest_bytes,dirty_bytes,collect_ms,collect_user_ms,collect_sys_ms,background_user_ms,"
           "background_sys_ms,pages_collected,guest_pages_per_second_tracked,guest_pages_per_second_untracked\n";
    for (const Row& r : rows) {
      csv << r.tracker << ',' << r.guest_bytes << ',' << r.dirty_bytes << ',' << r.collect_ms << ','
          << r.collect_user_ms << ',' << r.collect_sys_ms << ',' << r.background_user_ms << ','
          << r.background_sys_ms << ',' << r.pages_collected << ',' << r.rate_on << ',' << r.rate_off << '\n';
    }
  }
  if (!f.plot.empty()) {
    if (Status s = PlotDirtyBench(json_path, f.plot); !s.ok()) return PrintError(s.message()), kExitFailure;
    std::fprintf(stderr, "plot written to %s\n", f.plot.c_str());
  }
  return kExitOk;
}

}  // namespace

Command RegisterBench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks on real KVM");
  bench->require_subcommand(1);
  auto f = std::make_shared<DirtyBenchFlags>();
  auto* dirty = bench->add_subcommand("dirty", "Dirty-page collection time: dirty ring against bitmap, by guest size");
  dirty->add_option("--sizes", f->sizes, "Guest sizes, comma-separated")->capture_default_str();
  dirty->add_option("--dirty", f->dirty, "Dirty-set sizes, comma-separated")->capture_default_str();
  dirty->add_option("--trackers", f->trackers, "Trackers: ring, bitmap, bitmap-clear")->capture_default_str();
  dirty->add_option("--rounds", f->rounds, "Rounds per configuration (the median is reported)")->capture_default_str();
  dirty->add_option("--rate-time", f->rate_time, "How long to measure the guest's write rate")->capture_default_str();
  dirty->add_option("--ring-entries", f->ring_entries, "Dirty ring entries per vCPU")->capture_default_str();
  dirty->add_option("--json", f->json, "Write the results as JSON to this file");
  dirty->add_option("--csv", f->csv, "Write the results as CSV to this file");
  dirty->add_option("--plot", f->plot, "Write a PNG plot of collection time against guest size");
  Command migrate = RegisterBenchMigrate(*bench);
  CLI::App* migrate_cmd = bench->get_subcommand("migrate");
  return [f, dirty, migrate, migrate_cmd]() {
    if (dirty->parsed()) return RunDirty(*f);
    if (migrate_cmd->parsed()) return migrate();
    PrintError("bench: no benchmark given (see 'pmlmig bench --help')");
    return kExitUsage;
  };
}

}  // namespace pmlmig::tools
