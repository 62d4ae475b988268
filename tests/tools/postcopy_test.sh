#!/usr/bin/env bash
# Post-copy end to end between two pmlmig processes (docs/ARCHITECTURE.md,
# "Post-copy", states what is promised):
#   - --postcopy now (pure post-copy) and --postcopy auto (a guest that does
#     not converge at 40 MB/s): completed, verified against the source's
#     digests at the pause, page requests answered, the workload running on
#     at the target, a downtime far under the pre-copy one;
#   - the control API: `migrate --postcopy now`, status in phase postcopy;
#   - the target killed in post-copy (fail point receiver.postcopy): the
#     source finds its port refusing connections (no resume can come), reports
#     post-copy failed, exit 5, and keeps its paused copy (no vCPU ran after
#     the switch) until SIGTERM;
#   - the source killed in post-copy (fail point source.postcopy): the target
#     waits its recovery window (--postcopy-recovery 3s), then reports the
#     pages still missing and discards the VM (exit 1);
#   - between two network namespaces:
#     - the link cut for 3 s in post-copy is ridden out (TCP and the
#       keepalive survive it; the vCPUs wait) and the migration completes,
#       verified;
#     - cut for 20 s, longer than the keepalive: both sides see the link
#       break, the target's VM runs on, the source reconnects once the link
#       is back and resumes (proto PostcopyResume), and the migration
#       completes, verified, with the workload going on at the target;
#     - cut for 20 s with recovery windows shorter than the cut: both sides
#       report the failure (the target discards, the source keeps its paused
#       copy);
#   - usage errors.
# Needs /dev/kvm (skips without); the namespace cases need root and ip netns.
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
fails=0
tmp=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 $p 2>/dev/null; done; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: post-copy tests need /dev/kvm"
  exit 0
fi
port=$((29000 + RANDOM % 2000))
VM=(--memory 128M --vcpus 2 --workload hotset:fraction=0.125,share=0.95 --tracker ring)

# receiver [env...]: `pmlmig receive` on the next loopback port, one migration
# (with the flags in RECEIVE_FLAGS).
RECEIVE_FLAGS=()
receiver() {
  port=$((port + 1))
  env "$@" "$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 1s --wait 120s --attempts 1 --json \
    "${RECEIVE_FLAGS[@]}" \
    >"$tmp/r.json" 2>"$tmp/r.err" &
  rpid=$!
  pids+=($rpid)
  sleep 0.3
}
show() { echo "source rc ${src_rc:-}, receiver rc ${rcv_rc:-}: $(tail -c 600 "$tmp/s.err") | $(tail -c 400 "$tmp/r.err")"; }

# check <python assertions on s (source JSON) and r (receiver JSON)>
check() {
  python3 - "$tmp/s.json" "$tmp/r.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = json.load(open(sys.argv[2]))
exec(sys.argv[3])
PY
}

completed='
assert s["status"] == "completed" and s["verified"] is True, (s["status"], s["error"], s["verification"])
p = s["postcopy"]
assert p["used"] and p["owed_pages"] > 0, p
assert p["requests"] > 0 and p["requested_pages"] + p["background_pages"] == p["owed_pages"], p
assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p99"] <= p["latency_ms"]["max"], p
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
print("   %s: %d rounds, %.1f s, downtime %.1f ms, %d owed, %d requests (p50 %.2f ms, p99 %.2f ms)" % (
    p["mode"], s["rounds"], s["total_time_ms"] / 1000, s["downtime_ms"], p["owed_pages"], p["requests"],
    p["latency_ms"]["p50"], p["latency_ms"]["p99"]))
'

# 1. Pure post-copy.
receiver
"$PMLMIG" run "${VM[@]}" --migrate-to 127.0.0.1:$port --migrate-after 500ms --linger 300ms --postcopy now --verify \
  --json >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check "$completed
