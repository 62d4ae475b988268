// What the process and the host report through /proc: one reader for each,
// so every component agrees on how a figure is read. Each returns 0 (or "")
// when the file or the field is missing.
#pragma once

#include <cstdint>
#include <string>

namespace pmlmig {

// Memory the host can give a new allocation now (MemAvailable in
// /proc/meminfo), in bytes.
uint64_t HostAvailableMemory();
// This process's peak resident set (VmHWM in /proc/self/status), in bytes.
uint64_t PeakRssBytes();
// The first "model name" of /proc/cpuinfo.
std::string CpuModelName();
// Sets the calling thread's nice value (-10: ahead of ordinary threads) where the
// process may (CAP_SYS_NICE, or an RLIMIT_NICE that allows it); false, and
// nothing changed, where it may not. For threads a waiting guest depends on
// (post-copy's page requests), so the guest's own busy vCPUs do not delay
// them.
bool SetThreadNice(int nice);

}  // namespace pmlmig
