// pmlmig: dirty-page tracking and live migration for KVM test VMs.
#include <csignal>
#include <cstdio>
#include <map>
#include <optional>
#include <string>

#include "commands.h"
#include "pmlmig/base/failpoint.h"
#include "pmlmig/version.h"

namespace pmlmig::tools {
namespace {

volatile std::sig_atomic_t g_interrupted = 0;

// CLI11 answers a word that names no command, and a missing command, with
// "A subcommand is required"; this names the word and lists the commands.
// It follows the words that choose a command ("bench migrate") up to the
// first option; everything else is CLI11's to check.
std::optional<std::string> CommandError(const CLI::App& app, int argc, char** argv) {
  const CLI::App* level = &app;
  std::string path;  // the commands chosen so far, e.g. "bench"
  for (int i = 1;; ++i) {
    const auto subs = level->get_subcommands([](const CLI::App*) { return true; });
    if (subs.empty()) return std::nullopt;
    std::string names;
    for (const CLI::App* sub : subs) names += (names.empty() ? "" : ", ") + sub->get_name();
    const std::string where = path.empty() ? "" : path + " ";
    const std::string help = "see 'pmlmig " + where + "--help'";
    if (i >= argc) {
      if (level->get_require_subcommand_min() == 0) return std::nullopt;
      return "no " + where + "command given (commands: " + names + "; " + help + ")";
    }
    const std::string word = argv[i];
    if (word.empty() || word[0] == '-') return std::nullopt;
    const CLI::App* next = nullptr;
    for (const CLI::App* sub : subs) {
      if (sub->check_name(word)) next = sub;
    }
    if (next == nullptr) return "unknown " + where + "command '" + word + "' (commands: " + names + "; " + help + ")";
    level = next;
    path = where + next->get_name();
  }
}

}  // namespace

void PrintError(const std::string& message) { std::fprintf(stderr, "pmlmig: error: %s\n", message.c_str()); }

bool Interrupted() { return g_interrupted != 0; }

void InstallInterruptHandler() {
  struct sigaction sa {};
  sa.sa_handler = [](int) { g_interrupted = 1; };
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace pmlmig::tools

int main(int argc, char** argv) {
  using namespace pmlmig::tools;
  if (!pmlmig::ArmFailPointsFromEnvironment()) return kExitUsage;
  CLI::App app{"pmlmig: dirty-page tracking and live migration for KVM.\n"
               "Run 'pmlmig <command> --help' for a command's options.",
               "pmlmig"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "pmlmig " + std::string(pmlmig::VersionString()) + " (wire protocol " +
                                         std::to_string(pmlmig::kWireVersion) + ")");
  std::map<const CLI::App*, Command> commands;
  auto add = [&](Command (*reg)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    Command c = reg(app);
    const auto subs = app.get_subcommands({});
    for (size_t i = before; i < subs.size(); ++i) commands[subs[i]] = c;  // one Command may serve several
  };
  add(&RegisterProbe);
  add(&RegisterRun);
  add(&RegisterReceive);
  add(&RegisterControl);
  add(&RegisterRestore);
  add(&RegisterBench);
  if (std::optional<std::string> e = CommandError(app, argc, argv)) {
    PrintError(*e);
    return kExitUsage;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    PrintError(std::string(e.what()) + " (see 'pmlmig --help')");
    return kExitUsage;
  }
  for (const CLI::App* sub : app.get_subcommands()) {
    auto it = commands.find(sub);
    if (it != commands.end()) return it->second();
  }
  PrintError("no command given (see 'pmlmig --help')");
  return kExitUsage;
}
