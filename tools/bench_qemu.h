// QEMU as the peer of `pmlmig bench migrate`: one migration between two
// qemu-system-x86_64 processes on this host, driven over QMP.
//
// Both guests are paused (-S) PC machines whose RAM is a shared file in
// /dev/shm (memory-backend-file, share=on: the same kind of memory as
// pmlmig's memfd). The source's file is filled first with the bytes a
// pmlmig random-fill guest of the same size has (FillLikeRandomGuest); the
// target's is new and empty. The target listens (-incoming defer, then
// migrate-incoming on 127.0.0.1, port chosen by QEMU); the source migrates
// to it, with one channel or with multifd. The source's bandwidth limit is
// lifted (QEMU 7.2 caps it at 128 MiB/s by default); nothing else is
// changed: no compression, no XBZRLE, zero-page detection as QEMU does it.
//
// Time is query-migrate's "total-time" once the source says "completed";
// the wall time of the same interval as polled here (every 25 ms) is kept
// to check it. CPU is utime + stime of both processes from /proc/PID/stat,
// read before `migrate` and after the target has completed.
//
// Both processes are killed and both files deleted when the run ends, fails
// or is interrupted (Interrupted()): the files are unlinked as soon as both
// processes have mapped them, and each process gets SIGKILL if the thread
// that started it dies (PR_SET_PDEATHSIG), so a killed benchmark leaks
// neither. Call from the main thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "pmlmig/base/status.h"

namespace pmlmig::tools {

struct QemuMigrateOptions {
  std::string binary;                   // path of qemu-system-x86_64
  uint64_t bytes = 0;                   // guest RAM, a multiple of 2 MiB
  uint32_t multifd_channels = 0;        // 0: one channel, multifd off
  uint64_t seed = 0;                    // of the fill (pmlmig's random guest's)
  std::string accel;                    // "kvm", "tcg", or empty: kvm, else tcg
  std::chrono::seconds timeout{120};    // for the migration itself
};

struct QemuMigrateRun {
  std::string accel;    // what the processes ran with
  std::string version;  // from the QMP greeting, e.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
  double total_ms = 0;  // query-migrate total-time
  double setup_ms = 0;
  double downtime_ms = 0;
  double wall_ms = 0;         // migrate sent to "completed" seen on the source
  double target_wall_ms = 0;  // migrate sent to "completed" seen on the target
  uint64_t transferred_bytes = 0;
  uint64_t normal_pages = 0;  // sent whole
  uint64_t zero_pages = 0;    // "duplicate": found all zero, sent as a flag
  double source_cpu_ms = 0, target_cpu_ms = 0;  // user + kernel, during the migration
};

// The absolute path of `name` found on PATH, or "" if there is none.
std::string FindOnPath(const std::string& name);

Result<QemuMigrateRun> QemuMigrate(const QemuMigrateOptions& options);

}  // namespace pmlmig::tools
