// pmlmig restore: bring a test VM back from a snapshot file ('pmlmig run
// --snapshot-to'), eagerly or lazily, keep it running a while with its
// workload going, check every page of its memory, report.
#include <cmath>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/snapshot_restore.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/description.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

struct RestoreFlags {
  std::string file;
  bool lazy = false;
  std::string exit_after = "2s";
  unsigned threads = 8;
  bool json = false;
  bool quiet = false;
};

double Round2(double v) { return std::round(v * 100) / 100; }

nlohmann::ordered_json StatsJson(const engine::RestoreStats& s) {
  return {{"lazy", s.lazy},
          {"guest_bytes", s.guest_bytes},
          {"open_ms", Round2(s.open_ms)},
          {"build_ms", Round2(s.build_ms)},
          {"load_ms", Round2(s.load_ms)},
          {"running_ms", Round2(s.running_ms)},
          {"complete_ms", Round2(s.complete_ms)},
          {"bytes_read", s.bytes_read},
          {"read_gb_per_s", s.lazy || s.load_ms <= 0 ? nlohmann::ordered_json(nullptr)
                                                     : nlohmann::ordered_json(Round2(s.bytes_read / s.load_ms / 1e6))},
          {"data_extents", s.data_extents},
          {"faults", s.faults},
          {"requested_pages", s.requested_pages},
          {"background_pages", s.background_pages},
          {"latency_ms", {{"p50", s.latency_p50_ms}, {"p99", s.latency_p99_ms}, {"max", s.latency_max_ms}}},
          {"verified", s.verified},
          {"verify_detail", s.verify_detail}};
}

int Restore(const RestoreFlags& f) {
  auto exit_after = ParseDuration(f.exit_after);
  if (!exit_after.ok()) return PrintError("--exit-after: " + exit_after.status().message()), kExitUsage;
  if (f.threads == 0 || f.threads > 16) return PrintError("--threads: 1..16"), kExitUsage;
  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  InstallInterruptHandler();
  vmm::TestVmFactory factory(*kvm, {});
  engine::RestoreOptions ro;
  ro.lazy = f.lazy;
  ro.threads = f.threads;
  nlohmann::ordered_json out = {{"status", "failed"}, {"file", f.file}};
  auto restored = engine::SnapshotRestore::Start(
      f.file, [&](const engine::MigrationSetup& setup) { return factory.BuildVm(setup); }, ro);
  if (!restored.ok()) {
    out["error"] = restored.status().message();
    if (f.json) std::printf("%s\n", out.dump().c_str());
    PrintError(restored.status().message());
    return kExitFailure;
  }
  engine::SnapshotRestore& r = **restored;
  vmm::Machine& m = static_cast<vmm::Machine&>(r.vm());  // the factory's VM
  const vmm::MachineOptions options = factory.last_options();
  const std::vector<uint64_t> at_resume = vmm::PagesWritten(m);
  if (!f.quiet) {
    const engine::RestoreStats s = r.stats();
    std::fprintf(stderr, "pmlmig restore: %s guest with %u vCPU%s running %.1f ms after the start (%s)\n",
                 FormatBytes(s.guest_bytes).c_str(), options.guest.vcpus, options.guest.vcpus == 1 ? "" : "s",
                 s.running_ms, f.lazy ? "lazy: its memory follows from the file" : "eager: memory read and checked");
  }
  // In steps, so that Ctrl-C ends a lazy restore that waits for pages.
  Status complete;
  do {
    complete = r.WaitComplete(std::chrono::milliseconds(200));
  } while (complete.code() == Code::kUnavailable && r.remaining() > 0 && !Interrupted());
  if (complete.code() == Code::kUnavailable && Interrupted()) {
    complete = Aborted("interrupted while " + std::to_string(r.remaining()) + " pages were still to be read");
  }
  if (!complete.ok()) {
    // A lazy restore that failed (the file could not be read, or Ctrl-C):
    // its missing pages now read as zero, so no vCPU stays blocked on one
    // and the VM can pause; it is not the snapshot's VM any more.
    r.Abandon();
  }
  engine::RestoreStats stats = r.stats();
  if (!f.quiet && complete.ok() && f.lazy) {
    std::fprintf(stderr, "pmlmig restore: every page in %.1f ms (%" PRIu64 " faults, p99 %.2f ms); %s\n",
                 stats.complete_ms, stats.faults, stats.latency_p99_ms, stats.verify_detail.c_str());
  }
  const auto until = std::chrono::steady_clock::now() + *exit_after;
  while (complete.ok() && std::chrono::steady_clock::now() < until && !Interrupted() && m.error().ok()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  (void)m.Pause();
  const std::vector<uint64_t> now = vmm::PagesWritten(m);
  uint64_t after = 0;
  for (size_t i = 0; i < now.size(); ++i) after += now[i] - std::min(now[i], at_resume[i]);
  // The guest's own check of every page against its counters: the snapshot
  // held a VM whose memory and state agree, and it ran on from there.
  const vmm::CheckReport check = vmm::CheckGuestMemory(m.memory(), options.guest, now);
  Status failure = !complete.ok() ? complete : !m.error().ok() ? m.error() : check.ok() ? Status::Ok() : check.ToStatus();
  out["status"] = failure.ok() ? "completed" : "failed";
  out.update(StatsJson(stats));
  out["pages_written_after_resume"] = after;
  out["check"] = {{"ok", check.ok()}, {"pages_checked", check.pages_checked}, {"pages_stamped", check.pages_stamped},
                  {"pages_bad", check.pages_bad}};
  out["error"] = failure.ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(failure.message());
  m.Stop();
  if (f.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("Restored %s (%s): running after %.1f ms, all memory in after %.1f ms, %s read; %s\n",
                f.file.c_str(), f.lazy ? "lazy" : "eager", stats.running_ms, stats.complete_ms,
                FormatBytes(stats.bytes_read).c_str(), stats.verified ? "digests match" : "NOT verified");
    std::printf("  after resume the workload wrote %" PRIu64 " pages in %s; memory check %s (%" PRIu64 " pages)\n",
                after, f.exit_after.c_str(), check.ok() ? "passed" : "FAILED", check.pages_checked);
  }
  if (!failure.ok()) {
    PrintError(failure.message());
    return kExitFailure;
  }
  return Interrupted() ? kExitInterrupted : kExitOk;
}

}  // namespace

Command RegisterRestore(CLI::App& app) {
  auto f = std::make_shared<RestoreFlags>();
  auto* cmd = app.add_subcommand("restore", "Bring a test VM back from a snapshot file and run it");
  cmd->add_option("file", f->file, "A snapshot written by 'pmlmig run --snapshot-to' or 'pmlmig snapshot'")
      ->required();
  cmd->add_flag("--lazy", f->lazy,
                "Run the VM at once and read its memory from the file as it is touched (userfaultfd) and in the "
                "background; the digests are checked once every page is in");
  cmd->add_option("--exit-after", f->exit_after, "Keep the restored VM running this long, then check it and report")
      ->capture_default_str();
  cmd->add_option("--threads", f->threads, "Reads in flight: eager, of the whole file; lazy, besides the guest's own faults (1-16; the disk wants several)")->capture_default_str();
  cmd->add_flag("--json", f->json, "Print the report as one JSON object on stdout");
  cmd->add_flag("--quiet,-q", f->quiet, "No progress lines");
  return [f]() { return Restore(*f); };
}

}  // namespace pmlmig::tools
