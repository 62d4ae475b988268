// pmlmig bench migrate: live migration over loopback gRPC against the
// machine's own limits and against QEMU, in one process and one invocation.
//
// 1. Baselines (bench_baselines.h), for each guest size and stream count N,
//    the guest's size over N plain TCP connections on 127.0.0.1, a sender
//    and a receiver thread each, 1 MiB writes and reads:
//    (a) into a reused buffer (the receiver discards): the socket layer;
//    (b) with --peers, into a fresh memfd of the guest's size that nothing
//        has touched, each receiver into its own slice, from a resident
//        source of the same size: the limit of any migration target here.
//    --baseline-runs runs of each in all (at least one per --repeat).
// 2. Migrations: for each guest size, scenario (untouched: zero fill, idle;
//    random: random fill, idle; hotset: random fill, 2 vCPUs writing a hot
//    set), stream count and compression, a source VM is built and started,
//    runs for --migrate-after, and is migrated by engine::MigrationSource
//    through transport::GrpcMigrationSink to a transport::MigrationServer
//    in the same process (an engine::VmMigrationTarget that builds the VM
//    from the wire config), exactly as `run --migrate-to` and `receive` do.
// 3. With --peers, QEMU (bench_qemu.h) when qemu-system-x86_64 is found
//    (else "qemu: skipped"): a paused guest of each size with the random
//    scenario's bytes, in /dev/shm on both sides, migrated with one channel
//    and with multifd over N channels; time is QEMU's own total-time.
//
// Everything runs once per --repeat iteration, in turn (QEMU one channel;
// then per stream count the baselines, the migrations, QEMU multifd), so
// drift on this machine hits all alike; the tables give medians. --peers
// makes --repeat default to 3.
//
// Throughput in the per-run table is wire bytes over the migration's total
// time (setup to the target's resume), in GB/s (10^9 bytes); x_raw divides
// it by (a) of the same size and stream count. The comparison table gives,
// per configuration, the medians of time and of guest bytes per second for
// pmlmig, (a), (b) and QEMU, pmlmig's speed-up over QEMU multifd with as many
// channels as streams, pmlmig / (b), round 0 / (a), and CPU-seconds per 10^9
// guest bytes of each: getrusage of this process for pmlmig (source and
// target both live here, with the guest's vCPUs) and for (a) and (b), and
// /proc/PID/stat of both QEMU processes. This host has 2 cores. For each
// completed migration the downtime is split into the final collection, the
// stop-and-copy round, the rest of the source's pause (vCPU pause, state
// capture) and Final to the target's reply. --prefault-target makes the
// target's memory resident while its VM is built (inside setup), which
// separates the cost of first-touching fresh memory from the transfer.
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include "bench_baselines.h"
#include "bench_qemu.h"
#include "commands.h"
#include "migration_json.h"
#include "plot.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/vmm/description.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/engine/migration_controller.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/vmm/capabilities.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct MigrateBenchFlags {
  std::string sizes = "1G,4G";
  std::string scenarios = "untouched,random,hotset";
  std::string streams = std::to_string(transport::DefaultStreams());
  std::string compress = "none";
  uint32_t downtime_limit_ms = 300;
  uint32_t max_rounds = 50;
  std::string on_timeout = "cancel";
  std::string tracker = "ring";
  std::string migrate_after = "1s";
  std::string hotset = "hotset:fraction=0.0625,share=1";
  uint32_t hotset_vcpus = 2;
  uint32_t baseline_runs = 3;
  uint32_t repeat = 1;
  bool verify = false;
  std::string verify_order = "after-commit";
  bool prefault_target = false;
  bool peers = false;                     // also (b) and QEMU; --repeat defaults to 3
  bool repeat_given = false;              // --repeat was on the command line
  std::string qemu = "qemu-system-x86_64";  // with --peers: found on PATH, or a path
  uint32_t qemu_timeout_s = 300;
  std::string json, plot;
};

// What one scenario's source VM is.
struct Scenario {
  std::string name;
  vmm::FillMode fill = vmm::FillMode::kRandom;
  vmm::WorkloadSpec workload;
  uint32_t vcpus = 1;
};

// One baseline, (a) or (b), for one size and connection count.
struct Baseline {
  uint64_t bytes = 0;
  uint32_t connections = 1;
  std::vector<double> seconds;  // every run
  std::vector<double> cpu_ms;   // the process's CPU (user + kernel) in every run
  double gbps = 0;              // bytes / median seconds / 1e9
  double cpu_s_per_gb = 0;      // median CPU / bytes, seconds per 10^9 bytes
};

struct Row {
  std::string scenario;
  uint64_t guest_bytes = 0;
  uint32_t vcpus = 1;
  std::string workload, fill;
  uint32_t streams = 1;
  std::string compress;
  std::string verify = "off";  // off, before-commit or after-commit
  double prepare_ms = 0;  // building and filling the source VM (not part of the migration)
  engine::MigrationStats stats;
  double cpu_user_ms = 0, cpu_sys_ms = 0;  // the whole process, during MigrationSource::Run
  uint64_t guest_pages_written = 0;        // by the source's vCPUs during the migration
  // Where the downtime went (completed migrations): the final collection,
  // the stop-and-copy round, the rest of the source's pause before Final
  // (vCPU pause, state capture), then Final to the target's reply.
  double final_collect_ms = 0;
  double final_round_ms = 0;
  double pause_other_ms = 0;
  double switchover_ms = 0;
  double gbps = 0;                         // wire bytes / total time
  double baseline_gbps = 0;                // (a) of the same size and connection count, median
  double ratio = 0;                        // gbps / baseline_gbps
  uint32_t repeat = 0;                     // which --repeat iteration
};

// One QEMU migration of the comparison.
struct QemuRow {
  uint64_t guest_bytes = 0;
  uint32_t channels = 0;  // multifd channels; 0: one channel, multifd off
  uint32_t repeat = 0;
  QemuMigrateRun run;
};

// The QEMU side of --peers.
struct QemuPeer {
  std::string binary;  // "" when skipped
  std::string skipped;  // why not (or why it stopped), for the output
  std::string accel, version;
  std::vector<QemuRow> runs;
};

template <typename T>
T Median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// CPU seconds per 10^9 bytes of guest memory.
double CpuSPerGb(double cpu_ms, uint64_t bytes) { return bytes == 0 ? 0 : cpu_ms / 1e3 / (static_cast<double>(bytes) / 1e9); }

// Round 0 alone (all memory with data): wire bytes over its duration, GB/s.
double Round0Gbps(const Row& r) {
  const engine::MigrationStats& s = r.stats;
  if (s.round_stats.empty() || s.round_stats[0].duration_ms <= 0) return 0;
  return static_cast<double>(s.round_stats[0].sent.wire_bytes) / 1e6 / s.round_stats[0].duration_ms;
}

