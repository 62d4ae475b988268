#include "pmlmig/base/failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace pmlmig {
namespace failpoint_internal {

std::atomic<bool> armed{false};

namespace {
std::mutex mu;
std::map<std::string, long, std::less<>> remaining;  // guarded by mu: hits left before the kill
}  // namespace

bool Hit(std::string_view name) {
  std::lock_guard lock(mu);
  auto it = remaining.find(name);
  if (it == remaining.end() || it->second <= 0 || --it->second > 0) return false;
  if (name.starts_with("tamper.")) {
    std::fprintf(stderr, "pmlmig: tamper point %.*s reached: damaging data on purpose\n",
                 static_cast<int>(name.size()), name.data());
    return true;
  }
  std::fprintf(stderr, "pmlmig: fail point %.*s reached: killing this process (SIGKILL)\n",
               static_cast<int>(name.size()), name.data());
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
  ::_exit(137);  // not reached
  return false;
}

}  // namespace failpoint_internal

bool ArmFailPointsFromEnvironment() {
  const char* env = std::getenv("PMLMIG_FAILPOINTS");
  if (env == nullptr || *env == '\0') return true;
  return ArmFailPoints(env);
}

bool ArmFailPoints(std::string_view spec) {
  std::map<std::string, long, std::less<>> parsed;
  std::string_view rest(spec);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    const size_t eq = item.find('=');
    const std::string name(item.substr(0, eq));
    long count = 1;
    if (eq != std::string_view::npos) {
      const std::string num(item.substr(eq + 1));
      char* end = nullptr;
      count = std::strtol(num.c_str(), &end, 10);
      if (num.empty() || *end != '\0' || count < 1) count = 0;
    }
    if (name.empty() || count < 1) {
      std::fprintf(stderr, "pmlmig: PMLMIG_FAILPOINTS: bad entry '%.*s' (expected name=N, N >= 1)\n",
                   static_cast<int>(item.size()), item.data());
      return false;
    }
    parsed[name] = count;
  }
  std::lock_guard lock(failpoint_internal::mu);
  failpoint_internal::remaining = std::move(parsed);
  failpoint_internal::armed.store(!failpoint_internal::remaining.empty());
  return true;
}

}  // namespace pmlmig
