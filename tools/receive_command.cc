// pmlmig receive: wait for a migration, resume the VM, keep it running for
// a while with its workload going, report. A failed attempt (the partial VM
// discarded) leaves it waiting for the next one, up to --attempts.
#include <cmath>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "commands.h"
#include "security_flags.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/transport/handover.h"
#include "pmlmig/vmm/description.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig::tools {
namespace {

struct ReceiveFlags {
  std::string listen;
  bool verify = false;
  std::string exit_after = "2s";
  std::string wait = "0";
  bool json = false;
  bool quiet = false;
  uint32_t attempts = 0;  // 0: until one completes
  SecurityFlags security;
  bool insecure = false;
  std::string data_path = "direct";
  uint32_t populate_threads = transport::MigrationServerOptions{}.populate_threads;
  bool no_uffd_fill = false;
  bool no_in_place = false;
  std::string max_memory = "0";
  uint32_t max_vcpus = 1024;
  uint32_t max_streams = 64;
  std::string handshake_timeout = "30s";
  std::string idle_timeout = "60s";
  std::string commit_timeout = "30s";
  std::string postcopy_recovery = "10m";
  std::vector<uint32_t> allow_uids;  // unix:PATH only
};

// What receive's flags say, checked before KVM is opened: a bad flag or
// address is a usage error on any host.
struct ReceivePlan {
  bool local = false;      // --listen unix:PATH: same-host handovers
  bool port_zero = false;  // a TCP port the system picks
  std::chrono::nanoseconds exit_after{0}, wait{0};
  transport::MigrationServerOptions server;
};

// Error: the usage error, naming the flag.
Status ParseReceiveFlags(const ReceiveFlags& f, ReceivePlan* out) {
  auto exit_after = ParseDuration(f.exit_after);
  if (!exit_after.ok()) return InvalidArgument("--exit-after: " + exit_after.status().message());
  auto wait = ParseDuration(f.wait);
  if (!wait.ok()) return InvalidArgument("--wait: " + wait.status().message());
  out->exit_after = *exit_after;
  out->wait = *wait;
  const bool local = out->local = f.listen.rfind("unix:", 0) == 0;
  if (local) {
    if (auto path = transport::ParseUnixAddress(f.listen); !path.ok()) {
      return InvalidArgument("--listen " + path.status().message());
    }
    if (!f.security.tls_ca.empty() || !f.security.tls_cert.empty() || !f.security.token_file.empty() || f.insecure ||
        f.max_streams != 64 || f.max_memory != "0") {
      return InvalidArgument("--listen unix:PATH takes same-host handovers: TLS, tokens, --insecure, --max-streams and "
                             "--max-memory do not apply (the socket is 0600 and the peer's uid is checked; see --allow-uid)");
    }
  } else {
    Result<transport::HostPort> listen = transport::ParseHostPort(f.listen);
    if (!listen.ok()) return InvalidArgument("--listen " + listen.status().message());
    out->port_zero = listen->port == 0;
    if (!f.allow_uids.empty()) return InvalidArgument("--allow-uid needs --listen unix:PATH");
  }
  transport::MigrationServerOptions& so = out->server;
  {
    auto mem = ParseSize(f.max_memory);
    if (!mem.ok()) return InvalidArgument("--max-memory: " + mem.status().message());
    so.max_memory_bytes = *mem;
    if (f.max_vcpus == 0) return InvalidArgument("--max-vcpus: must be at least 1");
    if (f.max_streams == 0 || f.max_streams > transport::kMaxStreams) {
      return InvalidArgument("--max-streams: must be 1.." + std::to_string(transport::kMaxStreams));
    }
    so.max_vcpus = f.max_vcpus;
    so.max_streams = f.max_streams;
    struct {
      const char* flag;
      const std::string& text;
      std::chrono::milliseconds* out;
      bool zero_ok;
    } durations[] = {{"--handshake-timeout", f.handshake_timeout, &so.handshake_timeout, false},
                     {"--idle-timeout", f.idle_timeout, &so.idle_timeout, true},
                     {"--commit-timeout", f.commit_timeout, &so.commit_timeout, false},
                     {"--postcopy-recovery", f.postcopy_recovery, &so.postcopy_recovery_timeout, true}};
    for (auto& d : durations) {
      auto v = ParseDuration(d.text);
      if (!v.ok()) return InvalidArgument(std::string(d.flag) + ": " + v.status().message());
      *d.out = std::chrono::duration_cast<std::chrono::milliseconds>(*v);
      if (d.out->count() == 0 && !d.zero_ok) return InvalidArgument(std::string(d.flag) + ": must be > 0");
    }
    auto sec = LoadSecurity(f.security);
    if (!sec.ok()) return sec.status();
    so.security = std::move(*sec);
    so.allow_insecure = f.insecure;
    so.direct_data = f.data_path == "direct";
    so.populate_threads = f.populate_threads;
    so.uffd_fill = !f.no_uffd_fill;
    so.read_in_place = !f.no_in_place;
  }
  return Status::Ok();
}

// Waits for a migration that completes, waking up for Ctrl-C; a failed
// attempt is reported (and listed in `failed_attempts`) and the receiver
// waits for the next, up to --attempts and --wait.
Result<transport::ReceivedMigration> WaitForCompleted(transport::MigrationReceiver& server, const ReceiveFlags& f,
                                                      std::chrono::nanoseconds wait,
                                                      nlohmann::ordered_json* failed_attempts) {
  const auto started = std::chrono::steady_clock::now();
  for (;;) {
    if (Interrupted()) return Aborted("interrupted");
    if (wait.count() > 0 && std::chrono::steady_clock::now() - started > wait) {
      return Aborted("no migration completed within --wait " + f.wait);
    }
    Result<transport::ReceivedMigration> outcome =
        server.WaitForMigration(std::chrono::steady_clock::now() + std::chrono::milliseconds(200));
    if (!outcome.ok()) continue;
    if (outcome->outcome == engine::Outcome::kCompleted) return outcome;
    failed_attempts->push_back({{"status", std::string(engine::OutcomeName(outcome->outcome))},
                                {"error", outcome->error.message()},
                                {"rounds", outcome->rounds}});
    if (f.attempts != 0 && failed_attempts->size() >= f.attempts) return outcome;
    if (!f.quiet) {
      std::fprintf(stderr, "pmlmig receive: migration %s: %s (the partial VM was discarded); waiting for the next\n",
                   std::string(engine::OutcomeName(outcome->outcome)).c_str(), outcome->error.message().c_str());
    }
  }
}

// Runs the received VM for --exit-after, then pauses it, and records in
// `out` what its workload wrote since the resume (and, after post-copy,
// the guest's progress while its pages arrived). Returns the pages written.
uint64_t RunReceivedVm(engine::VmControl& vm, vmm::Machine& machine, engine::MigrationTarget* target,
                   const std::vector<uint64_t>& at_resume, std::chrono::nanoseconds exit_after,
                   nlohmann::ordered_json& out) {
  // Post-copy: the guest's progress while its pages arrived (sampled by the
  // target), then here while it runs on: [ms since resume, pages written,
  // pages still missing].
  std::vector<engine::MigrationTarget::ProgressSample> samples =
      target != nullptr ? target->postcopy_progress() : std::vector<engine::MigrationTarget::ProgressSample>{};
  const bool sample = !samples.empty();
  const double sample_base = sample ? samples.back().ms : 0;
  const auto completed_at = std::chrono::steady_clock::now();
  auto total_written = [&] {
    uint64_t n = 0;
    for (uint64_t c : vmm::PagesWritten(machine)) n += c;
    return n;
  };
  const auto run_until = std::chrono::steady_clock::now() + exit_after;
  while (std::chrono::steady_clock::now() < run_until && !Interrupted() && machine.error().ok()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (sample) {
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - completed_at).count();
      samples.push_back({sample_base + ms, total_written(), 0});
    }
  }
  if (sample) {
    nlohmann::ordered_json series = nlohmann::ordered_json::array();
    for (const auto& s : samples) series.push_back({std::round(s.ms * 10) / 10, s.pages_written, s.pages_missing});
    out["postcopy_progress"] = series;
  }
  (void)vm.Pause();
  const std::vector<uint64_t> now = vmm::PagesWritten(machine);
  uint64_t after = 0;
  nlohmann::ordered_json per = nlohmann::ordered_json::array();
  for (size_t i = 0; i < now.size(); ++i) {
    const uint64_t d = now[i] - std::min(now[i], at_resume[i]);
    after += d;
    per.push_back({{"id", i}, {"pages_written_after_resume", d}});
  }
  out["pages_written_after_resume"] = after;
  out["vcpus"] = per;
  return after;
}

