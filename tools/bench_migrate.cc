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
#include "bench_migrate.h"
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

using namespace migrate_bench;  // NOLINT: the bench's own types

using Clock = std::chrono::steady_clock;

std::vector<std::string> SplitList(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// `text` as a list of on and off (`flag` names it in the error).
Status ParseOnOffList(const char* flag, const std::string& text, std::vector<bool>* out) {
  for (const std::string& item : SplitList(text)) {
    if (item != "on" && item != "off") return InvalidArgument(std::string(flag) + ": '" + item + "' is not on or off");
    out->push_back(item == "on");
  }
  if (out->empty()) return InvalidArgument(std::string(flag) + ": empty list");
  return Status::Ok();
}

double CpuMs(const timeval& tv) {
  return static_cast<double>(tv.tv_sec) * 1e3 + static_cast<double>(tv.tv_usec) / 1e3;
}

// ------------------------------------------------------------ migrations

struct MigrationSetupFlags {
  engine::TrackerKind tracker;
  uint32_t ring_entries = 0;
  std::chrono::nanoseconds migrate_after{0};
  bool prefault_target = false;
  engine::MigrationOptions migration;
};

// What the receiving side's factory built, for stopping it afterwards.
// A configuration's data path: Pages calls or direct streams, and the
// target's populate-ahead threads.
struct DataPath {
  bool grpc_data = false;
  uint32_t populate_threads = 4;
  bool uffd_fill = true;
  bool read_in_place = true;
  bool paused = false;  // not the path, but how the source reads memory: the whole migration paused
};

// "direct", "grpc", with "+popN" when the populate threads are not the
// default, "+nouffd" without the userfaultfd fill, "+staged" without
// reading in place, "+paused" for a migration of the paused VM.
std::string DataPathLabel(bool direct, const DataPath& path) {
  std::string s = direct ? "direct" : "grpc";
  if (path.populate_threads != transport::MigrationServerOptions{}.populate_threads) {
    s += "+pop" + std::to_string(path.populate_threads);
  }
  if (!path.uffd_fill) s += "+nouffd";
  if (!path.read_in_place) s += "+staged";
  if (path.paused) s += "+paused";
  return s;
}

Result<Row> MigrateOnce(const vmm::Kvm& kvm, const Scenario& sc, uint64_t size, uint32_t streams,
                        transport::Compression compress, const DataPath& path, const MigrationSetupFlags& f) {
  const bool grpc_data = path.grpc_data;
  Row row;
  row.scenario = sc.name;
  row.guest_bytes = size;
  row.vcpus = sc.vcpus;
  row.workload = sc.workload.ToString();
  row.fill = std::string(vmm::FillModeName(sc.fill));
  row.streams = streams;
  row.compress = std::string(transport::CompressionName(compress));
  row.populate_threads = path.populate_threads;
  row.uffd_fill = path.uffd_fill;
  row.read_in_place = path.read_in_place;
  row.paused = path.paused;
  row.data_path = DataPathLabel(!grpc_data, path);

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
  transport::MigrationServerOptions server_options;
  server_options.populate_threads = path.populate_threads;
  server_options.uffd_fill = path.uffd_fill;
  server_options.read_in_place = path.read_in_place;
  PMLMIG_ASSIGN_OR_RETURN(auto server, transport::MigrationServer::Start(
                                           "127.0.0.1:0", [&factory] { return factory.MakeTarget(); }, server_options));

  transport::GrpcSinkOptions so;
  so.target = "127.0.0.1:" + std::to_string(server->port());
  so.streams = streams;
  so.compress = compress;
  so.direct_data = !grpc_data;
  engine::MigrationOptions migration = f.migration;
  migration.live = !path.paused;
  PMLMIG_ASSIGN_OR_RETURN(auto sink, transport::GrpcMigrationSink::Create(so));
  engine::MigrationController controller(*source_vm, *tracker, vmm::EncodeTestVmDescription(o));
  const std::vector<uint64_t> before = vmm::PagesWritten(*source_vm);
  rusage r0{}, r1{};
  // Round 0's CPU: from its start to the next round's or phase's (both are
  // published on the migration thread, before the round's pages go out).
  // Paused, the one round is the stop-and-copy phase.
  const engine::Phase round0_phase = path.paused ? engine::Phase::kStopAndCopy : engine::Phase::kRound;
  struct Round0Cpu {
    bool in = false, done = false;
    rusage start{};
    double ms = 0;
  };
  auto round0 = std::make_shared<Round0Cpu>();
  engine::MigrationCallbacks callbacks;
  callbacks.on_progress = [round0, round0_phase](const engine::MigrationProgress& p) {
    Round0Cpu& c = *round0;
    if (c.done) return;
    if (!c.in && p.phase == round0_phase && p.round == 0) {
      c.in = true;
      getrusage(RUSAGE_SELF, &c.start);
    } else if (c.in && (p.phase != round0_phase || p.round != 0)) {
      rusage now{};
      getrusage(RUSAGE_SELF, &now);
      c.ms = CpuMs(now.ru_utime) + CpuMs(now.ru_stime) - CpuMs(c.start.ru_utime) - CpuMs(c.start.ru_stime);
      c.done = true;
    }
  };
  getrusage(RUSAGE_SELF, &r0);
  PMLMIG_RETURN_IF_ERROR(controller.Start(std::move(sink), migration, std::move(callbacks)));
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
  row.round0_cpu_ms = round0->done ? round0->ms : 0;
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
    if (outcome.ok()) {
      row.data_path = DataPathLabel(outcome->direct_data, path);  // what it saw
      row.uffd_filled_bytes = outcome->uffd_filled_bytes;
      row.uffd_zero_faults = outcome->uffd_zero_faults;
      row.in_place_bytes = outcome->in_place_bytes;
    }
  }
  server->Shutdown();
  return row;
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

// What the flags ask for, checked before anything runs.
struct Plan {
  std::vector<uint64_t> sizes;
  std::vector<Scenario> scenarios;
  std::vector<uint32_t> stream_counts;
  std::vector<transport::Compression> compressions;
  // Per --data-path item, per --populate-threads item, per --uffd-fill
  // item, per --in-place item, per --paused item.
  std::vector<DataPath> paths;
  std::vector<MigrationSetupFlags> variants;  // verification off first, then each order asked for
};

// The grid of configurations the flags ask for: sizes, scenarios, stream
// counts, compressions and data paths. Error: the flag and why.
Status ParseGrid(const MigrateBenchFlags& f, Plan* plan) {
  for (const std::string& item : SplitList(f.sizes)) {
    auto v = ParseSize(item);
    if (!v.ok()) return InvalidArgument("--sizes: " + v.status().message());
    if (auto l = vmm::PcLayout(*v); !l.ok()) return InvalidArgument("--sizes: " + l.status().message());
    plan->sizes.push_back(*v);
  }
  if (plan->sizes.empty()) return InvalidArgument("--sizes: empty list");
  auto hotset = vmm::ParseWorkload(f.hotset);
  if (!hotset.ok()) return InvalidArgument("--hotset: " + hotset.status().message());
  if (f.hotset_vcpus == 0 || f.hotset_vcpus > PMLMIG_MAX_VCPUS) {
    return InvalidArgument("--hotset-vcpus: must be 1.." + std::to_string(PMLMIG_MAX_VCPUS));
  }
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
      return InvalidArgument("--scenarios: '" + name + "' is not untouched, random or hotset");
    }
    plan->scenarios.push_back(sc);
  }
  if (plan->scenarios.empty()) return InvalidArgument("--scenarios: empty list");
  for (const std::string& item : SplitList(f.streams)) {
    char* end = nullptr;
    const unsigned long n = std::strtoul(item.c_str(), &end, 10);
    if (end == item.c_str() || *end != '\0' || n == 0 || n > transport::kMaxStreams) {
      return InvalidArgument("--streams: '" + item + "' is not a number from 1 to " +
                             std::to_string(transport::kMaxStreams));
    }
    plan->stream_counts.push_back(static_cast<uint32_t>(n));
  }
  if (plan->stream_counts.empty()) return InvalidArgument("--streams: empty list");
  for (const std::string& item : SplitList(f.compress)) {
    auto c = transport::ParseCompression(item);
    if (!c.ok()) return InvalidArgument("--compress: " + c.status().message());
    plan->compressions.push_back(*c);
  }
  if (plan->compressions.empty()) return InvalidArgument("--compress: empty list");
  std::vector<uint32_t> populates;
  for (const std::string& item : SplitList(f.populate_threads)) {
    char* end = nullptr;
    const unsigned long n = std::strtoul(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || n > 64) {
      return InvalidArgument("--populate-threads: '" + item + "' is not a thread count 0..64");
    }
    populates.push_back(static_cast<uint32_t>(n));
  }
  if (populates.empty()) return InvalidArgument("--populate-threads: empty list");
  std::vector<bool> fills, in_places, pauses;
  PMLMIG_RETURN_IF_ERROR(ParseOnOffList("--uffd-fill", f.uffd_fill, &fills));
  PMLMIG_RETURN_IF_ERROR(ParseOnOffList("--in-place", f.in_place, &in_places));
  PMLMIG_RETURN_IF_ERROR(ParseOnOffList("--paused", f.paused, &pauses));
  for (const std::string& item : SplitList(f.data_path)) {
    if (item != "direct" && item != "grpc") {
      return InvalidArgument("--data-path: '" + item + "' is not direct or grpc");
    }
    for (uint32_t p : populates) {
      for (bool u : fills) {
        for (bool i : in_places) {
          for (bool paused : pauses) plan->paths.push_back({item == "grpc", p, u, i, paused});
        }
      }
    }
  }
  if (plan->paths.empty()) return InvalidArgument("--data-path: empty list");
  return Status::Ok();
}

