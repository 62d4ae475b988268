#!/usr/bin/env bash
# Builds the non-gRPC test binaries with ThreadSanitizer (build-tsan/) and runs
# every test in them: DirtySet, the dirty ring harvester (synthetic rings with
# a concurrent producer, and on KVM with its collector thread), the userspace
# and union trackers, the bitmap and PML trackers, the vmm, the migration
# source against an in-process fake sink, and the transport's concurrent parts
# that know nothing of gRPC (token bucket, buffer pool, stall watch, failure
# latch: transport_parts_test). gRPC and protobuf are not instrumented, so
# nothing linking them runs here. Expects scripts/setup.sh to
# have installed the packages already. Tests that need /dev/kvm skip with a
# reason where it is absent. Exits non-zero on any test failure or TSan report.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir=build-tsan
bins=(base_test engine_test tracking_kvm_test vmm_test transport_parts_test)

cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPMLMIG_TSAN=ON -DPMLMIG_BUILD_BENCH=OFF >/dev/null
cmake --build "$dir" -j "$(nproc)" --target "${bins[@]}"

export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp"
# GCC 12's TSan runtime cannot map its shadow when the kernel randomizes mmap
# with more than 28 bits ("unexpected memory mapping"): run without ASLR there.
run=()
if [ "$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28)" -gt 28 ]; then
  run=(setarch "$(uname -m)" -R)
fi

failed=()
for b in "${bins[@]}"; do
  exe=$dir/tests/$b
  if ldd "$exe" | grep -Eq 'libgrpc|libprotobuf'; then
    echo "tsan: $b links gRPC/protobuf, which TSan cannot see into" >&2
    failed+=("$b")
    continue
  fi
  echo "tsan: running $b"
  start=$SECONDS
  if "${run[@]}" "$exe" --gtest_brief=1; then
    echo "tsan: $b passed in $((SECONDS - start)) s"
  else
    echo "tsan: $b FAILED (exit $?) after $((SECONDS - start)) s" >&2
    failed+=("$b")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "tsan: failed: ${failed[*]}" >&2
  exit 1
fi
echo "tsan: all of ${bins[*]} passed with no ThreadSanitizer reports"