// The receiver --listen names: a handover server on a unix socket, or a
// migration server on TCP (`*port`: the port it listens on).
Result<std::unique_ptr<transport::MigrationReceiver>> StartReceiver(
    const ReceiveFlags& f, const ReceivePlan& plan, transport::MigrationServer::TargetFactory make_target, int* port) {
  if (plan.local) {
    transport::HandoverServerOptions ho;
    ho.allowed_uids.assign(f.allow_uids.begin(), f.allow_uids.end());
    ho.max_vcpus = f.max_vcpus;
    ho.handshake_timeout = plan.server.handshake_timeout;
    ho.commit_timeout = plan.server.commit_timeout;
    // Between setup and the final state a source may wait for its moment:
    // 10 min unless --idle-timeout says otherwise (0: no limit).
    if (f.idle_timeout != ReceiveFlags{}.idle_timeout) ho.idle_timeout = plan.server.idle_timeout;
    PMLMIG_ASSIGN_OR_RETURN(auto hs, transport::HandoverServer::Start(*transport::ParseUnixAddress(f.listen),
                                                                      std::move(make_target), ho));
    return std::unique_ptr<transport::MigrationReceiver>(std::move(hs));
  }
  PMLMIG_ASSIGN_OR_RETURN(auto gs, transport::MigrationServer::Start(f.listen, std::move(make_target), plan.server));
  *port = gs->port();
  return std::unique_ptr<transport::MigrationReceiver>(std::move(gs));
}