const Baseline* FindBaseline(const std::vector<Baseline>& v, uint64_t bytes, uint32_t connections) {
  for (const Baseline& b : v) {
    if (b.bytes == bytes && b.connections == connections) return &b;
  }
  return nullptr;
}

std::vector<std::string> SplitList(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

double CpuMs(const timeval& tv) {
  return static_cast<double>(tv.tv_sec) * 1e3 + static_cast<double>(tv.tv_usec) / 1e3;
}

std::string DescribeMachine() {
  utsname u{};
  uname(&u);
  return std::to_string(std::thread::hardware_concurrency()) + " CPUs, " + CpuModelName() + ", " +
         FormatBytes(static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE))) +
         ", Linux " + u.release;
}

// ------------------------------------------------------------ migrations

struct MigrationSetupFlags {
  engine::TrackerKind tracker;
  uint32_t ring_entries = 0;
  std::chrono::nanoseconds migrate_after{0};
  bool prefault_target = false;
  engine::MigrationOptions migration;
};

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; Debian 12's headers have it, older ones may not
#endif

// What the receiving side's factory built, for stopping it afterwards.
Result<Row> MigrateOnce(const vmm::Kvm& kvm, const Scenario& sc, uint64_t size, uint32_t streams,
                        transport::Compression compress, const MigrationSetupFlags& f) {
  Row row;
  row.scenario = sc.name;
  row.guest_bytes = size;
  row.vcpus = sc.vcpus;
  row.workload = sc.workload.ToString();
  row.fill = std::string(vmm::FillModeName(sc.fill));
  row.streams = streams;
  row.compress = std::string(transport::CompressionName(compress));

  // The source VM, running its workload.
  const Clock::time_point t_prepare = Clock::now();
  vmm::MachineOptions o;
  o.guest.memory_bytes = size;
  o.guest.vcpus = sc.vcpus;
  o.guest.workload = sc.workload;
  o.guest.fill = sc.fill;
  if (f.tracker == engine::TrackerKind::kRing) o.dirty_ring_bytes = f.ring_entries * 16;
  PMLMIG_ASSIGN_OR_RETURN(auto source_vm, vmm::Machine::Create(kvm, o));
  PMLMIG_ASSIGN_OR_RETURN(auto tracker, engine::CreateTracker(f.tracker, *source_vm, {}));
  row.prepare_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_prepare).count();
  PMLMIG_RETURN_IF_ERROR(source_vm->Start());
  const Clock::time_point run_until = Clock::now() + f.migrate_after;
  while (Clock::now() < run_until) {
    PMLMIG_RETURN_IF_ERROR(source_vm->error());
    if (Interrupted()) return Aborted("interrupted");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

  // The receiver, in this process.
  vmm::TestVmFactoryOptions fo;
  row.verify = f.migration.verify ? std::string(engine::VerifyOrderName(f.migration.verify_order)) : "off";
  fo.check_memory = false;  // the test VM's page checker is not part of --verify's cost (receive runs it)
  fo.prefault = f.prefault_target;
  vmm::TestVmFactory factory(kvm, std::move(fo));
  PMLMIG_ASSIGN_OR_RETURN(auto server, transport::MigrationServer::Start("127.0.0.1:0", [&factory] {
    return factory.MakeTarget();
  }));

  transport::GrpcSinkOptions so;
  so.target = "127.0.0.1:" + std::to_string(server->port());
  so.streams = streams;
  so.compress = compress;
  PMLMIG_ASSIGN_OR_RETURN(auto sink, transport::GrpcMigrationSink::Create(so));
  engine::MigrationController controller(*source_vm, *tracker, vmm::EncodeTestVmDescription(o));
  const std::vector<uint64_t> before = vmm::PagesWritten(*source_vm);
  rusage r0{}, r1{};
  getrusage(RUSAGE_SELF, &r0);
  PMLMIG_RETURN_IF_ERROR(controller.Start(std::move(sink), f.migration));
  while (controller.busy()) {  // Ctrl-C cancels (the source VM stays, then stops)
    if (Interrupted()) (void)controller.Cancel();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  row.stats = controller.Wait();
  getrusage(RUSAGE_SELF, &r1);
  const std::vector<uint64_t> after = vmm::PagesWritten(*source_vm);
  source_vm->Stop();
  row.cpu_user_ms = CpuMs(r1.ru_utime) - CpuMs(r0.ru_utime);
  row.cpu_sys_ms = CpuMs(r1.ru_stime) - CpuMs(r0.ru_stime);
  for (size_t i = 0; i < after.size(); ++i) row.guest_pages_written += after[i] - before[i];
  const bool completed = row.stats.outcome == engine::Outcome::kCompleted;
  if (completed && !row.stats.round_stats.empty()) {
    const engine::MigrationStats& s = row.stats;
    row.final_collect_ms = static_cast<double>(tracker->stats().last_collect_ns) / 1e6;
    row.final_round_ms = s.round_stats.back().duration_ms;
    row.pause_other_ms = s.final_reply.source_paused_ms - row.final_collect_ms - row.final_round_ms;
    row.switchover_ms = s.downtime_ms - s.final_reply.source_paused_ms;
  }
  if (row.stats.total_time_ms > 0) {
    row.gbps = static_cast<double>(row.stats.transferred.wire_bytes) / 1e9 / (row.stats.total_time_ms / 1e3);
  }

  // The target's VM runs now (on success): stop it and free both guests
  // before the next migration.
  if (completed) {
    auto outcome = server->WaitForMigration(Clock::now() + std::chrono::seconds(30));
    if (outcome.ok() && outcome->vm) (void)outcome->vm->Pause();
  }
  server->Shutdown();
  return row;
}

// ------------------------------------------------------------ output

nlohmann::ordered_json RowJson(const Row& r) {
  // Batches (gRPC messages) per round: not in MigrationStatsJson's table.
  nlohmann::ordered_json batches = nlohmann::ordered_json::array();
  for (const engine::RoundStats& rs : r.stats.round_stats) batches.push_back(rs.sent.batches);
  return {{"scenario", r.scenario},
          {"guest_bytes", r.guest_bytes},
          {"vcpus", r.vcpus},
          {"workload", r.workload},
          {"fill", r.fill},
          {"streams", r.streams},
          {"compress", r.compress},
          {"verify", r.verify},
          {"prepare_ms", r.prepare_ms},
          {"throughput_gbps", r.gbps},
          {"baseline_gbps", r.baseline_gbps},
          {"ratio_to_raw_tcp", r.ratio},
          {"repeat", r.repeat},
          {"round0_gbps", Round0Gbps(r)},
          {"cpu_s_per_gb", CpuSPerGb(r.cpu_user_ms + r.cpu_sys_ms, r.guest_bytes)},
          {"cpu_user_ms", r.cpu_user_ms},
          {"cpu_sys_ms", r.cpu_sys_ms},
          {"guest_pages_written_during_migration", r.guest_pages_written},
          {"downtime_breakdown_ms",
           {{"final_collect", r.final_collect_ms},
            {"final_round", r.final_round_ms},
            {"pause_and_state", r.pause_other_ms},
            {"switchover", r.switchover_ms},
            {"target_restore", r.stats.final_reply.target_restore_ms}}},
          {"batches", r.stats.transferred.batches},
          {"round_batches", batches},
          {"migration", MigrationStatsJson(r.stats)}};
}

// With --verify every configuration runs without and then with
// verification, back to back, --repeat times interleaved: the cost is the
// difference of the medians (this machine is shared and noisy).
void PrintVerifyCost(const std::vector<Row>& rows) {
  auto same_config = [](const Row& a, const Row& b) {
    return a.scenario == b.scenario && a.guest_bytes == b.guest_bytes && a.streams == b.streams &&
           a.compress == b.compress;
  };
  auto downtimes = [&](const Row& like, const std::string& verify) {
    std::vector<double> v;
    for (const Row& r : rows) {
      if (same_config(r, like) && r.verify == verify && r.stats.outcome == engine::Outcome::kCompleted) {
        v.push_back(r.stats.downtime_ms);
      }
    }
    return v;
  };
  bool header = false;
  std::vector<std::string> done;
  for (const Row& on : rows) {
    if (on.verify == "off") continue;
    const std::string key = on.scenario + "/" + std::to_string(on.guest_bytes) + "/" + std::to_string(on.streams) +
                            "/" + on.compress + "/" + on.verify;
    if (std::find(done.begin(), done.end(), key) != done.end()) continue;
    done.push_back(key);
    const std::vector<double> off_ms = downtimes(on, "off"), on_ms = downtimes(on, on.verify);
    if (off_ms.empty() || on_ms.empty()) continue;
    std::vector<double> pause_ms, pause_pages;
    uint64_t matched = 0, runs = 0;
    for (const Row& r : rows) {
      if (!same_config(r, on) || r.verify != on.verify) continue;
      ++runs;
      pause_ms.push_back(r.stats.verification.source_digest_ms);
      pause_pages.push_back(static_cast<double>(r.stats.verification.source.pause_pages));
      if (r.stats.verification.verdict == engine::VerifyVerdict::kMatched) ++matched;
    }
    if (!header) {
      std::printf("\nverification cost (medians over interleaved runs): downtime off -> on (delta) | source digest "
                  "at the pause: pages, ms | runs matched\n");
      header = true;
    }
    const double off = Median(off_ms), with = Median(on_ms);
    std::printf("%-10s %7s %13s %7.1f -> %7.1f (%+6.1f) ms | %8.0f pages %6.1f ms | %llu/%llu (n=%zu/%zu)\n",
                on.scenario.c_str(), FormatBytes(on.guest_bytes).c_str(), on.verify.c_str(), off, with, with - off,
                Median(pause_pages), Median(pause_ms), static_cast<unsigned long long>(matched),
                static_cast<unsigned long long>(runs), off_ms.size(), on_ms.size());
  }
}

void PrintBaselines(const char* what, const std::vector<Baseline>& baselines) {
  if (baselines.empty()) return;
  std::printf("%s (median):", what);
  for (const Baseline& b : baselines) {
    std::printf("  %s x%u %.2f GB/s (cpu %.0f%%, %.2f CPU-s/GB)", FormatBytes(b.bytes).c_str(), b.connections, b.gbps,
                Median(b.cpu_ms) / (Median(b.seconds) * 1e3) * 100, b.cpu_s_per_gb);
  }
  std::printf("\n");
}

void PrintTable(const std::vector<Baseline>& reused, const std::vector<Baseline>& fresh, const std::vector<Row>& rows) {
  PrintBaselines("(a) raw loopback TCP into a reused buffer, 1 MiB writes, N connections", reused);
  PrintBaselines("(b) raw loopback TCP into a fresh memfd of the guest's size, N connections", fresh);
  std::printf("\n");
  std::printf("%-10s %7s %5s %7s %8s %13s %9s %9s %11s %6s %12s %7s %6s %8s %6s %s\n", "scenario", "guest", "vcpus",
              "streams", "compress", "verify", "total_ms", "setup_ms", "downtime_ms", "rounds", "transferred", "GB/s", "x_raw",
              "r0_GB/s", "cpu%", "status");
  for (const Row& r : rows) {
    const engine::MigrationStats& s = r.stats;
    const bool ok = s.outcome == engine::Outcome::kCompleted;
    const double cpu = s.total_time_ms > 0 ? (r.cpu_user_ms + r.cpu_sys_ms) / s.total_time_ms * 100 : 0;
    char downtime[32];
    if (ok) {
      std::snprintf(downtime, sizeof downtime, "%.1f", s.downtime_ms);
    } else {
      std::snprintf(downtime, sizeof downtime, "-");
    }
    const double round0 = Round0Gbps(r);
    std::printf("%-10s %7s %5u %7u %8s %13s %9.1f %9.1f %11s %6u %12s %7.3f %6.3f %8.3f %6.0f %s\n", r.scenario.c_str(),
                FormatBytes(r.guest_bytes).c_str(), r.vcpus, r.streams, r.compress.c_str(), r.verify.c_str(),
                s.total_time_ms,
                s.setup_time_ms, downtime, s.rounds, FormatBytes(s.transferred.wire_bytes).c_str(), r.gbps, r.ratio,
                round0, cpu, ok ? "completed" : (std::string(engine::OutcomeName(s.outcome)) + ": " + s.error).c_str());
  }
  std::printf("\ndowntime of completed migrations, ms: final collection | stop-and-copy round (pages, batches) | "
              "vCPU pause, state capture (and, verifying before commit, the wait for the source's digest) | Final to "
              "the target's reply (of which target restore and digest comparison)\n");
  for (const Row& r : rows) {
    const engine::MigrationStats& s = r.stats;
    if (s.outcome != engine::Outcome::kCompleted || s.round_stats.empty()) continue;
    std::printf("%-10s %7s %7u %8s %13s %7.1f = %6.2f | %6.2f (%" PRIu64 ", %" PRIu64 ") | %6.2f | %6.2f (%.2f)\n",
                r.scenario.c_str(), FormatBytes(r.guest_bytes).c_str(), r.streams, r.compress.c_str(),
                r.verify.c_str(), s.downtime_ms,
                r.final_collect_ms, r.final_round_ms, s.round_stats.back().sent.pages,
                s.round_stats.back().sent.batches, r.pause_other_ms, r.switchover_ms,
                s.final_reply.target_restore_ms);
  }
  PrintVerifyCost(rows);
}

// ------------------------------------------------------------ comparison

// QEMU's median for one size and channel count (0: one channel).
struct QemuMedian {
  size_t runs = 0;
  double total_ms = 0, gbps = 0, cpu_s_per_gb = 0;
};

QemuMedian MedianOf(const QemuPeer& q, uint64_t bytes, uint32_t channels) {
  std::vector<double> ms, cpu;
  for (const QemuRow& r : q.runs) {
    if (r.guest_bytes != bytes || r.channels != channels) continue;
    ms.push_back(r.run.total_ms);
    cpu.push_back(CpuSPerGb(r.run.source_cpu_ms + r.run.target_cpu_ms, bytes));
  }
  QemuMedian m;
  m.runs = ms.size();
  if (ms.empty()) return m;
  m.total_ms = Median(ms);
  m.gbps = m.total_ms > 0 ? static_cast<double>(bytes) / 1e6 / m.total_ms : 0;
  m.cpu_s_per_gb = Median(cpu);
  return m;
}

// One pmlmig configuration against its limits and QEMU: medians over the
// interleaved runs. GB/s here is guest bytes over time, for every column.
struct Comparison {
  std::string scenario, compress, verify;
  uint64_t guest_bytes = 0;
  uint32_t streams = 1;
  size_t runs = 0, completed = 0;
  double time_ms = 0, gbps = 0, round0_gbps = 0, cpu_s_per_gb = 0;  // pmlmig, completed runs
  const Baseline* reused = nullptr;  // (a)
  const Baseline* fresh = nullptr;   // (b), with --peers
  QemuMedian qemu_single, qemu_multifd;
  double x_faster = 0;          // QEMU multifd time / pmlmig time
  double of_fresh = 0;          // pmlmig GB/s / (b) GB/s
  double round0_of_reused = 0;  // round 0 GB/s / (a) GB/s
};

std::vector<Comparison> Compare(const std::vector<Row>& rows, const std::vector<Baseline>& reused,
                                const std::vector<Baseline>& fresh, const QemuPeer& qemu) {
  std::vector<Comparison> out;
  auto same = [](const Comparison& c, const Row& r) {
    return c.scenario == r.scenario && c.guest_bytes == r.guest_bytes && c.streams == r.streams &&
           c.compress == r.compress && c.verify == r.verify;
  };
  for (const Row& r : rows) {
    if (std::any_of(out.begin(), out.end(), [&](const Comparison& c) { return same(c, r); })) continue;
    Comparison c;
    c.scenario = r.scenario;
    c.compress = r.compress;
    c.verify = r.verify;
    c.guest_bytes = r.guest_bytes;
    c.streams = r.streams;
    std::vector<double> ms, r0, cpu;
    for (const Row& x : rows) {
      if (!same(c, x)) continue;
      ++c.runs;
      if (x.stats.outcome != engine::Outcome::kCompleted) continue;
      ++c.completed;
      ms.push_back(x.stats.total_time_ms);
      r0.push_back(Round0Gbps(x));
      cpu.push_back(CpuSPerGb(x.cpu_user_ms + x.cpu_sys_ms, x.guest_bytes));
    }
    if (!ms.empty()) {
      c.time_ms = Median(ms);
      c.gbps = c.time_ms > 0 ? static_cast<double>(c.guest_bytes) / 1e6 / c.time_ms : 0;
      c.round0_gbps = Median(r0);
      c.cpu_s_per_gb = Median(cpu);
    }
    c.reused = FindBaseline(reused, c.guest_bytes, c.streams);
    c.fresh = FindBaseline(fresh, c.guest_bytes, c.streams);
    c.qemu_single = MedianOf(qemu, c.guest_bytes, 0);
    c.qemu_multifd = MedianOf(qemu, c.guest_bytes, c.streams);
    if (c.time_ms > 0 && c.qemu_multifd.runs > 0) c.x_faster = c.qemu_multifd.total_ms / c.time_ms;
    if (c.fresh != nullptr && c.fresh->gbps > 0) c.of_fresh = c.gbps / c.fresh->gbps;
    if (c.reused != nullptr && c.reused->gbps > 0) c.round0_of_reused = c.round0_gbps / c.reused->gbps;
    out.push_back(c);
  }
  return out;
}

// "-" for a figure not measured.
std::string Fig(double v, const char* format, bool measured = true) {
  if (!measured) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

void PrintComparison(const std::vector<Comparison>& cs, const QemuPeer& qemu, uint32_t repeat) {
  std::printf("\ncomparison, medians of %u interleaved run(s); GB/s = guest bytes (10^9) / time; CPU-s/GB = CPU "
              "seconds (both sides) per 10^9 guest bytes; (a) raw TCP into a reused buffer, (b) raw TCP into a "
              "fresh memfd, both with as many connections as streams; QEMU%s\n",
              repeat,
              qemu.binary.empty()  ? (": skipped (" + qemu.skipped + ")").c_str()
              : qemu.runs.empty() ? (": failed (" + qemu.skipped + ")").c_str()
                                  : (" " + qemu.version + ", -accel " + qemu.accel +
                                     ", paused guest in /dev/shm, time = query-migrate total-time" +
                                     (qemu.skipped.empty() ? "" : "; stopped: " + qemu.skipped))
                                        .c_str());
  std::printf("%-10s %7s %7s %8s %13s %9s %7s %7s %7s %9s %9s %8s %6s %6s | %-37s\n", "scenario", "guest", "streams",
              "compress", "verify", "pmlmig_s", "GB/s", "(a)", "(b)", "qemu1_s", "qemuN_s", "x_faster", "/(b)",
              "r0/(a)", "CPU-s/GB: pmlmig   (a)    (b)  qemu1  qemuN");
  for (const Comparison& c : cs) {
    const bool ok = c.completed > 0;
    std::printf("%-10s %7s %7u %8s %13s %9s %7s %7s %7s %9s %9s %8s %6s %6s | %16s %5s %6s %6s %6s\n",
                c.scenario.c_str(), FormatBytes(c.guest_bytes).c_str(), c.streams, c.compress.c_str(),
                c.verify.c_str(), Fig(c.time_ms / 1e3, "%.3f", ok).c_str(), Fig(c.gbps, "%.3f", ok).c_str(),
                Fig(c.reused ? c.reused->gbps : 0, "%.2f", c.reused).c_str(),
                Fig(c.fresh ? c.fresh->gbps : 0, "%.2f", c.fresh).c_str(),
                Fig(c.qemu_single.total_ms / 1e3, "%.3f", c.qemu_single.runs > 0).c_str(),
                Fig(c.qemu_multifd.total_ms / 1e3, "%.3f", c.qemu_multifd.runs > 0).c_str(),
                Fig(c.x_faster, "%.2f", c.x_faster > 0).c_str(), Fig(c.of_fresh, "%.2f", c.of_fresh > 0).c_str(),
                Fig(c.round0_of_reused, "%.2f", ok && c.reused).c_str(), Fig(c.cpu_s_per_gb, "%.2f", ok).c_str(),
                Fig(c.reused ? c.reused->cpu_s_per_gb : 0, "%.2f", c.reused).c_str(),
                Fig(c.fresh ? c.fresh->cpu_s_per_gb : 0, "%.2f", c.fresh).c_str(),
                Fig(c.qemu_single.cpu_s_per_gb, "%.2f", c.qemu_single.runs > 0).c_str(),
                Fig(c.qemu_multifd.cpu_s_per_gb, "%.2f", c.qemu_multifd.runs > 0).c_str());
  }
  std::printf("x_faster: QEMU multifd (as many channels as streams) time / pmlmig time; /(b): pmlmig GB/s / (b); "
              "r0/(a): round 0's GB/s (wire bytes) / (a), meaningful with --prefault-target\n");
}

// ------------------------------------------------------------ results

nlohmann::ordered_json BaselinesJson(const std::vector<Baseline>& v) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const Baseline& b : v) {
    out.push_back({{"bytes", b.bytes},
                   {"connections", b.connections},
                   {"write_bytes", kBaselineChunk},
                   {"seconds", b.seconds},
                   {"cpu_ms", b.cpu_ms},
                   {"median_seconds", Median(b.seconds)},
                   {"gbps", b.gbps},
                   {"cpu_s_per_gb", b.cpu_s_per_gb}});
  }
  return out;
}

