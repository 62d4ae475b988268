// pmlmig bench migrate: live migration over loopback gRPC against raw
// loopback TCP, in one process and one invocation.
//
// 1. Baseline: for each guest size, that many bytes over a plain TCP
//    connection on 127.0.0.1 between two threads (1 MiB writes, 1 MiB
//    reads, the receiver discards); the median of --baseline-runs.
// 2. Migrations: for each guest size, scenario (untouched: zero fill, idle;
//    random: random fill, idle; hotset: random fill, 2 vCPUs writing a hot
//    set), stream count and compression, a source VM is built and started,
//    runs for --migrate-after, and is migrated by engine::MigrationSource
//    through transport::GrpcMigrationSink to a transport::MigrationServer
//    in the same process (an engine::VmMigrationTarget that builds the VM
//    from the wire config), exactly as `run --migrate-to` and `receive` do.
//
// Throughput is wire bytes over the migration's total time (setup to the
// target's resume), in GB/s (10^9 bytes); the ratio divides it by the
// baseline of the same size measured in this run. The process's CPU time
// (user + kernel, all threads: sender, receiver, guest vCPUs) during each
// migration is reported too: this host has 2 cores. For each completed
// migration the downtime is split into the final collection, the
// stop-and-copy round, the rest of the source's pause (vCPU pause, state
// capture) and Final to the target's reply. --prefault-target makes the
// target's memory resident while its VM is built (inside setup), which
// separates the cost of first-touching fresh memory from the transfer.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
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

constexpr uint64_t kBaselineChunk = 1ull << 20;  // 1 MiB writes and reads

struct MigrateBenchFlags {
  std::string sizes = "1G,4G";
  std::string scenarios = "untouched,random,hotset";
  std::string streams = "1";
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
  std::string json, plot;
};

// What one scenario's source VM is.
struct Scenario {
  std::string name;
  vmm::FillMode fill = vmm::FillMode::kRandom;
  vmm::WorkloadSpec workload;
  uint32_t vcpus = 1;
};

struct Baseline {
  uint64_t bytes = 0;
  std::vector<double> seconds;  // every run
  std::vector<double> cpu_ms;   // the process's CPU (user + kernel) in every run
  double gbps = 0;              // bytes / median seconds / 1e9
};

struct LoopbackRun {
  double seconds = 0;
  double cpu_ms = 0;
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
  double baseline_gbps = 0;
  double ratio = 0;                        // gbps / baseline_gbps
};

template <typename T>
T Median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
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

// ------------------------------------------------------------ baseline

// Time to move `bytes` over a fresh loopback TCP connection, from the first
// write to the receiver's last read, and the CPU both threads spent.
Result<LoopbackRun> LoopbackTransfer(uint64_t bytes) {
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener.valid()) return Status::FromErrno(errno, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(listener.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, "bind (127.0.0.1:0)");
  }
  if (::listen(listener.get(), 1) != 0) return Status::FromErrno(errno, "listen");
  socklen_t len = sizeof addr;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return Status::FromErrno(errno, "getsockname");
  }
  UniqueFd sender(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sender.valid()) return Status::FromErrno(errno, "socket");
  if (::connect(sender.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    return Status::FromErrno(errno, "connect (loopback)");
  }
  UniqueFd receiver(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!receiver.valid()) return Status::FromErrno(errno, "accept");

  Clock::time_point received_all{};
  Status read_error;
  std::thread reader([&] {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[kBaselineChunk]);
    uint64_t got = 0;
    while (got < bytes) {
      const ssize_t n = ::read(receiver.get(), buf.get(), kBaselineChunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        read_error = n < 0 ? Status::FromErrno(errno, "read (loopback)") : Internal("loopback: early end of stream");
        return;
      }
      got += static_cast<uint64_t>(n);
    }
    received_all = Clock::now();
  });
  std::unique_ptr<uint8_t[]> buf(new uint8_t[kBaselineChunk]);
  for (uint64_t i = 0; i < kBaselineChunk; ++i) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  Status write_error;
  rusage r0{}, r1{};
  getrusage(RUSAGE_SELF, &r0);
  const Clock::time_point start = Clock::now();
  for (uint64_t sent = 0; sent < bytes;) {
    const uint64_t want = std::min(kBaselineChunk, bytes - sent);
    const ssize_t n = ::write(sender.get(), buf.get(), want);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      write_error = Status::FromErrno(errno, "write (loopback)");
      ::shutdown(sender.get(), SHUT_RDWR);
      break;
    }
    sent += static_cast<uint64_t>(n);
  }
  reader.join();
  getrusage(RUSAGE_SELF, &r1);
  if (!write_error.ok()) return write_error;
  if (!read_error.ok()) return read_error;
  LoopbackRun run;
  run.seconds = std::chrono::duration<double>(received_all - start).count();
  run.cpu_ms = CpuMs(r1.ru_utime) - CpuMs(r0.ru_utime) + CpuMs(r1.ru_stime) - CpuMs(r0.ru_stime);
  return run;
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