// The migration settings, one per verification variant (off first, then
// each --verify-order item), and the flags that only need checking.
Status ParseVariants(const MigrateBenchFlags& f, Plan* plan) {
  MigrationSetupFlags setup;
  {
    auto kind = engine::ParseTrackerKind(f.tracker);
    if (!kind.ok()) return InvalidArgument("--tracker: " + kind.status().message());
    if (*kind == engine::TrackerKind::kNone) return InvalidArgument("--tracker: a migration needs a tracker");
    setup.tracker = *kind;
  }
  auto after = ParseDuration(f.migrate_after);
  if (!after.ok()) return InvalidArgument("--migrate-after: " + after.status().message());
  setup.migrate_after = *after;
  setup.prefault_target = f.prefault_target;
  setup.migration.convergence.downtime_limit = std::chrono::milliseconds(f.downtime_limit_ms);
  setup.migration.convergence.max_rounds = f.max_rounds;
  if (f.on_timeout != "cancel" && f.on_timeout != "force") {
    return InvalidArgument("--on-timeout: '" + f.on_timeout + "' is not cancel or force");
  }
  setup.migration.convergence.force_on_timeout = f.on_timeout == "force";
  plan->variants = {setup};
  if (f.verify) {
    for (const std::string& item : SplitList(f.verify_order)) {
      if (item != "before-commit" && item != "after-commit") {
        return InvalidArgument("--verify-order: '" + item + "' is not before-commit or after-commit");
      }
      MigrationSetupFlags v = setup;
      v.migration.verify = true;
      v.migration.verify_order =
          item == "before-commit" ? engine::VerifyOrder::kBeforeCommit : engine::VerifyOrder::kAfterCommit;
      plan->variants.push_back(v);
    }
  }
  if (f.baseline_runs == 0) return InvalidArgument("--baseline-runs must be at least 1");
  if (!f.peers && f.qemu != MigrateBenchFlags{}.qemu) return InvalidArgument("--qemu needs --peers");
  if (f.qemu.empty()) return InvalidArgument("--qemu: empty");
  if (f.qemu_timeout_s == 0) return InvalidArgument("--qemu-timeout must be at least 1 (seconds)");
  if (f.plot.find('\'') != std::string::npos || f.json.find('\'') != std::string::npos) {
    return InvalidArgument("--plot, --json: file names must not contain a quote");
  }
  return Status::Ok();
}

