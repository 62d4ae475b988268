// JSON and text renderings of migration statistics shared by `run
// --migrate-to` and `receive`.
#pragma once

#include <nlohmann/json.hpp>

#include "pmlmig/engine/migration_source.h"

namespace pmlmig::tools {

// The engine's error plus what the user can change on the command line.
std::string ErrorWithAdvice(const engine::MigrationStats& s);
nlohmann::ordered_json MigrationStatsJson(const engine::MigrationStats& s);
// Multi-line human report, in the spirit of QEMU's `info migrate`.
std::string MigrationStatsText(const engine::MigrationStats& s);
// One progress line: "round 3 | 1.2 GiB sent | 512 pages left | 2400 Mbit/s | expected downtime 4 ms".
std::string ProgressLine(const engine::MigrationProgress& p);

}  // namespace pmlmig::tools
