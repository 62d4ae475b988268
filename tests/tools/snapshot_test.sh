#!/usr/bin/env bash
# Snapshots end to end (docs/ARCHITECTURE.md, "Snapshots", states what is
# promised):
#   - a live snapshot of a writing guest (pre-copy rounds into the file): the
#     VM runs on after it; restored in a fresh process eagerly and lazily,
#     each verified (the file's chunk digests) and checked (the test guest's
#     own check of every page), with the workload carrying on;
#   - a paused snapshot that stops the VM; an untouched guest's snapshot is a
#     small file, written fast;
#   - the control API: `pmlmig snapshot --control PATH --to FILE --live`;
#   - refusals, each naming the problem: a foreign file, a truncated file, a
#     corrupted data byte (eager: refused before the VM runs, naming the
#     range; lazy: reported once every page is in), a missing file;
#   - usage errors.
# Needs /dev/kvm (skips without).
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
fails=0
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 $p 2>/dev/null; done; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: snapshot tests need /dev/kvm"
  exit 0
fi
VM=(--memory 256M --vcpus 2 --workload random --tracker ring)
snap="$tmp/vm.snap"
j() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); exec(sys.argv[2])" "$@"; }

# 1. A live snapshot of a writing guest; the VM runs on.
"$PMLMIG" run "${VM[@]}" --snapshot-to "$snap" --live --migrate-after 500ms --duration 2s --json \
  >"$tmp/s.json" 2>"$tmp/s.err"
rc=$?
if [ $rc -eq 0 ] && j "$tmp/s.json" '
assert d["status"] == "completed", (d["status"], d["error"])
assert d["rounds"] >= 2, d["rounds"]
assert d["snapshot"]["live"] and d["snapshot"]["allocated_bytes"] > 0, d["snapshot"]
assert sum(v["pages_written_after_migration"] for v in d["vcpus"]) > 0, d["vcpus"]
print("   %d rounds, %.0f ms, paused %.1f ms, file %d MiB allocated" % (d["rounds"], d["total_time_ms"],
      d["downtime_ms"], d["snapshot"]["allocated_bytes"] >> 20))
'; then
  pass "live snapshot of a writing guest: completed, the VM ran on after it"
else
  fail "live snapshot: rc $rc: $(tail -c 600 "$tmp/s.err")"
fi

# restore MODE FLAGS...: a fresh process brings it back, runs it, checks it.
restore_ok() {
  local what=$1
  shift
  "$PMLMIG" restore "$snap" --exit-after 1s --json "$@" >"$tmp/r.json" 2>"$tmp/r.err"
  local rc=$?
  if [ $rc -eq 0 ] && j "$tmp/r.json" '
assert d["status"] == "completed" and d["verified"] is True, (d["status"], d["error"])
assert d["check"]["ok"] and d["check"]["pages_checked"] > 0, d["check"]
assert d["pages_written_after_resume"] > 0, d
print("   running after %.1f ms, all memory in after %.1f ms, %d faults" % (d["running_ms"], d["complete_ms"], d["faults"]))
'; then
    pass "$what restore: verified, every page checked, the workload carried on"
  else
    fail "$what restore: rc $rc: $(tail -c 600 "$tmp/r.err")"
  fi
}
restore_ok eager
restore_ok lazy --lazy
if j "$tmp/r.json" 'assert d["lazy"] and d["running_ms"] < d["complete_ms"], d' 2>/dev/null; then
  pass "lazy restore: the guest ran before its memory was all read"
else
  fail "lazy restore ordering: $(cat "$tmp/r.json")"
fi

# 2. A paused snapshot that stops the VM; an untouched guest's is small.
"$PMLMIG" run "${VM[@]}" --snapshot-to "$tmp/stop.snap" --snapshot-stop --migrate-after 300ms --json \
  >"$tmp/s.json" 2>"$tmp/s.err"
rc=$?
if [ $rc -eq 0 ] && j "$tmp/s.json" '
assert d["status"] == "completed" and d["rounds"] == 1 and not d["snapshot"]["live"], d
assert sum(v["pages_written_after_migration"] for v in d["vcpus"]) == 0, d["vcpus"]
'; then
  pass "paused snapshot with --snapshot-stop: one round, the VM stopped after it"