nlohmann::ordered_json QemuJson(const QemuPeer& q, const std::vector<uint64_t>& sizes,
                                const std::vector<uint32_t>& channels) {
  nlohmann::ordered_json j = {{"status", q.binary.empty() ? "skipped" : (q.skipped.empty() ? "ran" : "failed")},
                              {"reason", q.skipped},
                              {"binary", q.binary},
                              {"version", q.version},
                              {"accel", q.accel},
                              {"memory", "memory-backend-file share=on in /dev/shm, both sides; guest paused (-S)"},
                              {"runs", nlohmann::ordered_json::array()},
                              {"medians", nlohmann::ordered_json::array()}};
  for (const QemuRow& r : q.runs) {
    j["runs"].push_back({{"guest_bytes", r.guest_bytes},
                         {"multifd", r.channels > 0},
                         {"channels", r.channels == 0 ? 1 : r.channels},
                         {"repeat", r.repeat},
                         {"total_ms", r.run.total_ms},
                         {"setup_ms", r.run.setup_ms},
                         {"downtime_ms", r.run.downtime_ms},
                         {"wall_ms", r.run.wall_ms},
                         {"target_wall_ms", r.run.target_wall_ms},
                         {"transferred_bytes", r.run.transferred_bytes},
                         {"normal_pages", r.run.normal_pages},
                         {"zero_pages", r.run.zero_pages},
                         {"source_cpu_ms", r.run.source_cpu_ms},
                         {"target_cpu_ms", r.run.target_cpu_ms},
                         {"gbps", r.run.total_ms > 0 ? static_cast<double>(r.guest_bytes) / 1e6 / r.run.total_ms : 0},
                         {"cpu_s_per_gb", CpuSPerGb(r.run.source_cpu_ms + r.run.target_cpu_ms, r.guest_bytes)}});
  }
  std::vector<uint32_t> all = {0};
  all.insert(all.end(), channels.begin(), channels.end());
  for (uint64_t bytes : sizes) {
    for (size_t i = 0; i < all.size(); ++i) {
      if (std::find(all.begin(), all.begin() + static_cast<long>(i), all[i]) != all.begin() + static_cast<long>(i)) {
        continue;
      }
      const QemuMedian m = MedianOf(q, bytes, all[i]);
      if (m.runs == 0) continue;
      j["medians"].push_back({{"guest_bytes", bytes},
                              {"multifd", all[i] > 0},
                              {"channels", all[i] == 0 ? 1 : all[i]},
                              {"runs", m.runs},
                              {"total_ms", m.total_ms},
                              {"gbps", m.gbps},
                              {"cpu_s_per_gb", m.cpu_s_per_gb}});
    }
  }
  return j;
}

