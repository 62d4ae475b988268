// JSON and text renderings of migration statistics shared by `run
// --migrate-to` and `receive`.
#pragma once

#include <nlohmann/json.hpp>

#include "pmlmig/engine/migration_source.h"

namespace pmlmig::tools {

// The engine's error plus what the user can change on the command line.
std::string ErrorWithAdvice(const engine::MigrationStats& s);
nlohmann::ordered_json MigrationStatsJson(const engine::MigrationStats& s);
// Each vCPU's rates, quota and holds; `seconds` (> 0) adds the mean dirty rate over it.
nlohmann::ordered_json VcpuRatesJson(const std::vector<engine::VcpuRate>& vcpus, double seconds);
// The "verification" object: verdict, order, mismatched ranges, witness, costs.
nlohmann::ordered_json VerificationJson(const engine::VerifyReport& v);
// "matched: all 512 chunk digests match (after-commit; source digest 1.2 ms, ...)".
std::string VerificationText(const engine::VerifyReport& v);
// Multi-line human report, in the spirit of QEMU's `info migrate`.
std::string MigrationStatsText(const engine::MigrationStats& s);
// One progress line: "round 3 | 1.2 GiB sent | 512 pages left | 2400 Mbit/s | expected downtime 4 ms".
// With a throttle and per-vCPU rates: "... | throttle 30% | vCPU pages/s 12.1k 11.8k 998".
std::string ProgressLine(const engine::MigrationProgress& p);
// The throttle and per-vCPU part of a progress line (also `pmlmig status`).
std::string VcpuRatesText(uint32_t throttle_pct, double quota, const std::vector<engine::VcpuRate>& vcpus);

}  // namespace pmlmig::tools
