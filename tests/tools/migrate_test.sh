#!/usr/bin/env bash
# Live migration between two pmlmig processes over loopback, end to end:
# `pmlmig receive` in the background, `pmlmig run --migrate-to` in front.
# Each case checks both sides' JSON: completed, verified (chunk digests; before
# commit also the checker on the target), and the workload still writing on
# the target.
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
fails=0
tmp=$(mktemp -d)
receiver=
trap '[ -n "$receiver" ] && kill $receiver 2>/dev/null; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: live migration tests need /dev/kvm"
  exit 0
fi

port=$((17000 + RANDOM % 2000))

# migrate "<name>" "<receiver flags>" <source args...>
migrate() {
  local name=$1 rflags=$2
  shift 2
  port=$((port + 1))
  # shellcheck disable=SC2086
  "$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 1s --wait 120s --json $rflags >"$tmp/r.json" 2>"$tmp/r.err" &
  receiver=$!
  sleep 0.3
  "$PMLMIG" run --migrate-to 127.0.0.1:$port --migrate-after 500ms --json "$@" >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  wait $receiver
  rcv_rc=$?
  receiver=
}

expect_completed() {
  local name=$1
  shift
  migrate "$name" "--verify" "$@" --verify
  if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && python3 - "$tmp/s.json" "$tmp/r.json" "$@" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
args = sys.argv[3:]
want_path = args[args.index("--data-path") + 1] if "--data-path" in args else "direct"
assert r["data_path"] == want_path, (want_path, r)
assert s["status"] == "completed" and s["verified"] is True, s
v = s["verification"]
assert v["verdict"] == "matched" and v["witness"] is True, v
for k in ("total_time_ms", "downtime_ms", "setup_time_ms", "rounds", "transferred_bytes", "normal_pages",
          "zero_pages", "throughput_mbps", "round_stats"):
    assert k in s, k
assert s["rounds"] >= 2 and s["transferred_bytes"] > 0
assert r["status"] == "completed" and r["resumed"] is True, r
if v["order"] == "before-commit":
    assert r["verified"] is True and r["verified_by"] == "target" and "checker" in r["verify_detail"], r
else:
    assert r["verified"] is None and r["verified_by"] == "source", r
assert r["pages_written_after_resume"] > 0, r
print("   %d rounds, %.0f ms total, downtime %.1f ms, %.0f Mbit/s; target: %s" % (
    s["rounds"], s["total_time_ms"], s["downtime_ms"], s["throughput_mbps"], v["order"] + ", " + v["detail"] +
    ", " + r["data_path"] + " data"))
PY
  then pass "$name"; else fail "$name (source rc $src_rc, receiver rc $rcv_rc): $(tail -c 600 "$tmp/s.json" "$tmp/s.err" "$tmp/r.json" "$tmp/r.err")"; fi
}

expect_completed "random, 1 vCPU, ring, 1 stream, verified before commit" \
  --memory 256M --vcpus 1 --workload random --tracker ring --streams 1 --verify-order before-commit
expect_completed "random, 1 vCPU, ring, 2 streams, gRPC Pages calls (--data-path grpc)" \
  --memory 256M --vcpus 1 --workload random --tracker ring --streams 2 --data-path grpc
expect_completed "hotset, 2 vCPUs, bitmap, 4 streams, lz4" \
  --memory 256M --vcpus 2 --workload hotset:fraction=0.05,share=0.9 --tracker bitmap --streams 4 --compress lz4
expect_completed "random (rate-limited), 2 vCPUs, ring, 4 streams, zstd" \
  --memory 256M --vcpus 2 --workload random:rate=10000 --tracker ring --streams 4 --compress zstd
expect_completed "hotset, 1 vCPU, bitmap-clear, 2 streams, zero fill, verified before commit" \
  --memory 512M --vcpus 1 --workload hotset:fraction=0.1,share=0.8 --tracker bitmap-clear --streams 2 --fill zero \
  --verify-order before-commit
# Per-vCPU workloads travel in the VM description (version 2); the target's checker knows each vCPU's own.
expect_completed "per-vCPU workloads, 3 vCPUs, ring, 2 streams, verified before commit" \
  --memory 256M --vcpus 3 --workload hotset:fraction=0.05,share=0.9 --vcpu-workload 2=random:rate=1000 \
  --vcpu-workload 0=seq:fraction=0.5 --tracker ring --streams 2 --verify-order before-commit
if grep -qF "workload hotset:fraction=0.05,share=0.9 (vcpu 0: seq:fraction=0.5, vcpu 2: random:rate=1000)" "$tmp/r.err" &&
   python3 -c "import json,sys; j=json.load(open('$tmp/s.json')); assert j['vcpu_workloads']=={'0':'seq:fraction=0.5','2':'random:rate=1000'}, j"
then pass "the target built the per-vCPU workloads"; else fail "per-vCPU workloads on the target: $(cat "$tmp/r.err" | head -5)"; fi
expect_completed "3.5 GiB guest across the PCI hole, hotset, ring, 2 streams" \
  --memory 3584M --vcpus 1 --workload hotset:fraction=0.01,share=0.9 --tracker ring --streams 2