nlohmann::ordered_json ComparisonJson(const Comparison& c) {
  auto or_null = [](bool measured, double v) { return measured ? nlohmann::ordered_json(v) : nlohmann::ordered_json(); };
  const bool ok = c.completed > 0;
  return {{"scenario", c.scenario},
          {"guest_bytes", c.guest_bytes},
          {"streams", c.streams},
          {"compress", c.compress},
          {"verify", c.verify},
          {"runs", c.runs},
          {"completed", c.completed},
          {"pmlmig_ms", or_null(ok, c.time_ms)},
          {"pmlmig_gbps", or_null(ok, c.gbps)},
          {"pmlmig_round0_gbps", or_null(ok, c.round0_gbps)},
          {"pmlmig_cpu_s_per_gb", or_null(ok, c.cpu_s_per_gb)},
          {"reused_buffer_gbps", or_null(c.reused, c.reused ? c.reused->gbps : 0)},
          {"reused_buffer_cpu_s_per_gb", or_null(c.reused, c.reused ? c.reused->cpu_s_per_gb : 0)},
          {"fresh_memory_gbps", or_null(c.fresh, c.fresh ? c.fresh->gbps : 0)},
          {"fresh_memory_cpu_s_per_gb", or_null(c.fresh, c.fresh ? c.fresh->cpu_s_per_gb : 0)},
          {"qemu_single_ms", or_null(c.qemu_single.runs > 0, c.qemu_single.total_ms)},
          {"qemu_single_gbps", or_null(c.qemu_single.runs > 0, c.qemu_single.gbps)},
          {"qemu_single_cpu_s_per_gb", or_null(c.qemu_single.runs > 0, c.qemu_single.cpu_s_per_gb)},
          {"qemu_multifd_ms", or_null(c.qemu_multifd.runs > 0, c.qemu_multifd.total_ms)},
          {"qemu_multifd_gbps", or_null(c.qemu_multifd.runs > 0, c.qemu_multifd.gbps)},
          {"qemu_multifd_cpu_s_per_gb", or_null(c.qemu_multifd.runs > 0, c.qemu_multifd.cpu_s_per_gb)},
          {"x_faster_than_qemu_multifd", or_null(c.x_faster > 0, c.x_faster)},
          {"ratio_to_fresh_memory", or_null(c.of_fresh > 0, c.of_fresh)},
          {"round0_ratio_to_reused_buffer", or_null(ok && c.reused, c.round0_of_reused)}};
}

