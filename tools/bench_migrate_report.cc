// pmlmig bench migrate: the report. The per-run tables, the comparison of
// pmlmig against (a), (b) and QEMU (medians of the interleaved runs), the
// JSON document and the plots; see bench_migrate.cc for what is measured.
#include <sys/utsname.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench_baselines.h"
#include "bench_migrate.h"
#include "migration_json.h"
#include "plot.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"

namespace pmlmig::tools::migrate_bench {

std::string DescribeMachine() {
  utsname u{};
  uname(&u);
  return std::to_string(std::thread::hardware_concurrency()) + " CPUs, " + CpuModelName() + ", " +
         FormatBytes(static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE))) +
         ", Linux " + u.release;
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
          {"data_path", r.data_path},
          {"populate_threads", r.populate_threads},
          {"uffd_fill", r.uffd_fill},
          {"uffd_filled_bytes", r.uffd_filled_bytes},
          {"read_in_place", r.read_in_place},
          {"in_place_bytes", r.in_place_bytes},
          {"paused", r.paused},
          {"uffd_zero_faults", r.uffd_zero_faults},
          {"verify", r.verify},
          {"prepare_ms", r.prepare_ms},
          {"throughput_gbps", r.gbps},
          {"baseline_gbps", r.baseline_gbps},
          {"ratio_to_raw_tcp", r.ratio},
          {"repeat", r.repeat},
          {"round0_gbps", Round0Gbps(r)},
          {"cpu_s_per_gb", CpuSPerGb(r.cpu_user_ms + r.cpu_sys_ms, r.guest_bytes)},
          {"round0_cpu_s_per_gb", Round0CpuSPerGb(r)},
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
           a.compress == b.compress && a.data_path == b.data_path;
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
                            "/" + on.compress + "/" + on.data_path + "/" + on.verify;
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
  std::printf("%-10s %7s %5s %7s %17s %13s %9s %9s %11s %6s %12s %7s %6s %8s %6s %s\n", "scenario", "guest", "vcpus",
              "streams", "compress/path", "verify", "total_ms", "setup_ms", "downtime_ms", "rounds", "transferred", "GB/s", "x_raw",
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
    std::printf("%-10s %7s %5u %7u %17s %13s %9.1f %9.1f %11s %6u %12s %7.3f %6.3f %8.3f %6.0f %s\n", r.scenario.c_str(),
                FormatBytes(r.guest_bytes).c_str(), r.vcpus, r.streams, (r.compress + "/" + r.data_path).c_str(),
                r.verify.c_str(),
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
    std::printf("%-10s %7s %7u %17s %13s %7.1f = %6.2f | %6.2f (%" PRIu64 ", %" PRIu64 ") | %6.2f | %6.2f (%.2f)\n",
                r.scenario.c_str(), FormatBytes(r.guest_bytes).c_str(), r.streams, (r.compress + "/" + r.data_path).c_str(),
                r.verify.c_str(), s.downtime_ms,
                r.final_collect_ms, r.final_round_ms, s.round_stats.back().sent.pages,
                s.round_stats.back().sent.batches, r.pause_other_ms, r.switchover_ms,
                s.final_reply.target_restore_ms);
  }
  PrintVerifyCost(rows);
}

// ------------------------------------------------------------ comparison

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

