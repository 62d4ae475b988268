// JSON and text renderings of migration statistics shared by `run
// --migrate-to` and `receive`.
#pragma once

#include <nlohmann/json.hpp>

#include "pmlmig/engine/migration_source.h"

namespace pmlmig::tools {

// The engine's error plus what the user can change on the command line.
std::string ErrorWithAdvice(const engine::MigrationStats& s);
nlohmann::ordered_json MigrationStatsJson(const engine::MigrationStats& s);
// The "verification" object: verdict, order, mismatched ranges, witness, costs.
nlohmann::ordered_json VerificationJson(const engine::VerifyReport& v);
// "matched: all 512 chunk digests match (after-commit; source digest 1.2 ms, ...)".
std::string VerificationText(const engine::VerifyReport& v);
// Multi-line human report, in the spirit of QEMU's `info migrate`.
std::string MigrationStatsText(const engine::MigrationStats& s);
// One progress line: "round 3 | 1.2 GiB sent | 512 pages left | 2400 Mbit/s | expected downtime 4 ms".
std::string ProgressLine(const engine::MigrationProgress& p);

}  // namespace pmlmig::tools