struct Results {
  std::vector<uint64_t> sizes;
  std::vector<uint32_t> streams;
  std::vector<Baseline> reused, fresh;  // (a), (b)
  std::vector<Row> rows;
  QemuPeer qemu;
};

// The JSON document (--json, or next to --plot) and the plots.
Status WriteResults(const MigrateBenchFlags& f, uint32_t repeat, const Results& res,
                    const std::vector<Comparison>& comparison) {
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  nlohmann::ordered_json doc = {{"benchmark", "migrate"},
                                {"date", date},
                                {"machine", DescribeMachine()},
                                {"tracker", f.tracker},
                                {"downtime_limit_ms", f.downtime_limit_ms},
                                {"max_rounds", f.max_rounds},
                                {"on_timeout", f.on_timeout},
                                {"migrate_after", f.migrate_after},
                                {"verify", f.verify},
                                {"verify_order", f.verify_order},
                                {"repeat", repeat},
                                {"peers", f.peers},
                                {"prefault_target", f.prefault_target},
                                {"baseline", BaselinesJson(res.reused)},
                                {"fresh_memory_baseline", BaselinesJson(res.fresh)},
                                {"qemu", QemuJson(res.qemu, res.sizes, res.streams)},
                                {"results", nlohmann::ordered_json::array()},
                                {"comparison", nlohmann::ordered_json::array()}};
  for (const Row& r : res.rows) doc["results"].push_back(RowJson(r));
  for (const Comparison& c : comparison) doc["comparison"].push_back(ComparisonJson(c));
  std::string json_path = f.json;
  if (json_path.empty() && !f.plot.empty()) json_path = f.plot + ".json";
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << doc.dump(2) << "\n";
    if (!out) return Internal("cannot write " + json_path);
  }
  if (!f.plot.empty()) {
    PMLMIG_RETURN_IF_ERROR(PlotMigrateBench(json_path, f.plot));
    std::fprintf(stderr, "plot written to %s\n", f.plot.c_str());
    if (res.streams.size() > 1) {
      const std::string streams_png = StreamsPlotPath(f.plot);
      PMLMIG_RETURN_IF_ERROR(PlotMigrateStreams(json_path, streams_png));
      std::fprintf(stderr, "throughput against stream count written to %s\n", streams_png.c_str());
    }
  }
  return Status::Ok();
}

