#!/usr/bin/env bash
# Builds the non-gRPC test binaries with ThreadSanitizer (build-tsan/) and runs
# every test in them: DirtySet, the dirty ring harvester (synthetic rings with
# a concurrent producer, and on KVM with its collector thread), the userspace
# and union trackers, the bitmap and PML trackers, the vmm, the migration
# source against an in-process fake sink, and the transport's concurrent parts
# that know nothing of gRPC (token bucket, buffer pool, stall watch, failure
# latch: transport_parts_test). gRPC and protobuf are not instrumented, so
# nothing linking them runs here by default. Expects scripts/setup.sh to have
# installed the packages already. Tests that need /dev/kvm skip with a reason
# where it is absent. Exits non-zero on any test failure or TSan report.
#
#   scripts/tsan.sh --grpc   also the gRPC transport tests (transport_test),
#                            with tests/tsan_grpc.supp. Not run by default: it
#                            needs suppressions for gRPC's header code, and a
#                            test that depends on which of two streams reports
#                            first can fail under TSan's slowdown.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=build-tsan
bins=(base_test engine_test tracking_kvm_test vmm_test transport_parts_test)
grpc_bins=()
if [ "${1:-}" = "--grpc" ]; then
  grpc_bins=(transport_test)
fi

cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPMLMIG_TSAN=ON -DPMLMIG_BUILD_BENCH=OFF >/dev/null
cmake --build "$dir" -j "$(nproc)" --target "${bins[@]}" "${grpc_bins[@]}"

# GCC 12's TSan runtime cannot map its shadow when the kernel randomizes mmap
# with more than 28 bits ("unexpected memory mapping"): run without ASLR there.
run=()
if [ "$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28)" -gt 28 ]; then
  run=(setarch "$(uname -m)" -R)
fi

failed=()
# Runs test binary $1 with the suppressions in $2.
run_test() {
  echo "tsan: running $1"
  local start=$SECONDS
  if TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$2" \
      "${run[@]}" "$dir/tests/$1" --gtest_brief=1; then
    echo "tsan: $1 passed in $((SECONDS - start)) s"
  else
    echo "tsan: $1 FAILED (exit $?) after $((SECONDS - start)) s" >&2
    failed+=("$1")
  fi
}
for b in "${bins[@]}"; do
  if ldd "$dir/tests/$b" | grep -Eq 'libgrpc|libprotobuf'; then
    echo "tsan: $b links gRPC/protobuf, which TSan cannot see into" >&2
    failed+=("$b")
    continue
  fi
  run_test "$b" "$root/tests/tsan.supp"
done
for b in "${grpc_bins[@]}"; do
  run_test "$b" "$root/tests/tsan_grpc.supp"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "tsan: failed: ${failed[*]}" >&2
  exit 1
fi
echo "tsan: all of ${bins[*]} ${grpc_bins[*]} passed with no ThreadSanitizer reports"
