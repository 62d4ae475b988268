// Fail points: named places where a test can make the process die, to prove
// what a peer does when this side vanishes at that exact moment (the fault
// tests kill the receiver at 20 moments of a migration this way).
//
// Armed only through the environment, read once:
//   PMLMIG_FAILPOINTS="receiver.batch=17,receiver.prepared=1"
// The 17th time the program passes PMLMIG_FAILPOINT("receiver.batch") it
// prints one line to stderr and kills itself with SIGKILL (no cleanup, no
// flushing: as if the machine lost power or an operator ran kill -9).
//
// Tamper points are fail points named "tamper.*": instead of killing, the
// Nth pass returns true once, and the caller damages data on purpose (drops
// a page, corrupts a byte) so a test can prove that verification notices.
//
// Disarmed (the variable unset), a fail point costs one load of a global
// flag. Names are listed in docs/SECURITY.md.
#pragma once

#include <atomic>
#include <string_view>

namespace pmlmig {

namespace failpoint_internal {
extern std::atomic<bool> armed;
// Counts a pass; true when it is the Nth of a tamper point (a fail point's
// Nth kills the process).
bool Hit(std::string_view name);
}  // namespace failpoint_internal

inline void FailPoint(std::string_view name) {
  if (failpoint_internal::armed.load(std::memory_order_relaxed)) (void)failpoint_internal::Hit(name);
}

// `name` must start with "tamper.".
inline bool TamperPoint(std::string_view name) {
  return failpoint_internal::armed.load(std::memory_order_relaxed) && failpoint_internal::Hit(name);
}

// Reads PMLMIG_FAILPOINTS; called once at startup by the programs that honour
// it (pmlmig). Returns false (and prints why) when the variable is malformed.
bool ArmFailPointsFromEnvironment();
// The same from a string in the variable's format (tests, in process); an
// empty string disarms everything.
bool ArmFailPoints(std::string_view spec);

}  // namespace pmlmig