// ------------------------------------------------------------ the run

// Runs (a), and with --peers (b), once for `bytes` over `connections`, and
// adds the run to its baseline.
Status RunBaselines(uint64_t bytes, uint32_t connections, bool fresh_too, uint64_t seed, Results& res) {
  auto add = [&](std::vector<Baseline>& v, const TcpRun& run, const char* what) {
    Baseline* b = nullptr;
    for (Baseline& x : v) {
      if (x.bytes == bytes && x.connections == connections) b = &x;
    }
    if (b == nullptr) {
      v.push_back({bytes, connections, {}, {}, 0, 0});
      b = &v.back();
    }
    b->seconds.push_back(run.seconds);
    b->cpu_ms.push_back(run.cpu_ms);
    b->gbps = static_cast<double>(bytes) / 1e9 / Median(b->seconds);
    b->cpu_s_per_gb = CpuSPerGb(Median(b->cpu_ms), bytes);
    std::fprintf(stderr, "baseline %s: %s over %u loopback TCP connection%s in %.3f s: %.2f GB/s, cpu %.0f%%\n", what,
                 FormatBytes(bytes).c_str(), connections, connections == 1 ? "" : "s", run.seconds,
                 static_cast<double>(bytes) / 1e9 / run.seconds, run.cpu_ms / (run.seconds * 1e3) * 100);
  };
  auto reused = TcpIntoReusedBuffer(bytes, connections);
  if (!reused.ok()) return reused.status().WithContext("baseline (a), reused buffer");
  add(res.reused, *reused, "(a) reused buffer");
  if (!fresh_too) return Status::Ok();
  auto fresh = TcpIntoFreshMemory(bytes, connections, seed);
  if (!fresh.ok()) return fresh.status().WithContext("baseline (b), fresh memory");
  add(res.fresh, *fresh, "(b) fresh memfd");
  return Status::Ok();
}

// One QEMU migration into res.qemu; a failure stops QEMU for the rest of
// the benchmark (the reason is reported) unless it was Ctrl-C.
Status RunQemu(uint64_t bytes, uint32_t channels, uint32_t rep, uint64_t seed, uint32_t timeout_s, Results& res) {
  QemuPeer& q = res.qemu;
  if (q.binary.empty() || !q.skipped.empty()) return Status::Ok();
  QemuMigrateOptions o;
  o.binary = q.binary;
  o.bytes = bytes;
  o.multifd_channels = channels;
  o.seed = seed;
  o.accel = q.accel;
  o.timeout = std::chrono::seconds(timeout_s);
  auto run = QemuMigrate(o);
  const std::string what = channels == 0 ? "one channel" : "multifd, " + std::to_string(channels) + " channel" +
                                                               (channels == 1 ? "" : "s");
  if (!run.ok()) {
    if (run.status().code() == Code::kAborted) return run.status();
    q.skipped = FormatBytes(bytes) + ", " + what + ": " + run.status().message();
    PrintError("qemu: " + q.skipped);
    return run.status();
  }
  q.accel = run->accel;
  q.version = run->version;
  std::fprintf(stderr,
               "qemu %s, %s: total-time %.0f ms (polled %.0f ms, target done at %.0f ms), %.3f GB/s, cpu source "
               "%.0f ms + target %.0f ms\n",
               FormatBytes(bytes).c_str(), what.c_str(), run->total_ms, run->wall_ms, run->target_wall_ms,
               run->total_ms > 0 ? static_cast<double>(bytes) / 1e6 / run->total_ms : 0, run->source_cpu_ms,
               run->target_cpu_ms);
  q.runs.push_back({bytes, channels, rep, *run});
  return Status::Ok();
}

