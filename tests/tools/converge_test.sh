#!/usr/bin/env bash
# Migrations that finish under a busy guest, end to end between two pmlmig
# processes over loopback with --max-bandwidth: a guest whose two vCPUs
# dirty a hot set faster than 40 MB/s carries
#   - without an aid: cancelled as "not converging" after a few rounds, long
#     before --max-rounds, the VM running on here;
#   - with --auto-converge and with --dirty-limit auto: completed, verified,
#     throttle steps taken, the workload running on at the target;
#   - through the control API with --dirty-limit: status shows per-vCPU rates
#     and the quota while it runs;
#   - bad combinations: usage errors.
# Needs /dev/kvm (skips without).
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
fails=0
tmp=$(mktemp -d)
receiver=
vmpid=
trap '[ -n "$receiver" ] && kill $receiver 2>/dev/null; [ -n "$vmpid" ] && kill $vmpid 2>/dev/null; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: convergence tests need /dev/kvm"
  exit 0
fi
port=$((27000 + RANDOM % 2000))
# 128 MiB, 2 vCPUs, 8 MiB hot per vCPU: together they dirty more than the
# 40 MB/s (10k pages/s) link carries.
VM=(--memory 128M --vcpus 2 --workload hotset:fraction=0.125,share=0.95 --tracker ring)
GUEST=("${VM[@]}" --max-bandwidth 40M)

# migrate <source args...>: one migration; sets src_rc, rcv_rc.
migrate() {
  port=$((port + 1))
  "$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 1s --wait 120s --attempts 1 --json >"$tmp/r.json" 2>"$tmp/r.err" &
  receiver=$!
  sleep 0.3
  "$PMLMIG" run --migrate-to 127.0.0.1:$port --migrate-after 500ms --linger 500ms --json "$@" \
    >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  wait $receiver
  rcv_rc=$?
  receiver=
}
show() { echo "source rc $src_rc, receiver rc $rcv_rc: $(tail -c 700 "$tmp/s.err") | $(tail -c 300 "$tmp/r.err")"; }

migrate "${GUEST[@]}" --verify
if [ $src_rc -eq 1 ] && python3 - "$tmp/s.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "cancelled", s["status"]
assert "not converging" in s["error"] and "has not shrunk" in s["error"], s["error"]
assert "--dirty-limit auto or --auto-converge" in s["error"], s["error"]
assert s["rounds"] <= 20, s["rounds"]  # --max-rounds is 50: seen early
assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) > 0, "VM not running here after the cancel"
rates = s["throttle"]["vcpus"]
assert s["throttle"]["per_vcpu_rates"] and len(rates) == 2 and all(v["dirty_pages"] > 0 for v in rates), rates
print("   cancelled after %d rounds, %.1f s" % (s["rounds"], s["total_time_ms"] / 1000))
PY
then pass "no aid: not converging, seen early, the VM runs on here"; else fail "no aid: $(show)"; fi

# completed_with <aid name>: the migration completed, verified, with steps.
completed_with() {
  [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && python3 - "$tmp/s.json" "$tmp/r.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2])); aid = sys.argv[3]
assert s["status"] == "completed" and s["verified"] is True, (s["status"], s["error"])
t = s["throttle"]
assert t["aid"] == aid and t["steps"] >= 1, t
if aid == "auto-converge":
    assert t["max_pct"] >= 20 and all(v["holds"] > 0 for v in t["vcpus"]), t
    assert any(r["throttle_pct"] > 0 for r in s["round_stats"]), s["round_stats"]
else:
    assert t["final_quota_pages_per_s"] > 0 and any(v["held_ms"] > 0 for v in t["vcpus"]), t
    assert any(r["vcpu_quota_pages_per_s"] > 0 for r in s["round_stats"]), s["round_stats"]
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
print("   %d rounds, %.1f s, downtime %.0f ms, %d steps" % (s["rounds"], s["total_time_ms"] / 1000,
                                                         s["downtime_ms"], t["steps"]))
PY
}

migrate "${GUEST[@]}" --verify --auto-converge
if completed_with auto-converge; then pass "auto-converge: completed, verified"; else fail "auto-converge: $(show)"; fi

migrate "${GUEST[@]}" --verify --dirty-limit auto
if completed_with dirty-limit; then pass "dirty-limit auto: completed, verified"; else fail "dirty-limit auto: $(show)"; fi

# The control API: a given quota, per-vCPU rates in status while it runs.
sock="$tmp/vm.sock"
"$PMLMIG" run "${VM[@]}" --duration 0 --control "$sock" --json >"$tmp/c.json" 2>"$tmp/c.err" &
vmpid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
port=$((port + 1))
"$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 1s --wait 120s --attempts 1 --json >"$tmp/r.json" 2>"$tmp/r.err" &
receiver=$!
sleep 0.3
"$PMLMIG" migrate --control "$sock" --to 127.0.0.1:$port --max-bandwidth 40M --dirty-limit 16M --verify --json \
  >"$tmp/m.json" 2>"$tmp/m.err" &
mig=$!
seen=0
for _ in $(seq 100); do
  sleep 0.2
  "$PMLMIG" status --control "$sock" --json >"$tmp/st.json" 2>/dev/null || continue
  if python3 - "$tmp/st.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["migration"] == "active" and len(j["vcpus"]) == 2 and j["vcpu_quota_pages_per_s"] == 4096, j
assert any(v["dirty_pages_per_s"] > 0 for v in j["vcpus"]), j
PY
  then seen=1; break; fi
done
wait $mig
m_rc=$?
wait $receiver
rcv_rc=$?
receiver=
wait $vmpid
vmpid=
if [ $seen -eq 1 ]; then pass "control status: per-vCPU rates and the quota while migrating"; else fail "control status: $(cat "$tmp/st.json")"; fi
if [ $m_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && python3 - "$tmp/m.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "completed" and m["verified"] is True, m
assert m["throttle"]["aid"] == "dirty-limit" and m["throttle"]["final_quota_pages_per_s"] == 4096, m["throttle"]
PY
then pass "control migrate with --dirty-limit 16M: completed, verified"; else fail "control migrate: $(tail -c 600 "$tmp/m.json" "$tmp/m.err")"; fi

# Usage errors, before anything starts.
usage() {  # usage "<what the error says>" <run args...>
  local want=$1
  shift
  "$PMLMIG" run --memory 64M --migrate-to 127.0.0.1:1 "$@" >/dev/null 2>"$tmp/u.err"
  local rc=$?
  if [ $rc -eq 2 ] && grep -q -- "$want" "$tmp/u.err"; then pass "usage: $want"; else fail "usage '$want' (rc $rc): $(cat "$tmp/u.err")"; fi
}
usage "exclude each other" --tracker ring --dirty-limit auto --auto-converge
usage "needs --tracker ring" --tracker bitmap --dirty-limit auto
usage "less than one page" --tracker ring --dirty-limit 100
usage "--dirty-limit" --tracker ring --dirty-limit fast

echo "converge_test: $fails failure(s)"
[ $fails -eq 0 ]
