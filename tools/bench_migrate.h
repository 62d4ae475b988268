// pmlmig bench migrate: what its parts share. The run (bench_migrate.cc)
// fills Results; the report (bench_migrate_report.cc) prints the tables,
// compares, and writes the JSON and the plots. Private to tools/.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bench_qemu.h"
#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/vmm/workload.h"
#include "pmlmig/vmm/fill.h"

namespace pmlmig::tools::migrate_bench {

struct MigrateBenchFlags {
  std::string sizes = "1G,4G";
  std::string scenarios = "untouched,random,hotset";
  std::string streams = std::to_string(transport::DefaultStreams());
  std::string compress = "none";
  std::string data_path = "direct";  // direct, grpc, or both comma-separated
  std::string populate_threads = "4";  // the target's populate-ahead threads; a list runs each
  std::string uffd_fill = "on";        // the target's userfaultfd fill (several streams): on, off, or both
  std::string in_place = "on";         // the target reads direct streams' batches into guest memory: on, off, or both
  std::string paused = "off";          // the VM paused for the whole migration (MigrationOptions::live false): on, off, or both
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
  std::string data_path = "direct";  // direct or grpc (what the receiver saw), "+popN" when not the default 4 threads
  uint32_t populate_threads = 4;     // the target's populate-ahead threads (MigrationServerOptions)
  bool uffd_fill = true;             // the target's userfaultfd fill (MigrationServerOptions)
  uint64_t uffd_filled_bytes = 0;    // what it placed (ReceivedMigration)
  uint64_t uffd_zero_faults = 0;     // and the zero pages it gave
  bool read_in_place = true;         // MigrationServerOptions::read_in_place
  uint64_t in_place_bytes = 0;       // what was read in place (ReceivedMigration)
  bool paused = false;               // MigrationOptions::live false: one round, paused
  std::string verify = "off";  // off, before-commit or after-commit
  double prepare_ms = 0;  // building and filling the source VM (not part of the migration)
  engine::MigrationStats stats;
  double cpu_user_ms = 0, cpu_sys_ms = 0;  // the whole process, during MigrationSource::Run
  double round0_cpu_ms = 0;                // the whole process, from round 0's start to the next phase's
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
inline double CpuSPerGb(double cpu_ms, uint64_t bytes) { return bytes == 0 ? 0 : cpu_ms / 1e3 / (static_cast<double>(bytes) / 1e9); }

// Round 0 alone (all memory with data): wire bytes over its duration, GB/s.
inline double Round0Gbps(const Row& r) {
  const engine::MigrationStats& s = r.stats;
  if (s.round_stats.empty() || s.round_stats[0].duration_ms <= 0) return 0;
  return static_cast<double>(s.round_stats[0].sent.wire_bytes) / 1e6 / s.round_stats[0].duration_ms;
}

// Round 0 alone: CPU seconds of the whole process (both sides, the vCPUs)
// per 10^9 of its wire bytes; into resident memory with --prefault-target
// (the prefault is setup, before round 0).
inline double Round0CpuSPerGb(const Row& r) {
  const engine::MigrationStats& s = r.stats;
  if (s.round_stats.empty() || r.round0_cpu_ms <= 0) return 0;
  return CpuSPerGb(r.round0_cpu_ms, s.round_stats[0].sent.wire_bytes);
}

inline const Baseline* FindBaseline(const std::vector<Baseline>& v, uint64_t bytes, uint32_t connections) {
  for (const Baseline& b : v) {
    if (b.bytes == bytes && b.connections == connections) return &b;
  }
  return nullptr;
}

// QEMU's median for one size and channel count (0: one channel).
struct QemuMedian {
  size_t runs = 0;
  double total_ms = 0, gbps = 0, cpu_s_per_gb = 0;
};


// One pmlmig configuration against its limits and QEMU: medians over the
// interleaved runs. GB/s here is guest bytes over time, for every column.
struct Comparison {
  std::string scenario, compress, data_path, verify;
  uint64_t guest_bytes = 0;
  uint32_t streams = 1;
  size_t runs = 0, completed = 0;
  double time_ms = 0, gbps = 0, round0_gbps = 0, cpu_s_per_gb = 0;  // pmlmig, completed runs
  double round0_cpu_s_per_gb = 0;                                   // pmlmig's round 0 alone
  const Baseline* reused = nullptr;  // (a)
  const Baseline* fresh = nullptr;   // (b), with --peers
  QemuMedian qemu_single, qemu_multifd;
  double x_faster = 0;          // QEMU multifd time / pmlmig time
  double of_fresh = 0;          // pmlmig GB/s / (b) GB/s
  double round0_of_reused = 0;  // round 0 GB/s / (a) GB/s
};

struct Results {
  std::vector<uint64_t> sizes;
  std::vector<uint32_t> streams;
  std::vector<Baseline> reused, fresh;  // (a), (b)
  std::vector<Row> rows;
  QemuPeer qemu;
};

std::vector<Comparison> Compare(const std::vector<Row>& rows, const std::vector<Baseline>& reused,
                                const std::vector<Baseline>& fresh, const QemuPeer& qemu);
// The per-run tables (stdout): baselines, migrations, downtime, verification cost.
void PrintTable(const std::vector<Baseline>& reused, const std::vector<Baseline>& fresh, const std::vector<Row>& rows);
void PrintComparison(const std::vector<Comparison>& cs, const QemuPeer& qemu, uint32_t repeat);
// The JSON document (--json, or next to --plot) and the plots.
Status WriteResults(const MigrateBenchFlags& f, uint32_t repeat, const Results& res,
                    const std::vector<Comparison>& comparison);

}  // namespace pmlmig::tools::migrate_bench