int RunMigrateBench(const MigrateBenchFlags& f) {
  // Every flag is checked before anything runs.
  std::vector<uint64_t> sizes;
  for (const std::string& item : SplitList(f.sizes)) {
    auto v = ParseSize(item);
    if (!v.ok()) return PrintError("--sizes: " + v.status().message()), kExitUsage;
    if (auto l = vmm::PcLayout(*v); !l.ok()) return PrintError("--sizes: " + l.status().message()), kExitUsage;
    sizes.push_back(*v);
  }
  if (sizes.empty()) return PrintError("--sizes: empty list"), kExitUsage;
  auto hotset = vmm::ParseWorkload(f.hotset);
  if (!hotset.ok()) return PrintError("--hotset: " + hotset.status().message()), kExitUsage;
  if (f.hotset_vcpus == 0 || f.hotset_vcpus > PMLMIG_MAX_VCPUS) {
    return PrintError("--hotset-vcpus: must be 1.." + std::to_string(PMLMIG_MAX_VCPUS)), kExitUsage;
  }
  std::vector<Scenario> scenarios;
  for (const std::string& name : SplitList(f.scenarios)) {
    Scenario sc;
    sc.name = name;
    if (name == "untouched") {
      sc.fill = vmm::FillMode::kZero;
    } else if (name == "random") {
      sc.fill = vmm::FillMode::kRandom;
    } else if (name == "hotset") {
      sc.fill = vmm::FillMode::kRandom;
      sc.workload = *hotset;
      sc.vcpus = f.hotset_vcpus;
    } else {
      return PrintError("--scenarios: '" + name + "' is not untouched, random or hotset"), kExitUsage;
    }
    scenarios.push_back(sc);
  }
  if (scenarios.empty()) return PrintError("--scenarios: empty list"), kExitUsage;
  std::vector<uint32_t> stream_counts;
  for (const std::string& item : SplitList(f.streams)) {
    char* end = nullptr;
    const unsigned long n = std::strtoul(item.c_str(), &end, 10);
    if (end == item.c_str() || *end != '\0' || n == 0 || n > transport::kMaxStreams) {
      return PrintError("--streams: '" + item + "' is not a number from 1 to " +
                        std::to_string(transport::kMaxStreams)), kExitUsage;
    }
    stream_counts.push_back(static_cast<uint32_t>(n));
  }
  if (stream_counts.empty()) return PrintError("--streams: empty list"), kExitUsage;
  std::vector<transport::Compression> compressions;
  for (const std::string& item : SplitList(f.compress)) {
    auto c = transport::ParseCompression(item);
    if (!c.ok()) return PrintError("--compress: " + c.status().message()), kExitUsage;
    compressions.push_back(*c);
  }
  if (compressions.empty()) return PrintError("--compress: empty list"), kExitUsage;
  MigrationSetupFlags setup;
  {
    auto kind = engine::ParseTrackerKind(f.tracker);
    if (!kind.ok()) return PrintError("--tracker: " + kind.status().message()), kExitUsage;
    if (*kind == engine::TrackerKind::kNone) return PrintError("--tracker: a migration needs a tracker"), kExitUsage;
    setup.tracker = *kind;
  }
  auto after = ParseDuration(f.migrate_after);
  if (!after.ok()) return PrintError("--migrate-after: " + after.status().message()), kExitUsage;
  setup.migrate_after = *after;
  setup.prefault_target = f.prefault_target;
  setup.migration.convergence.downtime_limit = std::chrono::milliseconds(f.downtime_limit_ms);
  setup.migration.convergence.max_rounds = f.max_rounds;
  if (f.on_timeout != "cancel" && f.on_timeout != "force") {
    return PrintError("--on-timeout: '" + f.on_timeout + "' is not cancel or force"), kExitUsage;
  }
  setup.migration.convergence.force_on_timeout = f.on_timeout == "force";
  std::vector<MigrationSetupFlags> variants{setup};  // verification off first, then each order asked for
  if (f.verify) {
    for (const std::string& item : SplitList(f.verify_order)) {
      if (item != "before-commit" && item != "after-commit") {
        return PrintError("--verify-order: '" + item + "' is not before-commit or after-commit"), kExitUsage;
      }
      MigrationSetupFlags v = setup;
      v.migration.verify = true;
      v.migration.verify_order =
          item == "before-commit" ? engine::VerifyOrder::kBeforeCommit : engine::VerifyOrder::kAfterCommit;
      variants.push_back(v);
    }
  }
  if (f.baseline_runs == 0) return PrintError("--baseline-runs must be at least 1"), kExitUsage;
  if (!f.peers && f.qemu != MigrateBenchFlags{}.qemu) return PrintError("--qemu needs --peers"), kExitUsage;
  if (f.qemu.empty()) return PrintError("--qemu: empty"), kExitUsage;
  if (f.qemu_timeout_s == 0) return PrintError("--qemu-timeout must be at least 1 (seconds)"), kExitUsage;
  if (f.plot.find('\'') != std::string::npos || f.json.find('\'') != std::string::npos) {
    return PrintError("--plot, --json: file names must not contain a quote"), kExitUsage;
  }
  // A random-content guest is resident twice (source and target); so are
  // the buffers of (b) and QEMU's two guests, which also need /dev/shm.
  const uint64_t avail = HostAvailableMemory();
  const uint64_t largest = *std::max_element(sizes.begin(), sizes.end());
  if (f.peers && avail != 0 && 2 * largest > avail / 10 * 9) {
    return PrintError("--peers needs 2 x " + FormatBytes(largest) + " of host memory (the baseline's source and "
                      "target, QEMU's two guests) but only " + FormatBytes(avail) + " is available; use smaller --sizes"),
           kExitUsage;
  }
  if (f.peers) {
    struct statvfs shm {};
    if (::statvfs("/dev/shm", &shm) == 0 && 2 * largest > static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize) {
      return PrintError("--peers: QEMU's two guests need 2 x " + FormatBytes(largest) + " in /dev/shm but only " +
                        FormatBytes(static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize) + " is free there"),
             kExitUsage;
    }
  }
  for (const Scenario& sc : scenarios) {
    if (sc.fill != vmm::FillMode::kRandom) continue;
    if (avail != 0 && 2 * largest > avail / 10 * 9) {
      return PrintError("the " + sc.name + " scenario needs 2 x " + FormatBytes(largest) +
                        " of host memory (source and target) but only " + FormatBytes(avail) +
                        " is available; use smaller --sizes"), kExitUsage;
    }
  }

  const uint32_t repeat = f.peers && !f.repeat_given ? 3 : f.repeat;
  const uint64_t seed = vmm::TestGuestConfig{}.seed;  // the random scenarios' fill
  Results res;
  res.sizes = sizes;
  res.streams = stream_counts;
  if (!f.peers) {
    res.qemu.skipped = "not asked for: --peers";
  } else {
    res.qemu.binary = FindOnPath(f.qemu);
    if (res.qemu.binary.empty()) {
      res.qemu.skipped = f.qemu + " not installed";
      std::fprintf(stderr, "qemu: skipped (%s)\n", res.qemu.skipped.c_str());
    }
  }

  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  if (setup.tracker == engine::TrackerKind::kRing) {
    const vmm::HostCapabilities caps = vmm::ProbeHost(*kvm);
    if (!caps.dirty_ring) return PrintError("this host's KVM has no dirty ring; use --tracker bitmap"), kExitFailure;
    setup.ring_entries = std::min<uint32_t>(65536, caps.dirty_ring_max_entries);
    for (MigrationSetupFlags& v : variants) v.ring_entries = setup.ring_entries;
  }
  InstallInterruptHandler();

  // Every --repeat iteration runs everything once, in turn, so drift on this
  // machine hits every figure alike: per size, QEMU with one channel, then
  // per stream count the baselines, the migrations (each verification variant
  // back to back) and QEMU multifd. The baselines run --baseline-runs times
  // in all, spread over the iterations (at least once in each).
  const uint32_t baseline_total = std::max(f.baseline_runs, repeat);
  bool all_completed = true;
  // QEMU's run (if it runs at all); false only on Ctrl-C.
  auto qemu = [&](uint64_t size, uint32_t channels, uint32_t rep) {
    const Status s = RunQemu(size, channels, rep, seed, f.qemu_timeout_s, res);
    if (!s.ok() && s.code() != Code::kAborted) all_completed = false;
    return s.code() != Code::kAborted;
  };
  for (uint32_t rep = 0; rep < repeat; ++rep) {
    const uint32_t baseline_now = baseline_total / repeat + (rep < baseline_total % repeat ? 1 : 0);
    for (uint64_t size : sizes) {
      if (Interrupted() || !qemu(size, 0, rep)) return PrintError("interrupted"), kExitInterrupted;
      for (uint32_t streams : stream_counts) {
        for (uint32_t i = 0; i < baseline_now; ++i) {
          if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
          if (Status s = RunBaselines(size, streams, f.peers, seed, res); !s.ok()) {
            return PrintError(s.message()), kExitFailure;
          }
        }
        for (const Scenario& sc : scenarios) {
          for (transport::Compression c : compressions) {
            for (const MigrationSetupFlags& variant : variants) {
              if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
              auto row = MigrateOnce(*kvm, sc, size, streams, c, variant);
              if (!row.ok()) {
                return PrintError(sc.name + " " + FormatBytes(size) + ": " + row.status().message()), kExitFailure;
              }
              row->repeat = rep;
              const engine::MigrationStats& s = row->stats;
              std::fprintf(stderr,
                           "%-9s %s, %u stream%s, %s, verify %s: %s in %.1f ms, downtime %.1f ms, %u rounds, %s, "
                           "%.3f GB/s%s%s\n",
                           sc.name.c_str(), FormatBytes(size).c_str(), streams, streams == 1 ? "" : "s",
                           row->compress.c_str(), row->verify.c_str(),
                           std::string(engine::OutcomeName(s.outcome)).c_str(), s.total_time_ms, s.downtime_ms,
                           s.rounds, FormatBytes(s.transferred.wire_bytes).c_str(), row->gbps,
                           s.error.empty() ? "" : ": ", s.error.c_str());
              if (s.outcome != engine::Outcome::kCompleted) all_completed = false;
              if (s.verification.verdict == engine::VerifyVerdict::kMismatch) all_completed = false;
              res.rows.push_back(std::move(*row));
            }
          }
        }
        if (!qemu(size, streams, rep)) return PrintError("interrupted"), kExitInterrupted;
      }
    }
  }
  // Each migration against the median of (a) of its size and stream count.
  for (Row& r : res.rows) {
    const Baseline* b = FindBaseline(res.reused, r.guest_bytes, r.streams);
    r.baseline_gbps = b != nullptr ? b->gbps : 0;
    r.ratio = r.baseline_gbps > 0 ? r.gbps / r.baseline_gbps : 0;
  }

  PrintTable(res.reused, res.fresh, res.rows);
  const std::vector<Comparison> comparison = Compare(res.rows, res.reused, res.fresh, res.qemu);
  PrintComparison(comparison, res.qemu, repeat);

  if (Status s = WriteResults(f, repeat, res, comparison); !s.ok()) return PrintError(s.message()), kExitFailure;
  if (!all_completed) {
    PrintError(res.qemu.skipped.empty() || res.qemu.binary.empty()
                   ? "not every migration completed (see the status column)"
                   : "not every migration completed (QEMU: " + res.qemu.skipped + ")");
    return kExitFailure;
  }
  return kExitOk;
}

}  // namespace