int Receive(const ReceiveFlags& f) {
  ReceivePlan plan;
  if (Status s = ParseReceiveFlags(f, &plan); !s.ok()) return PrintError(s.message()), kExitUsage;
  const bool local = plan.local;
  auto kvm = vmm::Kvm::Open();
  if (!kvm.ok()) return PrintError(kvm.status().message()), kExitFailure;
  InstallInterruptHandler();

  // Builds each incoming VM and remembers it, for the report (one migration at a time).
  vmm::TestVmFactoryOptions fo;
  fo.require_verify = f.verify;
  fo.check_memory = true;
  if (!f.quiet) {
    fo.on_build = [](const vmm::MachineOptions& o) {
      std::fprintf(stderr, "pmlmig receive: building a %s guest with %u vCPU%s, workload %s\n",
                   FormatBytes(o.guest.memory_bytes).c_str(), o.guest.vcpus, o.guest.vcpus == 1 ? "" : "s",
                   vmm::DescribeWorkloads(o.guest.workload, o.guest.vcpu_workloads).c_str());
    };
  }
  vmm::TestVmFactory factory(*kvm, std::move(fo));
  auto make_target = [&factory] { return factory.MakeTarget(); };
  int port = 0;
  Result<std::unique_ptr<transport::MigrationReceiver>> server = StartReceiver(f, plan, make_target, &port);
  if (!server.ok()) {
    const Status& s = server.status();
    const char* advice = s.code() == Code::kPermissionDenied
                             ? " (use --tls-ca/--tls-cert/--tls-key, see scripts/make-certs.sh, or --token-file, or --insecure)"
                             : "";
    return PrintError(s.message() + advice), s.code() == Code::kPermissionDenied || s.code() == Code::kInvalidArgument
                                        ? kExitUsage
                                        : kExitFailure;
  }
  // With port 0 the line is the only way to learn the port: printed even
  // with --quiet.
  if (local && !f.quiet) {
    std::fprintf(stderr, "pmlmig receive: listening on %s (mode 0600, uid %u%s)%s; waiting for a handover\n",
                 f.listen.c_str(), static_cast<unsigned>(::geteuid()), f.allow_uids.empty() ? "" : " and --allow-uid",
                 f.verify ? ", verifying" : "");
  } else if (!local && (!f.quiet || plan.port_zero)) {
    std::fprintf(stderr, "pmlmig receive: listening on %s (port %d)%s%s%s; waiting for a migration\n",
                 f.listen.c_str(), port, plan.server.security.tls() ? ", mutual TLS" : "",
                 plan.server.security.token.empty() ? "" : ", token", f.verify ? ", verifying" : "");
  }

  nlohmann::ordered_json failed_attempts = nlohmann::ordered_json::array();
  Result<transport::ReceivedMigration> outcome = WaitForCompleted(**server, f, plan.wait, &failed_attempts);
  nlohmann::ordered_json out = {{"status", "failed"}, {"resumed", false}, {"verified", nullptr},
                                {"downtime_ms", nullptr}, {"target_restore_ms", nullptr},
                                {"pages_written_after_resume", 0}, {"error", nullptr}};
  out["failed_attempts"] = failed_attempts;
  if (!outcome.ok()) {
    (*server)->Shutdown();
    out["error"] = outcome.status().message();
    if (f.json) std::printf("%s\n", out.dump().c_str());
    PrintError(outcome.status().message());
    return Interrupted() ? kExitInterrupted : kExitFailure;
  }
  transport::ReceivedMigration& o = *outcome;
  const std::string status(engine::OutcomeName(o.outcome));
  out["status"] = status;
  out["rounds"] = o.rounds;
  out["received_normal_pages"] = o.totals.normal_pages;
  out["received_zero_pages"] = o.totals.zero_pages;
  out["received_bytes"] = o.totals.wire_bytes;
  out["postcopy_recoveries"] = o.postcopy_recoveries;
  out["data_path"] = local ? "handover" : o.direct_data ? "direct" : "grpc";
  out["uffd_filled_bytes"] = o.uffd_filled_bytes;
  out["uffd_zero_faults"] = o.uffd_zero_faults;
  out["in_place_bytes"] = o.in_place_bytes;
  out["handover"] = local;  // same host: the memory was taken over, no page received
  if (o.outcome != engine::Outcome::kCompleted) {
    (*server)->Shutdown();
    out["error"] = o.error.message();
    if (f.json) std::printf("%s\n", out.dump().c_str());
    PrintError("migration " + status + ": " + o.error.message() +
               " (the partial VM was discarded)");
    return kExitFailure;
  }
  // Keep answering Resolve while the VM runs here (a source whose commit
  // reply was lost asks); take no other migration.
  (*server)->RefuseNewMigrations("it now runs the VM it received");
  std::unique_ptr<engine::VmControl> vm = std::move(o.vm);
  vmm::Machine* machine = factory.last_built();  // the VM in `vm`: the factory built it
  if (vm == nullptr || machine == nullptr) return PrintError("internal: completed migration without a VM"), kExitFailure;
  std::vector<uint64_t> at_resume = factory.counters_at_check();
  out["resumed"] = true;
  out["verified"] = o.reply.verified ? nlohmann::ordered_json(true) : nlohmann::ordered_json(nullptr);
  out["verify_detail"] = o.reply.verify_detail;
  // Before commit this receiver compared; after commit it returned its
  // digests and the source compares (and reports) once the VM runs here.
  out["verified_by"] = o.reply.verified                  ? nlohmann::ordered_json("target")
                       : !o.reply.chunk_digests.empty() ? nlohmann::ordered_json("source")
                                                        : nlohmann::ordered_json(nullptr);
  out["target_restore_ms"] = o.reply.target_restore_ms;
  out["target_resume_ms"] = o.reply.target_resume_ms;
  out["note"] = o.error.ok() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(o.error.message());
  out["downtime_ms"] = o.reply.source_paused_ms > 0 ? nlohmann::ordered_json(o.reply.source_paused_ms + o.reply.target_restore_ms + o.reply.target_resume_ms)
                                                    : nlohmann::ordered_json(nullptr);
  if (at_resume.empty()) at_resume = vmm::PagesWritten(*machine);  // no check ran: close to the resume point
  if (!f.quiet) {
    std::fprintf(stderr, "pmlmig receive: VM resumed (restore %.1f ms)%s%s; running it for %s\n",
                 o.reply.target_restore_ms, o.reply.verify_detail.empty() ? "" : "; verification: ",
                 o.reply.verify_detail.c_str(), f.exit_after.c_str());
  }
  const uint64_t after = RunReceivedVm(*vm, *machine, o.target.get(), at_resume, plan.exit_after, out);
  Status vm_error = machine->error();
  if (!vm_error.ok()) out["error"] = "the VM failed after resuming: " + vm_error.message();
  if (f.json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("Received: %s, %u rounds, %" PRIu64 " normal + %" PRIu64 " zero pages%s; restore %.1f ms; %s\n",
                status.c_str(), o.rounds, o.totals.normal_pages,
                o.totals.zero_pages,
                local ? " (handed over)" : o.direct_data ? " on direct data streams" : " on gRPC Pages calls",
                o.reply.target_restore_ms, o.reply.verified ? o.reply.verify_detail.c_str() : "not verified");
    if (o.postcopy_recoveries > 0) {
      std::printf("  post-copy: the link broke and the source resumed it %u time%s\n", o.postcopy_recoveries,
                  o.postcopy_recoveries == 1 ? "" : "s");
    }
    std::printf("  after resume the workload wrote %" PRIu64 " pages in %s\n", after, f.exit_after.c_str());
  }
  vm.reset();
  (*server)->Shutdown();  // the VM is gone: nothing left to answer for
  return vm_error.ok() ? kExitOk : kExitFailure;
}

}  // namespace