// Whether this host has the memory (and /dev/shm) the plan needs.
Status CheckHostFits(const MigrateBenchFlags& f, const Plan& plan) {
  // A random-content guest is resident twice (source and target); so are
  // the buffers of (b) and QEMU's two guests, which also need /dev/shm.
  const uint64_t avail = HostAvailableMemory();
  const uint64_t largest = *std::max_element(plan.sizes.begin(), plan.sizes.end());
  if (f.peers && avail != 0 && 2 * largest > avail / 10 * 9) {
    return InvalidArgument("--peers needs 2 x " + FormatBytes(largest) + " of host memory (the baseline's source and "
                           "target, QEMU's two guests) but only " + FormatBytes(avail) +
                           " is available; use smaller --sizes");
  }
  if (f.peers) {
    struct statvfs shm {};
    if (::statvfs("/dev/shm", &shm) == 0 && 2 * largest > static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize) {
      return InvalidArgument("--peers: QEMU's two guests need 2 x " + FormatBytes(largest) + " in /dev/shm but only " +
                             FormatBytes(static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize) + " is free there");
    }
  }
  for (const Scenario& sc : plan.scenarios) {
    if (sc.fill != vmm::FillMode::kRandom) continue;
    if (avail != 0 && 2 * largest > avail / 10 * 9) {
      return InvalidArgument("the " + sc.name + " scenario needs 2 x " + FormatBytes(largest) +
                             " of host memory (source and target) but only " + FormatBytes(avail) +
                             " is available; use smaller --sizes");
    }
  }
  return Status::Ok();
}