std::vector<Comparison> Compare(const std::vector<Row>& rows, const std::vector<Baseline>& reused,
                                const std::vector<Baseline>& fresh, const QemuPeer& qemu) {
  std::vector<Comparison> out;
  auto same = [](const Comparison& c, const Row& r) {
    return c.scenario == r.scenario && c.guest_bytes == r.guest_bytes && c.streams == r.streams &&
           c.compress == r.compress && c.data_path == r.data_path && c.verify == r.verify;
  };
  for (const Row& r : rows) {
    if (std::any_of(out.begin(), out.end(), [&](const Comparison& c) { return same(c, r); })) continue;
    Comparison c;
    c.scenario = r.scenario;
    c.compress = r.compress;
    c.data_path = r.data_path;
    c.verify = r.verify;
    c.guest_bytes = r.guest_bytes;
    c.streams = r.streams;
    std::vector<double> ms, r0, cpu, r0cpu;
    for (const Row& x : rows) {
      if (!same(c, x)) continue;
      ++c.runs;
      if (x.stats.outcome != engine::Outcome::kCompleted) continue;
      ++c.completed;
      ms.push_back(x.stats.total_time_ms);
      r0.push_back(Round0Gbps(x));
      cpu.push_back(CpuSPerGb(x.cpu_user_ms + x.cpu_sys_ms, x.guest_bytes));
      r0cpu.push_back(Round0CpuSPerGb(x));
    }
    if (!ms.empty()) {
      c.time_ms = Median(ms);
      c.gbps = c.time_ms > 0 ? static_cast<double>(c.guest_bytes) / 1e6 / c.time_ms : 0;
      c.round0_gbps = Median(r0);
      c.cpu_s_per_gb = Median(cpu);
      c.round0_cpu_s_per_gb = Median(r0cpu);
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
  std::printf("%-10s %7s %7s %17s %13s %9s %7s %7s %7s %9s %9s %8s %6s %6s | %-37s\n", "scenario", "guest", "streams",
              "compress/path", "verify", "pmlmig_s", "GB/s", "(a)", "(b)", "qemu1_s", "qemuN_s", "x_faster", "/(b)",
              "r0/(a)", "CPU-s/GB: pmlmig    r0   (a)    (b)  qemu1  qemuN");
  for (const Comparison& c : cs) {
    const bool ok = c.completed > 0;
    std::printf("%-10s %7s %7u %17s %13s %9s %7s %7s %7s %9s %9s %8s %6s %6s | %16s %5s %5s %6s %6s %6s\n",
                c.scenario.c_str(), FormatBytes(c.guest_bytes).c_str(), c.streams, (c.compress + "/" + c.data_path).c_str(),
                c.verify.c_str(), Fig(c.time_ms / 1e3, "%.3f", ok).c_str(), Fig(c.gbps, "%.3f", ok).c_str(),
                Fig(c.reused ? c.reused->gbps : 0, "%.2f", c.reused).c_str(),
                Fig(c.fresh ? c.fresh->gbps : 0, "%.2f", c.fresh).c_str(),
                Fig(c.qemu_single.total_ms / 1e3, "%.3f", c.qemu_single.runs > 0).c_str(),
                Fig(c.qemu_multifd.total_ms / 1e3, "%.3f", c.qemu_multifd.runs > 0).c_str(),
                Fig(c.x_faster, "%.2f", c.x_faster > 0).c_str(), Fig(c.of_fresh, "%.2f", c.of_fresh > 0).c_str(),
                Fig(c.round0_of_reused, "%.2f", ok && c.reused).c_str(), Fig(c.cpu_s_per_gb, "%.2f", ok).c_str(),
                Fig(c.round0_cpu_s_per_gb, "%.2f", ok && c.round0_cpu_s_per_gb > 0).c_str(),
                Fig(c.reused ? c.reused->cpu_s_per_gb : 0, "%.2f", c.reused).c_str(),
                Fig(c.fresh ? c.fresh->cpu_s_per_gb : 0, "%.2f", c.fresh).c_str(),
                Fig(c.qemu_single.cpu_s_per_gb, "%.2f", c.qemu_single.runs > 0).c_str(),
                Fig(c.qemu_multifd.cpu_s_per_gb, "%.2f", c.qemu_multifd.runs > 0).c_str());
  }
  std::printf("x_faster: QEMU multifd (as many channels as streams) time / pmlmig time; /(b): pmlmig GB/s / (b); "
              "r0/(a): round 0's GB/s (wire bytes) / (a), meaningful with --prefault-target; r0 CPU-s/GB: the "
              "process's CPU (both sides, the vCPUs) during round 0 per 10^9 of its wire bytes\n");
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
          {"data_path", c.data_path},
          {"verify", c.verify},
          {"runs", c.runs},
          {"completed", c.completed},
          {"pmlmig_ms", or_null(ok, c.time_ms)},
          {"pmlmig_gbps", or_null(ok, c.gbps)},
          {"pmlmig_round0_gbps", or_null(ok, c.round0_gbps)},
          {"pmlmig_cpu_s_per_gb", or_null(ok, c.cpu_s_per_gb)},
          {"pmlmig_round0_cpu_s_per_gb", or_null(ok && c.round0_cpu_s_per_gb > 0, c.round0_cpu_s_per_gb)},
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

}  // namespace pmlmig::tools::migrate_bench
