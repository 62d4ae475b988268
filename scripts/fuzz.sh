#!/usr/bin/env bash
# The fuzz stage: builds the receiver's libFuzzer target with clang in
# build-fuzz/ (installing clang and libFuzzer's runtime if missing) and runs
# it over tests/fuzz/corpus/receiver/ for a bounded time. New corpus entries
# go to a temporary directory, never into the repository.
#
#   scripts/fuzz.sh [SECONDS]    fuzz for SECONDS (default 60)
#
# Fails (non-zero) on any crash, leak, timeout, out-of-memory or sanitizer
# report, printing the reproducer's path; rerun it with
#   build-fuzz/tests/fuzz/receiver_fuzz REPRODUCER
# To add what a run found to the repository's corpus (keep it small):
#   build-fuzz/tests/fuzz/receiver_fuzz -merge=1 tests/fuzz/corpus/receiver NEW_CORPUS_DIR
# The seed files (seed-*) come from build-fuzz/tests/fuzz/receiver_fuzz --make-corpus DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "usage: $0 [SECONDS]" >&2
  exit 2
fi
BUILD_DIR=${BUILD_DIR:-build-fuzz}
CORPUS=tests/fuzz/corpus/receiver

# What the project needs to configure, plus clang and libFuzzer's runtime
# (libclang_rt.fuzzer-x86_64.a is in libclang-rt-14-dev on Debian 12).
scripts/setup.sh --install-only clang-14 libclang-rt-14-dev

jobs=${FUZZ_BUILD_JOBS:-$(nproc)}
t0=$(date +%s)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DPMLMIG_FUZZ=ON -DPMLMIG_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "$jobs" --target receiver_fuzz
t1=$(date +%s)
echo "fuzz: build took $((t1 - t0)) s"

fuzzer=$BUILD_DIR/tests/fuzz/receiver_fuzz
work=$(mktemp -d "${TMPDIR:-/tmp}/pmlmig-fuzz.XXXXXX")
mkdir -p "$work/corpus" "$work/artifacts"
log=$work/fuzz.log
echo "fuzz: running receiver_fuzz for ${seconds} s over $CORPUS ($(ls "$CORPUS" | wc -l) files); new entries and log in $work"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0:handle_abort=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
rc=0
# The first directory receives new entries; the repository's is read only.
"$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
  -print_final_stats=1 -artifact_prefix="$work/artifacts/" \
  "$work/corpus" "$CORPUS" >"$log" 2>&1 || rc=$?
t2=$(date +%s)

grep -E '^stat::|^Done [0-9]+ runs|^#[0-9]+ +DONE' "$log" || true
reports=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:|invariant violated|==ERROR' "$log" || true)
artifacts=$(find "$work/artifacts" -type f | sort)
if [ "$rc" -ne 0 ] || [ "$reports" -ne 0 ] || [ -n "$artifacts" ]; then
  echo "fuzz: FAILED (exit $rc, $reports sanitizer/invariant reports) after $((t2 - t1)) s" >&2
  grep -E -B2 -A40 'ERROR: |runtime error:|invariant violated' "$log" | head -120 >&2 || tail -60 "$log" >&2
  for a in $artifacts; do
    echo "fuzz: reproducer: $a  (rerun: $fuzzer $a)" >&2
  done
  echo "fuzz: full log: $log" >&2
  exit 1
fi
echo "fuzz: OK: no crash, leak or sanitizer report in ${seconds} s of fuzzing ($((t2 - t1)) s run, $((t2 - t0)) s in all)"
echo "fuzz: $(find "$work/corpus" -type f | wc -l) new corpus entries in $work/corpus"