int RunMigrateBench(const MigrateBenchFlags& f) {
  Plan plan;
  Status checked = ParseGrid(f, &plan);
  if (checked.ok()) checked = ParseVariants(f, &plan);
  if (checked.ok()) checked = CheckHostFits(f, plan);
  if (!checked.ok()) return PrintError(checked.message()), kExitUsage;
  const uint32_t repeat = f.peers && !f.repeat_given ? 3 : f.repeat;
  const uint64_t seed = vmm::TestGuestConfig{}.seed;  // the random scenarios' fill
  Results res;
  res.sizes = plan.sizes;
  res.streams = plan.stream_counts;
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
  if (plan.variants.front().tracker == engine::TrackerKind::kRing) {
    const vmm::HostCapabilities caps = vmm::ProbeHost(*kvm);
    if (!caps.dirty_ring) return PrintError("this host's KVM has no dirty ring; use --tracker bitmap"), kExitFailure;
    for (MigrationSetupFlags& v : plan.variants) v.ring_entries = std::min<uint32_t>(65536, caps.dirty_ring_max_entries);
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
    for (uint64_t size : plan.sizes) {
      if (Interrupted() || !qemu(size, 0, rep)) return PrintError("interrupted"), kExitInterrupted;
      for (uint32_t streams : plan.stream_counts) {
        for (uint32_t i = 0; i < baseline_now; ++i) {
          if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
          if (Status s = RunBaselines(size, streams, f.peers, seed, res); !s.ok()) {
            return PrintError(s.message()), kExitFailure;
          }
        }
        for (const Scenario& sc : plan.scenarios) {
          for (transport::Compression c : plan.compressions) {
            for (const DataPath& path : plan.paths) {
            for (const MigrationSetupFlags& variant : plan.variants) {
              if (Interrupted()) return PrintError("interrupted"), kExitInterrupted;
              auto row = MigrateOnce(*kvm, sc, size, streams, c, path, variant);
              if (!row.ok()) {
                return PrintError(sc.name + " " + FormatBytes(size) + ": " + row.status().message()), kExitFailure;
              }
              row->repeat = rep;
              const engine::MigrationStats& s = row->stats;
              std::fprintf(stderr,
                           "%-9s %s, %u stream%s, %s, %s data, verify %s: %s in %.1f ms, downtime %.1f ms, %u "
                           "rounds, %s, %.3f GB/s%s%s\n",
                           sc.name.c_str(), FormatBytes(size).c_str(), streams, streams == 1 ? "" : "s",
                           row->compress.c_str(), row->data_path.c_str(), row->verify.c_str(),
                           std::string(engine::OutcomeName(s.outcome)).c_str(), s.total_time_ms, s.downtime_ms,
                           s.rounds, FormatBytes(s.transferred.wire_bytes).c_str(), row->gbps,
                           s.error.empty() ? "" : ": ", s.error.c_str());
              if (s.outcome != engine::Outcome::kCompleted) all_completed = false;
              if (s.verification.verdict == engine::VerifyVerdict::kMismatch) all_completed = false;
              res.rows.push_back(std::move(*row));
            }
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
  cmd->add_option("--data-path", f->data_path,
                  "direct (plain TCP data streams) or grpc (the Pages calls); a comma-separated list runs each")
      ->capture_default_str();
  cmd->add_option("--populate-threads", f->populate_threads,
                  "The target's threads populating fresh memory ahead of round 0's data (0: off); a comma-separated "
                  "list runs each (rows say +popN when not the default)")
      ->capture_default_str();
  cmd->add_option("--uffd-fill", f->uffd_fill,
                  "on or off: with several streams, the target places round 0's pages with userfaultfd "
                  "(UFFDIO_COPY); a comma-separated list runs each (rows say +nouffd when off)")
      ->capture_default_str();
  cmd->add_option("--in-place", f->in_place,
                  "on or off: the target reads each batch of the direct data streams straight into guest memory "
                  "(off: staged in a buffer and copied); a comma-separated list runs each (rows say +staged when off)")
      ->capture_default_str();
  cmd->add_option("--paused", f->paused,
                  "on or off: on migrates the VM paused from the start, every page sent once (as QEMU's guest is "
                  "paused in --peers); a comma-separated list runs each (rows say +paused when on)")
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