void PrintTable(const std::vector<Baseline>& baselines, const std::vector<Row>& rows) {
  std::printf("raw loopback TCP, 1 MiB writes, one connection (median):");
  for (const Baseline& b : baselines) {
    std::printf("  %s %.2f GB/s (cpu %.0f%%)", FormatBytes(b.bytes).c_str(), b.gbps,
                Median(b.cpu_ms) / (Median(b.seconds) * 1e3) * 100);
  }
  std::printf("\n\n");
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
    // Round 0 alone (all memory with data): wire bytes over its duration.
    double round0 = 0;
    if (!s.round_stats.empty() && s.round_stats[0].duration_ms > 0) {
      round0 = static_cast<double>(s.round_stats[0].sent.wire_bytes) / 1e6 / s.round_stats[0].duration_ms;
    }
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

// The JSON document (--json, or next to --plot) and the plot.
Status WriteResults(const MigrateBenchFlags& f, const std::vector<Baseline>& baselines, const std::vector<Row>& rows) {
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
                                {"repeat", f.repeat},
                                {"prefault_target", f.prefault_target},
                                {"baseline", nlohmann::ordered_json::array()},
                                {"results", nlohmann::ordered_json::array()}};
  for (const Baseline& b : baselines) {
    doc["baseline"].push_back({{"bytes", b.bytes},
                               {"write_bytes", kBaselineChunk},
                               {"seconds", b.seconds},
                               {"cpu_ms", b.cpu_ms},
                               {"median_seconds", Median(b.seconds)},
                               {"gbps", b.gbps}});
  }
  for (const Row& r : rows) doc["results"].push_back(RowJson(r));
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
  }
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
  // A random-content guest is resident twice (source and target).
  const uint64_t avail = HostAvailableMemory();
  for (const Scenario& sc : scenarios) {
    if (sc.fill != vmm::FillMode::kRandom) continue;
    const uint64_t largest = *std::max_element(sizes.begin(), sizes.end());
    if (avail != 0 && 2 * largest > avail / 10 * 9) {
      return PrintError("the " + sc.name + " scenario needs 2 x " + FormatBytes(largest) +
                        " of host memory (source and target) but only " + FormatBytes(avail) +
                        " is available; use smaller --sizes"), kExitUsage;
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

  // 1. The raw loopback baseline, once per size.
  std::vector<Baseline> baselines;
  for (uint64_t size : sizes) {
    if (std::any_of(baselines.begin(), baselines.end(), [&](const Baseline& b) { return b.bytes == size; })) continue;
    Baseline b;
    b.bytes = size;
    for (uint32_t i = 0; i < f.baseline_runs; ++i) {
      auto run = LoopbackTransfer(size);
      if (!run.ok()) return PrintError("loopback baseline: " + run.status().message()), kExitFailure;
      b.seconds.push_back(run->seconds);
      b.cpu_ms.push_back(run->cpu_ms);
    }
    b.gbps = static_cast<double>(size) / 1e9 / Median(b.seconds);
    std::fprintf(stderr, "baseline: %s over loopback TCP in %.3f s (median of %u): %.2f GB/s, cpu %.0f%%\n",
                 FormatBytes(size).c_str(), Median(b.seconds), f.baseline_runs, b.gbps,
                 Median(b.cpu_ms) / (Median(b.seconds) * 1e3) * 100);
    baselines.push_back(b);
  }

  // 2. The migrations: every configuration, --repeat times, each variant
  // (verification off, then each order asked for) back to back.
  struct Config {
    uint64_t size;
    const Scenario* scenario;
    uint32_t streams;
    transport::Compression compress;
  };
  std::vector<Config> configs;
  for (uint64_t size : sizes) {
    for (const Scenario& sc : scenarios) {
      for (uint32_t streams : stream_counts) {
        for (transport::Compression c : compressions) configs.push_back({size, &sc, streams, c});
      }
    }
  }
  std::vector<Row> rows;
  bool all_completed = true;
  for (const Config& cf : configs) {
    const double base = std::find_if(baselines.begin(), baselines.end(),
                                     [&](const Baseline& b) { return b.bytes == cf.size; })->gbps;
    for (uint32_t rep = 0; rep < f.repeat; ++rep) {
      for (const MigrationSetupFlags& variant : variants) {
        if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
        const Scenario& sc = *cf.scenario;
        auto row = MigrateOnce(*kvm, sc, cf.size, cf.streams, cf.compress, variant);
        if (!row.ok()) {
          return PrintError(sc.name + " " + FormatBytes(cf.size) + ": " + row.status().message()), kExitFailure;
        }
        row->baseline_gbps = base;
        row->ratio = base > 0 ? row->gbps / base : 0;
        const engine::MigrationStats& s = row->stats;
        std::fprintf(stderr,
                     "%-9s %s, %u stream%s, %s, verify %s: %s in %.1f ms, downtime %.1f ms, %u rounds, %s, "
                     "%.3f GB/s (%.2f x raw)%s%s\n",
                     sc.name.c_str(), FormatBytes(cf.size).c_str(), cf.streams, cf.streams == 1 ? "" : "s",
                     row->compress.c_str(), row->verify.c_str(), std::string(engine::OutcomeName(s.outcome)).c_str(),
                     s.total_time_ms, s.downtime_ms, s.rounds, FormatBytes(s.transferred.wire_bytes).c_str(),
                     row->gbps, row->ratio, s.error.empty() ? "" : ": ", s.error.c_str());
        if (s.outcome != engine::Outcome::kCompleted) all_completed = false;
        if (s.verification.verdict == engine::VerifyVerdict::kMismatch) all_completed = false;
        rows.push_back(std::move(*row));
      }
    }
  }

  PrintTable(baselines, rows);

  if (Status s = WriteResults(f, baselines, rows); !s.ok()) return PrintError(s.message()), kExitFailure;
  if (!all_completed) {
    PrintError("not every migration completed (see the status column)");
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
  cmd->add_option("--baseline-runs", f->baseline_runs, "Loopback TCP runs per size (the median is used)")
      ->capture_default_str();
  cmd->add_option("--repeat", f->repeat, "Run every configuration this many times, interleaved (medians are reported)")
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
  cmd->add_option("--json", f->json, "Write the baseline and every migration's statistics as JSON to this file");
  cmd->add_option("--plot", f->plot, "Write a PNG of per-round dirty pages and bandwidth of the hotset migrations");
  return [f]() { return RunMigrateBench(*f); };
}

}  // namespace pmlmig::tools