# A guest that dirties faster than the link carries: cancelled, not converging, the VM kept running.
migrate "not converging" "--attempts 1" --memory 256M --vcpus 1 --workload random --fill zero --max-bandwidth 40M --timeout 4s --on-timeout cancel
if [ $src_rc -eq 1 ] && python3 - "$tmp/s.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "cancelled", s
assert "not converging" in s["error"], s["error"]
assert s["vcpus"][0]["pages_written_during_migration"] > 0
PY
then pass "not converging: cancelled, the VM kept running"; else fail "not converging (rc $src_rc): $(tail -c 600 "$tmp/s.json" "$tmp/s.err")"; fi
if [ $rcv_rc -ne 0 ] && grep -q '"status":"cancelled"' "$tmp/r.json"; then pass "receiver discarded the aborted VM"; else fail "receiver after abort (rc $rcv_rc): $(cat "$tmp/r.json" "$tmp/r.err")"; fi

# The control API: a running VM driven by 'pmlmig status/cancel/migrate'.
sock="$tmp/vm.sock"
"$PMLMIG" run --memory 256M --workload hotset:fraction=0.05,share=0.9 --duration 0 --control "$sock" --json \
  >"$tmp/c.json" 2>"$tmp/c.err" &
vmpid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
if [ "$(stat -c %a "$sock" 2>/dev/null)" = "600" ]; then pass "control socket mode 0600"; else fail "control socket mode: $(stat -c %a "$sock" 2>&1)"; fi
if "$PMLMIG" status --control "$sock" --json | python3 -c "import json,sys; j=json.load(sys.stdin); assert j['vm']=='running' and j['migration']=='none', j"
then pass "status of a controlled VM"; else fail "status"; fi
"$PMLMIG" cancel --control "$sock" >/dev/null 2>"$tmp/e"
if [ $? -eq 1 ] && grep -q "no migration in progress" "$tmp/e"; then pass "cancel without a migration"; else fail "cancel: $(cat "$tmp/e")"; fi
port=$((port + 1))
"$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 1s --wait 60s --json >"$tmp/r.json" 2>"$tmp/r.err" &
receiver=$!
sleep 0.3
if "$PMLMIG" migrate --control "$sock" --to 127.0.0.1:$port --verify --json >"$tmp/m.json" 2>"$tmp/m.err" &&
   wait $receiver && python3 - "$tmp/m.json" "$tmp/r.json" <<'PY2'
import json, sys
m = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
assert m["status"] == "completed" and m["verified"] is True, m
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
PY2
then pass "migrate through the control API"; else fail "control migrate: $(cat "$tmp/m.json" "$tmp/m.err" "$tmp/r.err")"; fi
receiver=
wait $vmpid
if [ $? -eq 0 ] && [ ! -e "$sock" ]; then pass "controlled VM exits after migrating, socket removed"; else fail "controlled VM exit: $(tail -3 "$tmp/c.err")"; fi

# Ctrl-C of the source mid-migration: cancelled, the VM ran on here, exit 130.
port=$((port + 1))
"$PMLMIG" receive --listen 127.0.0.1:$port --wait 60s --attempts 1 >/dev/null 2>"$tmp/r.err" &
receiver=$!
sleep 0.3
"$PMLMIG" run --memory 128M --duration 30s --migrate-after 200ms --migrate-to 127.0.0.1:$port --max-bandwidth 10M \
  --json >"$tmp/int.json" 2>"$tmp/int.err" &
src=$!
sleep 2
kill -INT $src
wait $src
rc=$?
wait $receiver
receiver=
if [ $rc -eq 130 ] && grep -q "cancelled by Ctrl-C" "$tmp/int.err" && python3 -c "
import json; j = json.load(open('$tmp/int.json')); assert j['status'] == 'cancelled', j['status']"; then
  pass "Ctrl-C mid-migration: cancelled, exit 130"
else
  fail "Ctrl-C mid-migration: rc $rc: $(tail -c 400 "$tmp/int.err")"
fi
for flag in --migrate-to --snapshot-to; do
  "$PMLMIG" run $flag "" >"$tmp/o" 2>"$tmp/e"
  if [ $? -eq 2 ] && grep -q "must not be empty" "$tmp/e"; then pass "usage error: $flag ''"; else fail "$flag '': $(cat "$tmp/e")"; fi
done

# Bad migration flags are usage errors.
for args in "--streams 0" "--streams 65" "--compress brotli" "--on-timeout maybe" "--max-bandwidth fast"; do
  # shellcheck disable=SC2086
  "$PMLMIG" run --migrate-to 127.0.0.1:1 $args >"$tmp/o" 2>"$tmp/e"
  rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <"$tmp/e")" -eq 1 ]; then pass "usage error: $args"; else fail "usage error: $args (rc $rc): $(cat "$tmp/e")"; fi
done
for args in "--to 127.0.0.1" "--to 127.0.0.1:0" "--to 127.0.0.1:1 --streams 65"; do
  # shellcheck disable=SC2086
  "$PMLMIG" migrate --control "$tmp/none.sock" $args >"$tmp/o" 2>"$tmp/e"
  rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <"$tmp/e")" -eq 1 ]; then pass "usage error: migrate $args"; else fail "usage error: migrate $args (rc $rc): $(cat "$tmp/e")"; fi
done
"$PMLMIG" run --memory 64M --migrate-to 127.0.0.1:1 --migrate-after 100ms >"$tmp/o" 2>"$tmp/e"
if [ $? -eq 1 ] && grep -q "error" "$tmp/e"; then pass "no receiver: clear failure"; else fail "no receiver: $(cat "$tmp/e")"; fi

echo "migrate_test: $fails failure(s)"
exit $((fails > 0))
