#!/usr/bin/env bash
# Installs what is missing, builds and runs the whole test suite. With no
# argument (what CI runs, via .ci/run) it runs every stage:
#   1. the suite under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
#   2. the dirty ring harvester and the engine's other concurrent parts under
#      ThreadSanitizer (build-tsan/, scripts/tsan.sh; gRPC is not instrumented,
#      so it stays out of this stage)
#   3. the receiver's libFuzzer target over its corpus for 60 s (build-fuzz/,
#      scripts/fuzz.sh)
# One stage only:
#   scripts/test.sh --fast       the suite on the normal build (build/), no sanitizer
#   scripts/test.sh --sanitize   stage 1
#   scripts/test.sh --tsan       stage 2
#   scripts/test.sh --fuzz [S]   stage 3, for S seconds
# Tests that need /dev/kvm skip with a reason where it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

suite() {  # suite BUILD_DIR [cmake args...]
  local dir=$1
  shift
  scripts/setup.sh "$dir" "$@"
  (cd "$dir" && ctest --output-on-failure -j "$(nproc)" --timeout 600)
}

asan() {
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
  export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp:print_suppressions=0"
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  suite build-asan -DPMLMIG_SANITIZE=ON -DPMLMIG_BUILD_BENCH=OFF
}

stage() {  # stage NAME COMMAND...: runs it and reports its time
  local name=$1 t0=$SECONDS
  shift
  echo "=== test.sh: $name"
  "$@"
  echo "=== test.sh: $name passed in $((SECONDS - t0)) s"
}

case "${1:-}" in
  --fast) stage "suite (normal build)" suite build ;;
  --sanitize) stage "suite under ASan+UBSan" asan ;;
  --tsan) scripts/setup.sh --install-only && stage "TSan" scripts/tsan.sh ;;
  --fuzz) stage "fuzz" scripts/fuzz.sh "${2:-60}" ;;
  "")
    stage "suite under ASan+UBSan" asan
    stage "TSan" scripts/tsan.sh
    stage "fuzz" scripts/fuzz.sh "${PMLMIG_FUZZ_SECONDS:-60}"
    echo "=== test.sh: all stages passed in $SECONDS s"
    ;;
  *)
    echo "usage: $0 [--fast | --sanitize | --tsan | --fuzz [SECONDS]]" >&2
    exit 2
    ;;
esac