else
  fail "paused snapshot: rc $rc: $(tail -c 600 "$tmp/s.err")"
fi
"$PMLMIG" run --memory 1G --fill zero --workload idle --snapshot-to "$tmp/idle.snap" --migrate-after 100ms \
  --duration 300ms --json >"$tmp/s.json" 2>"$tmp/s.err"
rc=$?
if [ $rc -eq 0 ] && j "$tmp/s.json" '
assert d["status"] == "completed", d
assert d["snapshot"]["allocated_bytes"] < 8 << 20, d["snapshot"]
assert d["snapshot"]["file_bytes"] > 1 << 30, d["snapshot"]
print("   %.1f ms, %d KiB allocated of %d MiB" % (d["total_time_ms"], d["snapshot"]["allocated_bytes"] >> 10,
      d["snapshot"]["file_bytes"] >> 20))
'; then
  pass "untouched 1 GiB guest: a sparse file of a few MiB"
else
  fail "untouched snapshot: rc $rc: $(tail -c 600 "$tmp/s.err")"
fi

# snapshot --stop through the control API: the VM's process ends once the
# file is written, and the client still gets the outcome.
csock2="$tmp/vm2.sock"
"$PMLMIG" run --memory 64M --duration 0 --control "$csock2" -q >"$tmp/vm2.out" 2>"$tmp/vm2.err" &
vm2=$!
pids+=($vm2)
for _ in $(seq 100); do [ -S "$csock2" ] && break; sleep 0.1; done
"$PMLMIG" snapshot --control "$csock2" --to "$tmp/ctl2.snap" --stop --json >"$tmp/m2.out" 2>"$tmp/m2.err"
m_rc=$?
wait $vm2
vm_rc=$?
if [ $m_rc -eq 0 ] && [ $vm_rc -eq 0 ] && j "$tmp/m2.out" 'assert d["status"] == "completed", d' &&
  "$PMLMIG" restore "$tmp/ctl2.snap" --exit-after 200ms -q >/dev/null 2>"$tmp/r.err"; then
  pass "control API: snapshot --stop reports completed, the VM's process ends, the file restores"
else
  fail "control API: snapshot --stop rc $m_rc, run rc $vm_rc: $(cat "$tmp/m2.err") $(tail -c 300 "$tmp/vm2.err")"
fi

# A VM without an in-kernel irqchip: KVM refuses some MSR writes there even
# of their reset value (MSR_KVM_ASYNC_PF_INT); its snapshot still restores.
if "$PMLMIG" run --memory 16M --no-irqchip --snapshot-to "$tmp/noirq.snap" --migrate-after 200ms --duration 300ms \
  -q >/dev/null 2>"$tmp/s.err" &&
  "$PMLMIG" restore "$tmp/noirq.snap" --exit-after 300ms --json >"$tmp/r.json" 2>"$tmp/r.err" &&
  j "$tmp/r.json" 'assert d["verified"] is True and d["check"]["ok"], d'; then
  pass "a VM without an irqchip: snapshot, restore, verified and checked"
else
  fail "no-irqchip snapshot and restore: $(tail -c 400 "$tmp/s.err") $(tail -c 400 "$tmp/r.err")"
fi

# 3. The control API.
csock="$tmp/vm.sock"
"$PMLMIG" run "${VM[@]}" --duration 0 --control "$csock" -q >"$tmp/vm.out" 2>"$tmp/vm.err" &
vm=$!
pids+=($vm)
for _ in $(seq 100); do [ -S "$csock" ] && break; sleep 0.1; done
"$PMLMIG" snapshot --control "$csock" --to "$tmp/ctl.snap" --live >"$tmp/m.out" 2>"$tmp/m.err"
m_rc=$?
st=$("$PMLMIG" status --control "$csock" --json 2>/dev/null)
kill $vm 2>/dev/null
if [ $m_rc -eq 0 ] && echo "$st" | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["migration"] == "completed" and j["vm"] == "running", j' &&
  "$PMLMIG" restore "$tmp/ctl.snap" --exit-after 300ms -q >/dev/null 2>"$tmp/r.err"; then
  pass "control API: snapshot --live, completed, the VM runs on; the file restores"