assert p[\"mode\"] == \"now\" and s[\"rounds\"] == 1, s[\"rounds\"]
assert s[\"downtime_ms\"] < 300, s[\"downtime_ms\"]"; then
  pass "--postcopy now: completed, verified, the workload runs on at the target"
else
  fail "--postcopy now: $(show)"
fi

# 2. Pre-copy that does not converge at 40 MB/s, then post-copy. One stream, so the
# receiver populates round 0's memory ahead (populate_ahead.h) and must stop that
# before it registers the memory for post-copy.
receiver
"$PMLMIG" run "${VM[@]}" --max-bandwidth 40M --migrate-to 127.0.0.1:$port --migrate-after 500ms --linger 300ms \
  --streams 1 --postcopy auto --verify --json >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check "$completed
assert p[\"mode\"] == \"auto\" and 2 <= s[\"rounds\"] <= 12, s[\"rounds\"]
assert s[\"downtime_ms\"] < 300, s[\"downtime_ms\"]"; then
  pass "--postcopy auto: switched once the rounds did not converge; completed, verified"
else
  fail "--postcopy auto: $(show)"
fi

# 3. The control API.
sock="$tmp/vm.sock"
"$PMLMIG" run "${VM[@]}" --duration 0 --control "$sock" -q >"$tmp/vm.out" 2>"$tmp/vm.err" &
vm=$!
pids+=($vm)
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
receiver
"$PMLMIG" migrate --control "$sock" --to 127.0.0.1:$port --postcopy now --max-bandwidth 20M --verify \
  >"$tmp/m.out" 2>"$tmp/m.err"
m_rc=$?
# `migrate` follows the migration to its end, printing the VM's status.
seen=
grep -q "postcopy .*requests answered" "$tmp/m.err" && seen=1
st=$("$PMLMIG" status --control "$sock" --json 2>/dev/null)
wait $rpid
rcv_rc=$?
if [ $m_rc -eq 0 ] && [ -n "$seen" ] && [ $rcv_rc -eq 0 ] && echo "$st" | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["migration"] == "completed" and j["vm"] == "migrated", j' && python3 - "$tmp/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
PY
then
  pass "control API: migrate --postcopy now, progress in phase postcopy, completed; the VM runs at the target"
else
  fail "control API: migrate rc $m_rc, postcopy seen '${seen}', receiver rc $rcv_rc: $(cat "$tmp/m.err") ${st:-}"
fi
kill $vm 2>/dev/null
wait $vm 2>/dev/null

# 4. The target killed in post-copy: the source keeps its paused copy.
receiver PMLMIG_FAILPOINTS=receiver.postcopy=20
"$PMLMIG" run "${VM[@]}" --max-bandwidth 20M --migrate-to 127.0.0.1:$port --migrate-after 500ms --postcopy now \
  --verify --json >"$tmp/s.json" 2>"$tmp/s.err" &
spid=$!
pids+=($spid)
for _ in $(seq 120); do grep -q "POST-COPY FAILED" "$tmp/s.err" && break; sleep 0.25; done
sleep 0.5  # a copy that wrongly ran on would write in this time
kill -TERM $spid
wait $spid
src_rc=$?
wait $rpid
rcv_rc=$?
echo '{}' >"$tmp/r.json"  # killed: it wrote none
if [ $src_rc -eq 5 ] && [ $rcv_rc -eq 137 ] && check '
assert s["status"] == "postcopy-failed", s["status"]
assert "post-copy failed after the switch" in s["error"] and "stays paused" in s["error"], s["error"]
assert all(v["pages_written_after_migration"] == 0 for v in s["vcpus"]), s["vcpus"]
# What went out before the break is reported, and what never did.
assert s["transferred_bytes"] > 0, s["transferred_bytes"]
pc = s["postcopy"]
assert pc["requests_served"] + pc["background_pages"] > 0 and pc["pages_never_sent"] > 0, pc' 2>"$tmp/py.err"; then
  pass "target killed in post-copy: the source says so (exit 5), its copy stayed paused, what was sent is reported"
else
  fail "target killed in post-copy: $(show) $(cat "$tmp/py.err")"
fi

# 5. The source killed in post-copy: the target discards the VM once its
# recovery window has passed.
RECEIVE_FLAGS=(--postcopy-recovery 3s)
receiver
RECEIVE_FLAGS=()
# In a subshell that outlives it, so the shell does not print "Killed".
(
  PMLMIG_FAILPOINTS=source.postcopy=20 "$PMLMIG" run "${VM[@]}" --max-bandwidth 20M --migrate-to 127.0.0.1:$port \
    --migrate-after 500ms --postcopy now --json >"$tmp/s.json" 2>"$tmp/s.err"
  rc=$?
  exit $rc
) 2>/dev/null
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 137 ] && [ $rcv_rc -eq 1 ] && python3 - "$tmp/r.json" <<'PY' 2>"$tmp/py.err"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "failed", r["status"]
assert "post-copy" in r["error"] and "still missing" in r["error"] and "discarded" in r["error"], r["error"]
assert "did not resume within 3000 ms" in r["error"], r["error"]
PY
then
  pass "source killed in post-copy: after its 3 s recovery window the target names the missing pages and discards the VM"
else
  fail "source killed in post-copy: $(show) $(cat "$tmp/py.err")"
fi

# 6. Usage errors.
usage() {
  "$PMLMIG" run "${VM[@]}" --migrate-to 127.0.0.1:1 "$@" >/dev/null 2>"$tmp/u.err"
  local rc=$?
  if [ $rc -eq 2 ] && grep -q -- "--postcopy" "$tmp/u.err"; then
    pass "usage: $* ($(head -c 90 "$tmp/u.err"))"
  else
    fail "usage: $*: rc $rc: $(cat "$tmp/u.err")"
  fi
}
usage --postcopy sometimes
usage --postcopy now --auto-converge
usage --postcopy auto --verify --verify-order before-commit

# 7. A cut link, between two namespaces.
# shellcheck source=scripts/netns.sh
. "$ROOT/scripts/netns.sh"
if ! netns_usable; then
  echo "SKIP: link cuts: $netns_reason"
else
  unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY grpc_proxy all_proxy ALL_PROXY
  netns_create || { echo "FAIL: cannot create the namespaces"; exit 1; }
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/token" && chmod 600 "$tmp/token"
  # cut <seconds> <receiver window> <source window>: a pure post-copy at
  # 20 MB/s (about 6 s), the link down for <seconds> two seconds in.
  cut_no=0
  cut() {
    local secs=$1
    cut_no=$((cut_no + 1))
    local p=$((port + 100 + cut_no))
    netns_spawn dst timeout -s KILL 100 "$PMLMIG" receive --listen "$NETNS_DST_ADDR:$p" --token-file "$tmp/token" \
      --exit-after 500ms --wait 90s --attempts 1 --postcopy-recovery "$2" --json >"$tmp/r.json" 2>"$tmp/r.err"
    rpid=$netns_pid
    for _ in $(seq 100); do grep -q "listening on" "$tmp/r.err" && break; sleep 0.05; done
    netns_spawn src timeout -s KILL 100 "$PMLMIG" run "${VM[@]}" --max-bandwidth 20M --token-file "$tmp/token" \
      --migrate-to "$NETNS_DST_ADDR:$p" --migrate-after 500ms --linger 300ms --postcopy now --verify --json \
      --postcopy-recovery "$3" >"$tmp/s.json" 2>"$tmp/s.err"
    spid=$netns_pid
    for _ in $(seq 100); do grep -q "postcopy " "$tmp/s.err" && break; sleep 0.05; done
    sleep 1.5
    ip -n "$NETNS_SRC" link set "$NETNS_SRC_IF" down
    sleep "$secs"
    ip -n "$NETNS_SRC" link set "$NETNS_SRC_IF" up
  }
  cut 3 10m 5m
  wait $rpid
  rcv_rc=$?
  wait $spid
  src_rc=$?
  if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check "$completed" 2>"$tmp/py.err"; then
    pass "link cut for 3 s in post-copy: ridden out; completed, verified"
  else
    fail "link cut for 3 s: $(show) $(cat "$tmp/py.err")"
  fi
  cut 20 10m 5m
  wait $rpid
  rcv_rc=$?
  wait $spid
  src_rc=$?
  if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check "$completed"'
assert s["postcopy"]["recoveries"] >= 1 and s["postcopy"]["link_down_ms"] > 1000, s["postcopy"]
assert r["postcopy_recoveries"] >= 1, r' 2>"$tmp/py.err"; then
    pass "link cut for 20 s in post-copy: resumed once the link was back; completed, verified, workload going on"
  else
    fail "link cut for 20 s, recovery: $(show) $(cat "$tmp/py.err")"
  fi
  cut 20 6s 3s
  wait $rpid
  rcv_rc=$?
  for _ in $(seq 120); do grep -q "POST-COPY FAILED" "$tmp/s.err" && break; sleep 0.25; done
  kill -TERM $spid 2>/dev/null
  wait $spid
  src_rc=$?
  if [ $src_rc -eq 5 ] && [ $rcv_rc -eq 1 ] && check '
assert s["status"] == "postcopy-failed" and "stays paused" in s["error"], s["error"]
assert "could not be resumed within 3 s" in s["error"], s["error"]
assert all(v["pages_written_after_migration"] == 0 for v in s["vcpus"]), s["vcpus"]
assert r["status"] == "failed" and "still missing" in r["error"] and "discarded" in r["error"], r["error"]
assert "did not resume within 6000 ms" in r["error"], r["error"]' 2>"$tmp/py.err"; then
    pass "link cut for 20 s, windows 6 s / 3 s: both sides report it; the target discards, the source keeps its copy"
  else
    fail "link cut for 20 s, windows passed: $(show) $(cat "$tmp/py.err")"
  fi
  netns_teardown
fi

if [ $fails -ne 0 ]; then
  echo "$fails post-copy test(s) failed"
  exit 1
fi
echo "all post-copy tests passed"
