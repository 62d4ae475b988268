// The pmlmig command's subcommands. Each Register* adds its CLI11 subcommand
// and returns the function that runs it once parsing succeeded; that function
// returns the process exit status.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace pmlmig::tools {

using Command = std::function<int()>;

Command RegisterProbe(CLI::App& app);
Command RegisterRun(CLI::App& app);
Command RegisterBench(CLI::App& app);
Command RegisterReceive(CLI::App& app);
Command RegisterControl(CLI::App& app);  // migrate, snapshot, status, cancel
Command RegisterRestore(CLI::App& app);
// `bench migrate`, added under the `bench` subcommand (bench_migrate.cc).
Command RegisterBenchMigrate(CLI::App& bench);

// Exit statuses shared by every subcommand.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;   // the operation failed (error printed)
constexpr int kExitUsage = 2;     // bad flags or arguments
constexpr int kExitInDoubt = 3;   // a switch-over whose outcome is unknown: the VM stays paused
constexpr int kExitMismatch = 4;   // migrated, and verification after commit found the memory differs
constexpr int kExitPostcopyFailed = 5;  // post-copy broke after the switch: the target's run is lost
constexpr int kExitInterrupted = 130;

// Prints "pmlmig: error: <message>" as one line on stderr.
void PrintError(const std::string& message);

// Set by SIGINT/SIGTERM; long-running commands poll it.
bool Interrupted();
void InstallInterruptHandler();

}  // namespace pmlmig::tools
