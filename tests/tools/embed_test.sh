#!/usr/bin/env bash
# Embedding pmlmig from C, as a VMM author meets it: examples/ (minivmm, a
# tiny KVM VMM in C that uses nothing of pmlmig but pmlmig/pmlmig.h and
# libpmlmig.so) built against an installed pmlmig, then a live migration
# between two minivmm processes.
#
#   1. `cmake --install` the build tree to a temporary prefix.
#   2. Build examples/ as a separate CMake project (find_package(pmlmig 0.13),
#      pmlmig::pmlmig) and a second time through pkg-config (examples/Makefile,
#      or its one-line cc command where make is absent).
#   3. The CMake build: --help, and --run with random pauses (every page
#      checked at each pause: the VMM on its own, no migration).
#   4. `minivmm --receive 127.0.0.1:0` (CMake build; it prints the port it
#      got) and `minivmm --send 127.0.0.1:PORT --verify` (pkg-config build):
#      both must exit 0; the receiver must have checked every page before the
#      resume and again after running on; the sender's final memory digest and
#      vCPU positions must equal what the receiver restored; pmlmig's own
#      digest must have been verified.
#   4a. The same with --auto-converge and a 1 ms downtime limit: pmlmig takes
#      throttle steps (minivmm's vCPU threads hold as pmlmig_vm_throttle_ns
#      says), completes, verified, and the guest runs on at the target.
#   4b. The same with --postcopy now (the C ABI's post-copy): both exit 0,
#      pmlmig did not call the check (memory was missing at the resume), the
#      receiver checked every page after running on and every vCPU moved on
#      from where load_state put it, pmlmig's digests verified.
#   4c. A same-host handover (unix:PATH, local, shared_factory).
#   4d. A live snapshot (snapshot_to), the VM running on at the source; eager
#      and lazy restores (pmlmig_restore_*) in fresh processes, every page
#      checked after running on; a foreign file refused with a reason.
#   5. A failure: --send to a port nobody listens on exits 1, says why, and
#      shows the VM kept running on the source (every page checked, every vCPU
#      advanced).
# Exit 0 pass, 1 fail, 77 skip (no usable /dev/kvm).
#
# Environment: PMLMIG_SOURCE_DIR (the project's source root; default: this
# checkout), PMLMIG_BUILD_DIR (a configured and built build tree; required),
# CC (default cc), PMLMIG_TEST_FLAGS (sanitizer flags of an instrumented
# build, used for the example too).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=${PMLMIG_SOURCE_DIR:-$(cd "$here/../.." && pwd)}
build=${PMLMIG_BUILD_DIR:?embed_test: set PMLMIG_BUILD_DIR to a built pmlmig build tree}
CC=${CC:-cc}
read -r -a test_flags <<<"${PMLMIG_TEST_FLAGS:-}"