Command RegisterReceive(CLI::App& app) {
  auto f = std::make_shared<ReceiveFlags>();
  auto* cmd = app.add_subcommand("receive", "Wait for one live migration, resume the VM and report");
  cmd->add_option("--listen", f->listen,
                  "HOST:PORT or [IPV6]:PORT to listen on, port 0..65535 (0: a free port, named on stderr even with "
                  "--quiet); or unix:PATH for same-host handovers ('pmlmig run --local'), a socket of mode 0600")
      ->required();
  cmd->add_option("--allow-uid", f->allow_uids,
                  "With unix:PATH: also take handovers from processes of this uid (repeatable; default: only this "
                  "process's own uid)")
      ->group("Security");
  cmd->add_flag("--verify", f->verify,
                "Refuse a source that does not verify memory; verifying before commit, also run the test VM's "
                "memory checker before resuming");
  cmd->add_option("--exit-after", f->exit_after, "Keep the resumed VM running this long, then report")
      ->capture_default_str();
  cmd->add_option("--wait", f->wait, "Give up when no migration arrived within this time; 0 = wait forever")
      ->capture_default_str();
  cmd->add_flag("--json", f->json, "Print the report as one JSON object on stdout");
  cmd->add_flag("--quiet,-q", f->quiet, "No progress lines");
  cmd->add_option("--attempts", f->attempts,
                  "Give up after this many failed migrations; 0 = keep waiting until one completes")
      ->capture_default_str();
  AddSecurityFlags(cmd, &f->security, /*sender=*/false);
  cmd->add_flag("--insecure", f->insecure,
                "Allow listening on a non-loopback address without TLS or a token (anyone who reaches it can "
                "push a VM here)")
      ->group("Security");
  AddDataPathFlag(cmd, &f->data_path, /*sender=*/false, "Options");
  cmd->add_option("--populate-threads", f->populate_threads,
                  "Threads making fresh guest memory resident just ahead of the first round's data, for a "
                  "single-stream migration (0: off)")
      ->check(CLI::Range(0u, 64u))
      ->capture_default_str()
      ->group("Options");
  cmd->add_flag("--no-uffd-fill", f->no_uffd_fill,
                "With several streams, copy the first round's pages into fresh guest memory instead of placing "
                "them with userfaultfd (UFFDIO_COPY)")
      ->group("Options");
  cmd->add_flag("--no-in-place", f->no_in_place,
                "Stage each batch of the direct data streams in a buffer and copy it into guest memory, instead "
                "of reading it straight into guest memory")
      ->group("Options");
  const char* limits = "Limits";
  cmd->add_option("--max-memory", f->max_memory, "Most guest memory a source may ask for (K/M/G); 0 = what the host has available")
      ->capture_default_str()
      ->group(limits);
  cmd->add_option("--max-vcpus", f->max_vcpus, "Most vCPUs a source may ask for")->capture_default_str()->group(limits);
  cmd->add_option("--max-streams", f->max_streams, "Most data streams a source may open (1-64)")
      ->capture_default_str()
      ->group(limits);
  cmd->add_option("--handshake-timeout", f->handshake_timeout, "A source must send a valid Setup within this")
      ->capture_default_str()
      ->group(limits);
  cmd->add_option("--idle-timeout", f->idle_timeout, "Fail a migration silent this long while receiving; 0 = never")
      ->capture_default_str()
      ->group(limits);
  cmd->add_option("--commit-timeout", f->commit_timeout, "Discard a prepared VM whose Commit does not come within this")
      ->capture_default_str()
      ->group(limits);
  cmd->add_option("--postcopy-recovery", f->postcopy_recovery,
                  "In post-copy, when the connection breaks, keep the VM running (vCPUs on missing pages wait) this "
                  "long for the source to reconnect before discarding it; 0 = discard at once")
      ->capture_default_str()
      ->group(limits);
  return [f]() { return Receive(*f); };
}

}  // namespace pmlmig::tools