Command RegisterBenchMigrate(CLI::App& bench) {
  auto f = std::make_shared<MigrateBenchFlags>();
  auto* cmd = bench.add_subcommand(
      "migrate", "Live migration over loopback gRPC (in one process) against raw loopback TCP throughput");
  cmd->add_option("--sizes", f->sizes, "Guest sizes, comma-separated")->capture_default_str();
  cmd->add_option("--scenarios", f->scenarios,
                  "Which guests: untouched (zero fill, idle), random (random fill, idle), hotset (random fill, "
                  "--hotset-vcpus vCPUs writing --hotset)")
      ->capture_default_str();
  cmd->add_option("--streams", f->streams, "Parallel data streams; a comma-separated list runs each")
      ->capture_default_str();
  cmd->add_option("--compress", f->compress, "none, lz4 or zstd; a comma-separated list runs each")
      ->capture_default_str();
  cmd->add_option("--downtime-limit", f->downtime_limit_ms, "Switch over once the expected downtime is at most this (ms)")
      ->capture_default_str();
  cmd->add_option("--max-rounds", f->max_rounds, "Live rounds before acting on --on-timeout")->capture_default_str();
  cmd->add_option("--on-timeout", f->on_timeout, "cancel (the migration fails) or force (switch over anyway)")
      ->capture_default_str();
  cmd->add_option("--tracker", f->tracker, "ring, bitmap or bitmap-clear")->capture_default_str();
  cmd->add_option("--migrate-after", f->migrate_after, "How long each source VM runs before it is migrated")
      ->capture_default_str();
  cmd->add_option("--hotset", f->hotset, "Workload of the hotset scenario")->capture_default_str();
  cmd->add_option("--hotset-vcpus", f->hotset_vcpus, "vCPUs of the hotset scenario")->capture_default_str();
  cmd->add_option("--baseline-runs", f->baseline_runs,
                  "Runs of each loopback TCP baseline per size and stream count, spread over the --repeat iterations "
                  "(at least one in each; the median is used)")
      ->capture_default_str();
  CLI::Option* repeat =
      cmd->add_option("--repeat", f->repeat,
                      "Run everything this many times, interleaved (medians are reported); 3 with --peers")
          ->check(CLI::Range(1, 100))
          ->capture_default_str();
  cmd->add_option("--verify-order", f->verify_order,
                  "With --verify: before-commit, after-commit, or both comma-separated")
      ->capture_default_str();
  cmd->add_flag("--verify", f->verify,
                "Run each migration twice, back to back: without and with verification (chunk digests of both "
                "sides), and report the difference");
  cmd->add_flag("--prefault-target", f->prefault_target,
                "Make the target's memory resident when it is built (inside setup): separates the cost of "
                "first-touching fresh memory from the transfer");
  cmd->add_flag("--peers", f->peers,
                "Also measure the limit and the peer, interleaved with the migrations: (b) raw TCP into a fresh memfd "
                "of the guest's size, and QEMU (one channel and multifd with as many channels as streams) when "
                "--qemu is installed; --repeat defaults to 3");
  cmd->add_option("--qemu", f->qemu, "With --peers: the QEMU binary, looked up on PATH unless it is a path")
      ->capture_default_str();
  cmd->add_option("--qemu-timeout", f->qemu_timeout_s, "With --peers: seconds one QEMU migration may take")
      ->capture_default_str();
  cmd->add_option("--json", f->json,
                  "Write the baselines, QEMU's runs, every migration's statistics and the comparison as JSON to this "
                  "file");
  cmd->add_option("--plot", f->plot,
                  "Write a PNG of per-round dirty pages and bandwidth of the hotset migrations; with several "
                  "--streams also FILE-streams.png, throughput against stream count");
  return [f, repeat]() {
    f->repeat_given = repeat->count() > 0;
    return RunMigrateBench(*f);
  };
}

}  // namespace pmlmig::tools