else
  fail "control API: snapshot rc $m_rc: $(cat "$tmp/m.err") ${st:-} $(tail -c 300 "$tmp/r.err")"
fi

# A lazy restore whose file is cut short while the guest runs on it ends
# with the error (or, if every page was in first, completes); it never
# hangs with a vCPU waiting for a page nobody reads.
cp --sparse=always "$snap" "$tmp/cut.snap"
timeout 60 "$PMLMIG" restore "$tmp/cut.snap" --lazy --threads 1 --exit-after 500ms >"$tmp/c.out" 2>"$tmp/c.err" &
cut=$!
# Once the guest runs on it (the restore has opened the file and checked its size).
for _ in $(seq 200); do grep -q "running .* after the start" "$tmp/c.err" && break; sleep 0.05; done
truncate -s 64M "$tmp/cut.snap"
wait $cut
rc=$?
if { [ $rc -eq 1 ] && grep -q "short read at gpa" "$tmp/c.err"; } || [ $rc -eq 0 ]; then
  pass "lazy restore of a file cut short while it runs: rc $rc, no hang"
else
  fail "lazy restore of a file cut short: rc $rc (124: it hung): $(tail -c 400 "$tmp/c.err")"
fi

# 4. Refusals.
refused() {
  local what=$1 want=$2
  shift 2
  "$PMLMIG" restore "$@" --exit-after 200ms >"$tmp/x.out" 2>"$tmp/x.err"
  local rc=$?
  if [ $rc -eq 1 ] && grep -q -- "$want" "$tmp/x.err"; then
    pass "refused: $what ($(grep -m1 'error' "$tmp/x.err" | cut -c1-140))"
  else
    fail "refused: $what: rc $rc, $(cat "$tmp/x.err")"
  fi
}
cp /etc/os-release "$tmp/foreign.snap"
refused "a foreign file" "not a pmlmig snapshot" "$tmp/foreign.snap"
cp "$snap" "$tmp/short.snap"
truncate -s $(($(stat -c %s "$snap") / 2)) "$tmp/short.snap"
refused "a truncated file" "truncated" "$tmp/short.snap"
refused "a missing file" "No such file" "$tmp/none.snap"
# A flipped byte inside the data of the first region (4 MiB into the guest).
cp "$snap" "$tmp/bad.snap"
off=$(python3 - "$tmp/bad.snap" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb")
f.seek(4096)  # the layout: slot u32, reserved u32, gpa u64, size u64, file offset u64
slot, _, gpa, size, offset = struct.unpack("<IIQQQ", f.read(32))
print(offset + (4 << 20) + 123)
PY
)
printf '\xa5' | dd of="$tmp/bad.snap" bs=1 seek="$off" conv=notrunc status=none
refused "a corrupted byte, eager (before the VM runs)" "gpa 0x400000" "$tmp/bad.snap"
refused "a corrupted byte, lazy (once every page is in)" "gpa 0x400000" "$tmp/bad.snap" --lazy

# 5. Usage errors.
usage() {
  local what=$1 want=$2
  shift 2
  "$PMLMIG" "$@" >"$tmp/u.out" 2>"$tmp/u.err"
  local rc=$?
  if [ $rc -eq 2 ] && grep -q -- "$want" "$tmp/u.err"; then pass "usage: $what"; else fail "usage: $what: rc $rc, $(cat "$tmp/u.err")"; fi
}
usage "--live without --snapshot-to" "need --snapshot-to" run --memory 64M --live
usage "--snapshot-to with --migrate-to" "choose --migrate-to or --snapshot-to" run --memory 64M --snapshot-to "$tmp/a" --migrate-to 127.0.0.1:1
usage "--snapshot-to with --verify" "do not apply" run --memory 64M --snapshot-to "$tmp/a" --verify
usage "--snapshot-to with --postcopy" "do not apply" run --memory 64M --snapshot-to "$tmp/a" --postcopy now
usage "restore without a file" "file is required" restore

echo "snapshot tests: $fails failure(s)"
[ $fails -eq 0 ]
