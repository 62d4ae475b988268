#include "migration_json.h"

#include <cinttypes>
#include <cstdio>

#include "pmlmig/base/units.h"

namespace pmlmig::tools {

std::string ErrorWithAdvice(const engine::MigrationStats& s) {
  switch (s.cancel_reason) {
    case engine::CancelReason::kNotConverging:
      if (s.throttle.aid == engine::ConvergeAid::kNone) {
        return s.error + " (slow the guest with --dirty-limit auto or --auto-converge, raise --downtime-limit, or "
                         "use --on-timeout force)";
      }
      return s.error + " (raise --downtime-limit or --max-bandwidth, or use --on-timeout force)";
    case engine::CancelReason::kTimedOut: return s.error + " (raise --timeout)";
    default: return s.error;
  }
}

nlohmann::ordered_json VerificationJson(const engine::VerifyReport& v) {
  nlohmann::ordered_json ranges = nlohmann::ordered_json::array();
  for (const auto& r : v.mismatch.ranges) ranges.push_back({{"gpa", FormatHex(r.gpa)}, {"bytes", r.size}});
  return {
      {"verdict", std::string(engine::VerifyVerdictName(v.verdict))},
      {"order", std::string(engine::VerifyOrderName(v.order))},
      {"detail", v.detail},
      {"mismatched_chunks", v.mismatch.chunks},
      {"mismatched_bytes", v.mismatch.bytes},
      {"mismatched_ranges", ranges},
      {"mismatched_ranges_total", v.mismatch.ranges_total},
      {"witness", v.source.witness},
      {"no_witness_reason", v.source.no_witness_reason.empty() ? nlohmann::ordered_json(nullptr)
                                                               : nlohmann::ordered_json(v.source.no_witness_reason)},
      {"pages_hashed_running", v.source.background_pages},
      {"pages_hashed_at_pause", v.source.pause_pages},
      {"source_digest_ms", v.source_digest_ms},
  };
}

nlohmann::ordered_json VcpuRatesJson(const std::vector<engine::VcpuRate>& vcpus, double seconds) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (const engine::VcpuRate& v : vcpus) {
    out.push_back({{"dirty_pages_per_s", v.dirty_pages_per_s},
                   {"entries_per_s", v.entries_per_s},
                   {"quota_pages_per_s", v.quota_pages_per_s},
                   {"dirty_pages", v.dirty_pages},
                   {"mean_dirty_pages_per_s", seconds > 0 ? static_cast<double>(v.dirty_pages) / seconds : 0.0},
                   {"held_ms", static_cast<double>(v.held_ns) / 1e6},
                   {"holds", v.holds}});
  }
  return out;
}

nlohmann::ordered_json ThrottleJson(const engine::MigrationStats& s) {
  const engine::ThrottleReport& t = s.throttle;
  const engine::ThrottleStats& e = t.at_end;
  return {
      {"aid", std::string(engine::ConvergeAidName(t.aid))},
      {"steps", t.steps},
      {"final_pct", t.final_pct},
      {"max_pct", e.max_duty_pct},
      {"final_quota_pages_per_s", t.final_quota_pages_per_s},
      {"min_quota_pages_per_s", e.min_quota_pages_per_s},
      {"per_vcpu_rates", e.per_vcpu_rates},
      {"vcpus", VcpuRatesJson(e.vcpus, s.total_time_ms / 1000)},
  };
}

nlohmann::ordered_json PostcopyJson(const engine::PostcopyReport& p) {
  if (!p.used) return {{"mode", std::string(engine::PostcopyModeName(p.mode))}, {"used", false}};
  const engine::PostcopyResult& r = p.result;
  return {
      {"mode", std::string(engine::PostcopyModeName(p.mode))},
      {"used", true},
      {"owed_pages", p.owed_pages},
      {"switch_ms", p.switch_ms},
      {"duration_ms", p.phase_ms},
      {"target_duration_ms", r.duration_ms},
      {"requests", r.faults},
      {"requested_pages", r.requested_pages},
      {"background_pages", r.background_pages},
      {"duplicate_pages", r.duplicate_pages},
      {"zero_faults", r.zero_faults},
      {"latency_ms", {{"p50", r.latency_p50_ms}, {"p99", r.latency_p99_ms}, {"max", r.latency_max_ms}}},
      {"requests_served", r.requests_served},
      {"pushed_bytes", r.pushed.wire_bytes},
      {"answered_bytes", r.answered.wire_bytes},
      {"recoveries", r.recoveries},
      {"link_down_ms", r.link_down_ms},
      {"done_lost", r.done_lost},
      {"pages_never_sent", p.owed_left},
  };
}

