#include "pmlmig/base/proc.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <string>

namespace pmlmig {
namespace {

// The number after "<key>" on the line that starts with it, in KiB.
uint64_t KibField(const char* path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      try {
        return std::stoull(line.substr(key.size())) * 1024;
      } catch (...) {
        return 0;
      }
    }
  }
  return 0;
}

}  // namespace

uint64_t HostAvailableMemory() { return KibField("/proc/meminfo", "MemAvailable:"); }
uint64_t PeakRssBytes() { return KibField("/proc/self/status", "VmHWM:"); }

std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? "" : line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "";
}

bool SetThreadNice(int nice) {
  const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  return ::setpriority(PRIO_PROCESS, tid, nice) == 0;
}

}  // namespace pmlmig