if [ ! -c /dev/kvm ] || [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "embed_test: SKIP: minivmm needs a usable /dev/kvm (absent or not read-writable here)"
  exit 77
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pmlmig-embed.XXXXXX")
children=()
cleanup() {
  local pid
  for pid in "${children[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

die() {
  echo "embed_test: FAIL: $*" >&2
  exit 1
}
pass() { echo "embed_test: ok: $*"; }

# quiet LOG CMD...: runs CMD, its output shown only when it fails.
quiet() {
  local log=$1
  shift
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    die "$* (log above)"
  fi
}

# show FILE...: the files, indented, for a failure report.
show() {
  local f
  for f in "$@"; do
    echo "--- $f" >&2
    sed 's/^/    /' "$f" >&2
  done
}

# ---- 1. install -------------------------------------------------------------

prefix=$tmp/prefix
quiet "$tmp/install.log" cmake --install "$build" --prefix "$prefix"
pc=$(find "$prefix" -name pmlmig.pc -path '*/pkgconfig/*' | head -n 1)
[ -n "$pc" ] || die "the installation under $prefix has no pkgconfig/pmlmig.pc"
pcdir=$(dirname "$pc")
libdir=$(dirname "$pcdir")
[ -e "$libdir/libpmlmig.so" ] || die "no libpmlmig.so beside $pcdir (in $libdir)"
pass "installed to a temporary prefix ($(basename "$libdir")/pkgconfig/pmlmig.pc)"

# ---- 2. two builds ----------------------------------------------------------

cmake_build=$tmp/cmake-build
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
quiet "$tmp/configure.log" cmake -S "$src/examples" -B "$cmake_build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_C_COMPILER="$CC" -DCMAKE_C_FLAGS="${test_flags[*]}"
quiet "$tmp/build.log" cmake --build "$cmake_build" -j 2
cmake_vmm=$cmake_build/minivmm
[ -x "$cmake_vmm" ] || die "the CMake build made no minivmm"
pass "examples/ built with find_package(pmlmig 0.13) + pmlmig::pmlmig"

pc_build=$tmp/pc-build
mkdir -p "$pc_build"
export PKG_CONFIG_PATH=$pcdir
if command -v make >/dev/null; then
  quiet "$tmp/make.log" make -C "$src/examples" O="$pc_build" CC="$CC" \
    CFLAGS="-O2 -g ${test_flags[*]}" LDFLAGS="${test_flags[*]}"
  how="examples/Makefile"
else
  # The one-line command of examples/README.md.
  read -r -a pc_flags <<<"$(pkg-config --cflags --libs pmlmig)"
  quiet "$tmp/cc.log" "$CC" -std=c11 -Wall -Wextra -Werror -O2 -pthread "${test_flags[@]}" \
    "$src"/examples/*.c "${pc_flags[@]}" -o "$pc_build/minivmm"
  how="the one-line cc command"
fi
pc_vmm=$pc_build/minivmm
[ -x "$pc_vmm" ] || die "the pkg-config build made no minivmm"
pass "examples/ built with pkg-config ($how)"
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# ---- 3. the VMM on its own --------------------------------------------------

"$cmake_vmm" --help >"$tmp/help.out" || die "minivmm --help exited $?"
grep -q -- "--receive HOST:PORT" "$tmp/help.out" || die "minivmm --help does not describe --receive"
if "$cmake_vmm" --run 1 --bogus >/dev/null 2>"$tmp/usage.err"; then die "minivmm accepted --bogus"; else rc=$?; fi
[ "$rc" -eq 2 ] || die "a bad flag exited $rc, not 2"
if ! timeout 120 "$cmake_vmm" --run 2 --pauses 20 --vcpus 2 --memory 16 >"$tmp/run.out" 2>"$tmp/run.err"; then
  show "$tmp/run.out" "$tmp/run.err"
  die "minivmm --run failed"
fi
grep -Eq '^run: .* 21 checks: all 4096 of 4096 pages good each time' "$tmp/run.out" ||
  { show "$tmp/run.out"; die "minivmm --run did not check every page at every pause"; }
pass "minivmm --run: 21 pauses at random moments, all 4096 pages checked at each"

# ---- 4. a live migration between the two builds ----------------------------

# start_receiver: the CMake build's --receive on a free port ($receiver, $port).
start_receiver() {
  timeout 300 "$cmake_vmm" --receive 127.0.0.1:0 --run-after 1 >"$tmp/receive.out" 2>"$tmp/receive.err" &
  receiver=$!
  children+=("$receiver")
  port=
  for _ in $(seq 300); do
    port=$(sed -n 's/^receive: listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$tmp/receive.out")
    [ -n "$port" ] && break
    kill -0 "$receiver" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$port" ] || [ "$port" = 0 ]; then
    show "$tmp/receive.out" "$tmp/receive.err"
    die "the receiver did not report a listening port"
  fi
}

# migrate WHAT [SEND FLAGS...]: a receiver, then the pkg-config build's
# --send of a 64 MiB, 2-vCPU guest to it, verified; both must exit 0.
migrate() {
  local what=$1 send_rc=0 receive_rc=0
  shift
  start_receiver
  timeout 300 "$pc_vmm" --send "127.0.0.1:$port" --verify --after 500 --memory 64 --vcpus 2 "$@" \
    >"$tmp/send.out" 2>"$tmp/send.err" || send_rc=$?
  wait "$receiver" || receive_rc=$?
  children=()
  if [ "$send_rc" -ne 0 ] || [ "$receive_rc" -ne 0 ]; then
    show "$tmp/send.out" "$tmp/send.err" "$tmp/receive.out" "$tmp/receive.err"
    die "$what: sender exited $send_rc, receiver exited $receive_rc (both must be 0)"
  fi
}
migrate migration --streams 2  # two streams: the receiver places round 0 with userfaultfd

expect() {  # expect FILE REGEX WHAT
  grep -Eq "$2" "$1" || { show "$tmp/send.out" "$tmp/receive.out"; die "$3"; }
}
expect "$tmp/send.out" '^migration: completed .* verified yes$' "the sender's statistics do not say completed and verified"
expect "$tmp/send.out" '^source: completed; final state: all 16384 of 16384 pages good' \
  "the sender did not check its final state"
expect "$tmp/receive.out" '^receive: check before resume: all 16384 of 16384 pages good' \
  "the receiver did not check every page before resuming"
expect "$tmp/receive.out" '^receive: completed: .*, [1-9][0-9]*\.[0-9] MB placed with userfaultfd$' \
  "the receiver did not place the first round (two streams, a memfd) with userfaultfd"
expect "$tmp/receive.out" \
  '^receive: after running 1\.0 s here: all 16384 of 16384 pages good, every vCPU advanced past the migration point$' \
  "the receiver did not check every page after running on"

digest() { sed -n "s/^$2.* memory digest \(0x[0-9a-f]*\)$/\1/p" "$1"; }
sent=$(digest "$tmp/send.out" 'source: completed')
restored=$(digest "$tmp/receive.out" 'receive: check before resume')
if [ -z "$sent" ] || [ "$sent" != "$restored" ]; then
  show "$tmp/send.out" "$tmp/receive.out"
  die "memory digest: sent '$sent', restored '$restored'"
fi
# The vCPU positions the receiver restored are the sender's final ones: the
# first block of "receive:   vcpu" lines (the second is after running on).
sed -n 's/^source: *\(vcpu .*\)$/\1/p' "$tmp/send.out" >"$tmp/sent.pos"
sed -n '/^receive: check before resume/,/^receive: [^ ]/s/^receive: *\(vcpu .*\)$/\1/p' "$tmp/receive.out" \
  >"$tmp/restored.pos"
if [ ! -s "$tmp/sent.pos" ] || ! cmp -s "$tmp/sent.pos" "$tmp/restored.pos"; then
  show "$tmp/sent.pos" "$tmp/restored.pos"
  die "the restored vCPU positions differ from the sent ones"
fi
pass "migrated live (pkg-config build -> CMake build): every page checked before and after the resume, digest $sent on both sides"

# ---- 4a. auto-converge through the C ABI -----------------------------------
# A 1 ms downtime limit that the guest's writes never let a round meet: pmlmig
# throttles the vCPUs, which minivmm holds out of KVM_RUN as long as
# pmlmig_vm_throttle_ns says (its kick_vcpu op makes a running vCPU ask).

migrate "auto-converge migration" --auto-converge --downtime-limit 1
expect "$tmp/send.out" '^migration: completed .* verified yes$' "auto-converge: the sender's statistics do not say completed and verified"
expect "$tmp/send.out" '^migration: throttled in [1-9][0-9]* steps, at most [1-9][0-9]*%$' \
  "auto-converge: pmlmig took no throttle step"
expect "$tmp/receive.out" \
  '^receive: after running 1\.0 s here: all 16384 of 16384 pages good, every vCPU advanced past the migration point$' \
  "auto-converge: the receiver did not check every page after running on"
pass "auto-converge (C ABI): $(grep -m1 '^migration: throttled' "$tmp/send.out" | cut -c12-), completed, verified, the guest runs on at the target"

# ---- 4b. post-copy through the C ABI ---------------------------------------
# The VM resumes on the target before its memory is there: pmlmig does not
# call the check (it would read missing pages); the receiver checks every
# page after running on (each read of a missing page waits for it), and the
# vCPUs must have moved on from where load_state put them.

migrate "post-copy migration" --postcopy now
expect "$tmp/send.out" '^migration: completed .* verified yes$' "post-copy: the sender's statistics do not say completed and verified"
expect "$tmp/send.out" '^migration: post-copy: [1-9][0-9]* pages owed at the switch, [0-9]+ requests' \
  "post-copy: the sender's statistics do not show the post-copy"
expect "$tmp/receive.out" '^receive: post-copy: resumed before all memory was here' \
  "post-copy: the receiver did not report a post-copy resume"
if grep -q '^receive: check before resume' "$tmp/receive.out"; then
  show "$tmp/receive.out"
  die "post-copy: the check ran before the resume, with memory missing"
fi
expect "$tmp/receive.out" \
  '^receive: after running 1\.0 s here: all 16384 of 16384 pages good, every vCPU advanced past the migration point$' \
  "post-copy: the receiver did not check every page after running on"
pass "post-copy (C ABI): resumed at once, every page checked after running on, digests verified ($(grep -m1 '^migration: post-copy' "$tmp/send.out" | cut -c22-110))"

# ---- 4c. same-host handover through the C ABI ------------------------------
# The receiver listens on a unix socket (pmlmig_receive_options.shared_factory);
# the sender hands its memfd over (pmlmig_migrate_options.local): no page is
# copied, the receiver's minivmm maps the same memory, checks every page
# before the resume (verifying) and after running on.

hsock="$tmp/handover.sock"
send_rc=0 receive_rc=0
timeout 120 "$cmake_vmm" --receive "unix:$hsock" --run-after 1 >"$tmp/receive.out" 2>"$tmp/receive.err" &
receiver=$!
children+=("$receiver")
for _ in $(seq 100); do [ -S "$hsock" ] && break; sleep 0.1; done
timeout 120 "$pc_vmm" --send "unix:$hsock" --local --verify --after 500 --memory 64 --vcpus 2 \
  >"$tmp/send.out" 2>"$tmp/send.err" || send_rc=$?
wait "$receiver" || receive_rc=$?
children=()
if [ "$send_rc" -ne 0 ] || [ "$receive_rc" -ne 0 ]; then
  show "$tmp/send.out" "$tmp/send.err" "$tmp/receive.out" "$tmp/receive.err"
  die "handover: sender exited $send_rc, receiver exited $receive_rc (both must be 0)"
fi
expect "$tmp/send.out" '^migration: completed .*0 pages.* verified yes$' "handover: the sender's statistics do not say completed, 0 pages, verified"
expect "$tmp/send.out" '^source: handed over' "handover: the sender did not say it handed the VM over"
expect "$tmp/receive.out" 'over the memory handed over' "handover: the receiver did not build over the shared memory"
expect "$tmp/receive.out" '^receive: check before resume: all 16384 of 16384 pages good' \
  "handover: the receiver did not check every page before resuming"
expect "$tmp/receive.out" \
  '^receive: after running 1\.0 s here: all 16384 of 16384 pages good, every vCPU advanced past the migration point$' \
  "handover: the receiver did not check every page after running on"
pass "same-host handover (C ABI): no page copied, every page checked before and after the resume ($(grep -m1 '^migration: completed' "$tmp/send.out" | cut -c1-90))"

# ---- 4d. snapshots through the C ABI ---------------------------------------
# The pkg-config build writes a live snapshot of its running guest
# (pmlmig_migrate_options.snapshot_to): the VM runs on there, every page
# checked. Fresh CMake-build processes restore it (pmlmig_restore_*), eagerly
# and lazily: the digests match and every page is checked after running on,
# every vCPU past the snapshot point. A file that is no snapshot is refused
# with a reason.

snap="$tmp/vm.snap"
snap_rc=0
timeout 120 "$pc_vmm" --snapshot "$snap" --live --after 500 --memory 64 --vcpus 2 \
  >"$tmp/send.out" 2>"$tmp/send.err" || snap_rc=$?
if [ "$snap_rc" -ne 0 ]; then
  show "$tmp/send.out" "$tmp/send.err"
  die "snapshot: minivmm --snapshot exited $snap_rc, not 0"
fi
expect "$tmp/send.out" '^migration: completed ' "snapshot: the statistics do not say completed"
expect "$tmp/send.out" "^source: snapshot written to $snap \\(live\\)$" "snapshot: minivmm did not report the file written"
expect "$tmp/send.out" '^source: the VM was kept and runs on here: all 16384 of 16384 pages good, every vCPU advanced$' \
  "snapshot: the VM does not run on at the source"
for mode in eager lazy; do
  restore_rc=0
  lazy=()
  [ "$mode" = lazy ] && lazy=(--lazy)
  timeout 120 "$cmake_vmm" --restore "$snap" "${lazy[@]}" --run-after 1 >"$tmp/receive.out" 2>"$tmp/receive.err" ||
    restore_rc=$?
  if [ "$restore_rc" -ne 0 ]; then
    show "$tmp/receive.out" "$tmp/receive.err"
    die "restore ($mode): minivmm --restore exited $restore_rc, not 0"
  fi
  expect "$tmp/receive.out" "^restore: $snap, $mode: running after .* digests match$" \
    "restore ($mode): the statistics do not say the digests matched"
  expect "$tmp/receive.out" \
    '^receive: after running 1\.0 s here: all 16384 of 16384 pages good, every vCPU advanced past the snapshot point$' \
    "restore ($mode): not every page was checked after running on"
done
foreign_rc=0
timeout 60 "$cmake_vmm" --restore "$tmp/send.out" >"$tmp/fail.out" 2>"$tmp/fail.err" || foreign_rc=$?
if [ "$foreign_rc" -ne 1 ] || ! grep -Eq "^minivmm: restoring $tmp/send.out: .+" "$tmp/fail.err"; then
  show "$tmp/fail.out" "$tmp/fail.err"
  die "restoring a file that is no snapshot exited $foreign_rc (not 1) or gave no reason"
fi
pass "snapshots (C ABI): a live snapshot, the VM running on; restored eagerly and lazily in fresh processes, every page checked after running on; a foreign file refused ($(grep -m1 '^minivmm: restoring' "$tmp/fail.err" | cut -c1-120))"

# ---- 5. a failure: nobody listens -----------------------------------------

# The receiver above has exited, so nothing listens on its port any more.
fail_rc=0
timeout 120 "$pc_vmm" --send "127.0.0.1:$port" --after 200 --memory 16 >"$tmp/fail.out" 2>"$tmp/fail.err" || fail_rc=$?
if [ "$fail_rc" -ne 1 ]; then
  show "$tmp/fail.out" "$tmp/fail.err"
  die "sending to a port nobody listens on exited $fail_rc, not 1"
fi
grep -Eq "^minivmm: migration to 127\.0\.0\.1:$port (failed|did not start): .+" "$tmp/fail.err" ||
  { show "$tmp/fail.out" "$tmp/fail.err"; die "the failed migration gave no reason"; }
grep -Eq '^source: the VM was kept and runs on here: all 4096 of 4096 pages good, every vCPU advanced$' \
  "$tmp/fail.out" || { show "$tmp/fail.out" "$tmp/fail.err"; die "the source VM was not shown running on after the failure"; }
pass "a migration to a closed port fails with a reason ($(grep -m1 '^minivmm: migration' "$tmp/fail.err" | cut -c1-100)) and the VM runs on"

echo "embed_test: PASS"
