// Plots for benchmark results: a small matplotlib script run with python3.
#pragma once

#include <string>

#include "pmlmig/base/status.h"

namespace pmlmig::tools {

// Line plot of collection time against guest size, one line per
// (tracker, dirty size), log-log, from the JSON file `json_path`.
Status PlotDirtyBench(const std::string& json_path, const std::string& png_path);

// Per-round dirty pages and bandwidth of every hotset migration in the
// results JSON of `pmlmig bench migrate` (`json_path`), one line each.
Status PlotMigrateBench(const std::string& json_path, const std::string& png_path);

// Throughput against stream count of `pmlmig bench migrate` (several
// --streams): pmlmig, QEMU multifd (and one channel), baselines (b) and (a).
Status PlotMigrateStreams(const std::string& json_path, const std::string& png_path);

// Where PlotMigrateStreams writes next to --plot FILE: FILE-streams.png.
std::string StreamsPlotPath(const std::string& png_path);

}  // namespace pmlmig::tools