nlohmann::ordered_json MigrationStatsJson(const engine::MigrationStats& s) {
  const bool completed = s.outcome == engine::Outcome::kCompleted;
  nlohmann::ordered_json rounds = nlohmann::ordered_json::array();
  for (const engine::RoundStats& r : s.round_stats) {
    rounds.push_back({{"round", r.round},
                      {"dirty_pages", r.dirty_pages},
                      {"pages", r.sent.pages},
                      {"zero_pages", r.sent.zero_pages},
                      {"bytes", r.sent.wire_bytes},
                      {"duration_ms", r.duration_ms},
                      {"bandwidth_mbps", r.bandwidth_mbps},
                      {"expected_downtime_ms", r.expected_downtime_ms},
                      {"throttle_pct", r.throttle_pct},
                      {"vcpu_quota_pages_per_s", r.vcpu_quota_pages_per_s}});
  }
  return {
      {"status", std::string(engine::OutcomeName(s.outcome))},
      {"total_time_ms", s.total_time_ms},
      {"downtime_ms", completed ? nlohmann::ordered_json(s.downtime_ms) : nlohmann::ordered_json(nullptr)},
      {"setup_time_ms", s.setup_time_ms},
      {"rounds", s.rounds},
      {"transferred_bytes", s.transferred.wire_bytes},
      {"payload_bytes", s.transferred.payload_bytes},
      {"normal_pages", s.transferred.normal_pages},
      {"zero_pages", s.transferred.zero_pages},
      {"throughput_mbps", s.throughput_mbps},
      {"dirty_pages_rate", s.dirty_pages_rate},
      {"expected_downtime_ms", s.expected_downtime_ms},
      {"verified", s.verified},
      {"verify_detail", s.final_reply.verify_detail},
      {"verification", s.verification.verdict == engine::VerifyVerdict::kNotAsked ? nlohmann::ordered_json(nullptr)
                                                                                  : VerificationJson(s.verification)},
      {"target_restore_ms", s.final_reply.target_restore_ms},
      {"target_resume_ms", s.final_reply.target_resume_ms},
      {"commit_resolved", s.commit_resolved},
      {"shared_memory", s.shared_memory},
      {"error", s.error.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(ErrorWithAdvice(s))},
      {"throttle", ThrottleJson(s)},
      {"postcopy", PostcopyJson(s.postcopy)},
      {"round_stats", rounds},
  };
}

