// The machine's own limits for `pmlmig bench migrate`: raw loopback TCP with
// N connections, each a sender and a receiver thread, moving a guest's size.
//
//   (a) TcpIntoReusedBuffer: every thread writes from / reads into its own
//       1 MiB buffer. What the socket layer alone can carry.
//   (b) TcpIntoFreshMemory: receiver i read()s straight into its contiguous
//       slice of a new memfd mapping of the guest's size that nothing has
//       touched; sender i writes its slice of a resident source memfd of the
//       same size (filled like a random guest before the timer starts, held
//       for the run). What any migration target on this machine can reach:
//       the first touch of fresh shared memory is part of the cost.
//
// Both time the first write to the last byte read and take the process's
// CPU (getrusage RUSAGE_SELF: every thread, user + kernel) across the run, so
// run them with nothing else busy in the process. Main thread only.
#pragma once

#include <cstdint>

#include "pmlmig/base/status.h"

namespace pmlmig::tools {

inline constexpr uint64_t kBaselineChunk = 1ull << 20;  // 1 MiB writes and reads

struct TcpRun {
  double seconds = 0;  // first write to the last byte read
  double cpu_ms = 0;   // the process's user + kernel CPU over the run
};

// (a): `bytes` in all, split evenly over `connections` connections.
Result<TcpRun> TcpIntoReusedBuffer(uint64_t bytes, uint32_t connections);

// (b): `bytes` (a multiple of 4 KiB) in all, into never-touched memory.
Result<TcpRun> TcpIntoFreshMemory(uint64_t bytes, uint32_t connections, uint64_t seed);

// Fills `bytes` at `base` with what a random-fill test guest of that size has
// at the same memfd offsets (vmm::FillPage of the page's guest-physical
// frame, seed `seed`), from every CPU. Also the first pages, which the test
// guest uses for its page tables and program: here they are random too.
void FillLikeRandomGuest(uint8_t* base, uint64_t bytes, uint64_t seed);

}  // namespace pmlmig::tools
