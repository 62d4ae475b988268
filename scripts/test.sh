#!/usr/bin/env bash
# Installs what is missing, builds and runs the whole test suite.
#   scripts/test.sh             the suite on a normal build (build/)
#   scripts/test.sh --sanitize  the suite under ASan+UBSan (build-asan/)
# Tests that need /dev/kvm skip with a reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build
args=()
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  args=(-DPMLMIG_SANITIZE=ON -DPMLMIG_BUILD_BENCH=OFF)
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
scripts/setup.sh "$dir" "${args[@]}"
cd "$dir"
ctest --output-on-failure -j "$(nproc)" --timeout 600