namespace {

// "30%", "3.1k/s" (dirty-limit quota per vCPU) or "-".
std::string ThrottleText(uint32_t pct, double quota) {
  char buf[32];
  if (pct > 0) std::snprintf(buf, sizeof buf, "%u%%", pct);
  else if (quota >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk/s", quota / 1e3);
  else if (quota > 0) std::snprintf(buf, sizeof buf, "%.0f/s", quota);
  else return "-";
  return buf;
}

}  // namespace

std::string VerificationText(const engine::VerifyReport& v) {
  if (v.verdict == engine::VerifyVerdict::kNotAsked) return "not requested";
  char buf[160];
  std::snprintf(buf, sizeof buf, " (%s; source digest %.1f ms, %llu pages hashed at the pause%s)",
                std::string(engine::VerifyOrderName(v.order)).c_str(), v.source_digest_ms,
                static_cast<unsigned long long>(v.source.pause_pages), v.source.witness ? "" : ", no write witness");
  std::string out = std::string(engine::VerifyVerdictName(v.verdict)) + ": " + v.detail + buf;
  if (!v.source.witness && !v.source.no_witness_reason.empty()) out += "; no witness: " + v.source.no_witness_reason;
  return out;
}

std::string MigrationStatsText(const engine::MigrationStats& s) {
  const bool completed = s.outcome == engine::Outcome::kCompleted;
  const bool snapshot = completed && s.source_kept;  // the target was a file
  char buf[512];
  std::string out;
  std::snprintf(buf, sizeof buf,
                "%s %s in %.1f ms (setup %.1f ms), downtime %.1f ms, %u rounds\n"
                "  %s %s (%s of pages): %" PRIu64 " normal pages, %" PRIu64 " zero pages, %.0f Mbit/s\n",
                snapshot ? "Snapshot" : "Migration", std::string(engine::OutcomeName(s.outcome)).c_str(),
                s.total_time_ms, s.setup_time_ms,
                completed ? s.downtime_ms : 0.0,
                s.rounds, snapshot ? "written" : "transferred",
                (FormatBytes(s.transferred.wire_bytes) + (snapshot ? " to the file" : " on the wire")).c_str(),
                FormatBytes(s.transferred.payload_bytes).c_str(), s.transferred.normal_pages, s.transferred.zero_pages,
                s.throughput_mbps);
  out += buf;
  if (s.shared_memory && completed) {
    out += "  same-host handover: the target took the guest's memory itself (no page copied)\n";
  }
  if (completed && !snapshot) {
    std::snprintf(buf, sizeof buf, "  target restored in %.1f ms, resumed on commit in %.1f ms%s\n",
                  s.final_reply.target_restore_ms, s.final_reply.target_resume_ms,
                  s.commit_resolved ? " (the commit's reply was lost; Resolve confirmed it)" : "");
    out += buf;
  }
  out += "  verification: " + VerificationText(s.verification) + "\n";
  const engine::ThrottleReport& t = s.throttle;
  if (t.aid != engine::ConvergeAid::kNone || t.steps > 0) {
    std::snprintf(buf, sizeof buf, "  throttle: %s, %u step%s, %s at the end\n",
                  std::string(engine::ConvergeAidName(t.aid)).c_str(), t.steps, t.steps == 1 ? "" : "s",
                  ThrottleText(t.final_pct, t.final_quota_pages_per_s).c_str());
    out += buf;
  }
  const double seconds = s.total_time_ms / 1000;
  for (size_t i = 0; i < t.at_end.vcpus.size() && t.at_end.per_vcpu_rates; ++i) {
    const engine::VcpuRate& v = t.at_end.vcpus[i];
    std::snprintf(buf, sizeof buf, "  vcpu %zu: %.0f new dirty pages/s on average, held %.0f ms (%" PRIu64 " times)\n",
                  i, seconds > 0 ? static_cast<double>(v.dirty_pages) / seconds : 0.0,
                  static_cast<double>(v.held_ns) / 1e6, v.holds);
    out += buf;
  }
  if (s.postcopy.used && s.outcome == engine::Outcome::kPostcopyFailed) {
    const engine::PostcopyResult& r = s.postcopy.result;
    std::snprintf(buf, sizeof buf,
                  "  post-copy (%s): %" PRIu64 " pages owed at the switch, the target ran after %.1f ms; it broke "
                  "%.1f ms later with %" PRIu64 " pages never sent\n"
                  "    %" PRIu64 " page requests answered, %" PRIu64 " pages pushed in the background before that\n",
                  std::string(engine::PostcopyModeName(s.postcopy.mode)).c_str(), s.postcopy.owed_pages,
                  s.postcopy.switch_ms, s.postcopy.phase_ms, s.postcopy.owed_left, r.requests_served,
                  r.background_pages);
    out += buf;
  } else if (s.postcopy.used) {
    const engine::PostcopyResult& r = s.postcopy.result;
    std::snprintf(buf, sizeof buf,
                  "  post-copy (%s): %" PRIu64 " pages owed at the switch, the target ran after %.1f ms and held "
                  "every page %.1f ms later\n"
                  "    %" PRIu64 " page requests (latency p50 %.2f ms, p99 %.2f ms, max %.2f ms), %" PRIu64
                  " pages pushed in the background, %" PRIu64 " duplicates dropped\n",
                  std::string(engine::PostcopyModeName(s.postcopy.mode)).c_str(), s.postcopy.owed_pages,
                  s.postcopy.switch_ms, s.postcopy.phase_ms, r.faults, r.latency_p50_ms, r.latency_p99_ms,
                  r.latency_max_ms, r.background_pages, r.duplicate_pages);
    out += buf;
    if (r.recoveries > 0) {
      std::snprintf(buf, sizeof buf, "    the link broke and was resumed %u time%s (%.1f s without a link)%s\n",
                    r.recoveries, r.recoveries == 1 ? "" : "s", r.link_down_ms / 1000,
                    r.done_lost ? "; the target's final report was lost with the last link" : "");
      out += buf;
    }
  }
  out += "  round   dirty pages      sent       bytes   ms      Mbit/s   expected downtime ms  throttle\n";
  for (const engine::RoundStats& r : s.round_stats) {
    std::snprintf(buf, sizeof buf, "  %5u %13" PRIu64 " %9" PRIu64 " %11s %8.1f %9.0f %12.1f %17s\n", r.round,
                  r.dirty_pages, r.sent.pages, FormatBytes(r.sent.wire_bytes).c_str(), r.duration_ms,
                  r.bandwidth_mbps, r.expected_downtime_ms, ThrottleText(r.throttle_pct, r.vcpu_quota_pages_per_s).c_str());
    out += buf;
  }
  if (!s.error.empty()) out += "  error: " + ErrorWithAdvice(s) + "\n";
  return out;
}

std::string ProgressLine(const engine::MigrationProgress& p) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "[%7.1fs] %-13s round %u | %s sent | %" PRIu64 " pages to send | %.0f Mbit/s | expected downtime %.1f ms",
                p.elapsed_ms / 1000, std::string(engine::PhaseName(p.phase)).c_str(), p.round, FormatBytes(p.wire_bytes).c_str(), p.remaining_pages,
                p.bandwidth_mbps, p.expected_downtime_ms);
  std::string out = buf;
  if (p.phase == engine::Phase::kPostcopy) {
    std::snprintf(buf, sizeof buf, " | post-copy: %" PRIu64 " requests answered", p.postcopy_requests);
    out += buf;
    if (p.postcopy_latency_p99_ms > 0) {
      std::snprintf(buf, sizeof buf, " (latency p50 %.2f ms, p99 %.2f ms)", p.postcopy_latency_p50_ms,
                    p.postcopy_latency_p99_ms);
      out += buf;
    }
    std::snprintf(buf, sizeof buf, ", %" PRIu64 " pages pushed", p.postcopy_pushed_pages);
    out += buf;
    if (p.postcopy_link_down) out += " | LINK LOST, reconnecting (the target's VM runs; vCPUs on missing pages wait)";
    if (p.postcopy_recoveries > 0) out += " | resumed " + std::to_string(p.postcopy_recoveries) + "x";
  }
  out += VcpuRatesText(p.throttle_pct, p.vcpu_quota_pages_per_s, p.vcpus);
  return out;
}

std::string VcpuRatesText(uint32_t throttle_pct, double quota, const std::vector<engine::VcpuRate>& vcpus) {
  std::string out;
  if (throttle_pct > 0 || quota > 0) out += " | throttle " + ThrottleText(throttle_pct, quota);
  if (!vcpus.empty() && (vcpus[0].dirty_pages_per_s > 0 || vcpus[0].entries_per_s > 0 || vcpus.size() > 1)) {
    out += " | vCPU pages/s";
    char b[24];
    for (const engine::VcpuRate& v : vcpus) {
      if (v.dirty_pages_per_s >= 1e3) std::snprintf(b, sizeof b, " %.1fk", v.dirty_pages_per_s / 1e3);
      else std::snprintf(b, sizeof b, " %.0f", v.dirty_pages_per_s);
      out += b;
    }
  }
  return out;
}

}  // namespace pmlmig::tools
