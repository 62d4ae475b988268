#!/usr/bin/env bash
# Live migrations that fail in flight: `pmlmig run` (or a VM under `pmlmig run
# --control` driven by `pmlmig migrate`) sends to a fresh `pmlmig receive`
# through $FAULT_PROXY, which cuts, stalls or corrupts the traffic once. Each
# case checks that the source reports the failure clearly and keeps its VM
# running, that the receiver discards what it got, and (control API) that the
# same VM then migrates again, verified: to a fresh receiver directly, or through
# the same proxy to the same receiver, which waits on after a failed attempt.
#
# Building blocks for more cases (each takes the fault as the proxy does:
# <fault> <after> <direction>, see fault_proxy --help):
#   through_proxy <name> <fault> <after> <dir> <run args...>
#       pmlmig run --migrate-to <proxy> <run args...>: $src_rc, $src_ms, $tmp/s.json
#   vm_start <run args...>                     a controlled VM: $vm, $sock
#   migrate_through_proxy <name> <fault> <after> <dir> <migrate args...>
#       pmlmig migrate --control $sock --to <proxy>: $mig_rc, $mig_ms, $tmp/m.json
#   (both use a receiver with --attempts 1 and leave $rcv_rc, $tmp/r.json
#   (receiver) and $tmp/p.log (proxy)); or, step by step:
#   open_path <fault> <after> <dir> [receive flags...]   receiver + proxy: $rport, $pport
#   migrate_to <name> <HOST:PORT> <migrate args...>      one pmlmig migrate: $mig_rc, $mig_ms
#   close_path <name>                                    receiver's report ($rcv_rc), proxy stopped
#   expect_source_failed <name> <json> <error regex>
#   expect_receiver_discarded <name>
#   expect_vm_running <name>
#   retry_direct <name> <migrate args...>      the controlled VM to a fresh receiver, verified
#   vm_finish <name>                           the controlled VM exits 0 after migrating away
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
FAULT_PROXY=${FAULT_PROXY:-build/tests/fault_proxy}
# A migration command running longer than this is a hang: killed, and a failure.
HANG_S=${HANG_S:-90}
fails=0
tmp=$(mktemp -d)
receiver='' proxy='' vm=''
sock=$tmp/vm.sock
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  local p
  for p in $receiver $proxy $vm; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: live migration fault tests need /dev/kvm"
  exit 0
fi
if [ ! -x "$FAULT_PROXY" ]; then
  echo "FAIL: FAULT_PROXY=$FAULT_PROXY is not an executable"
  exit 1
fi

now_ms() { date +%s%3N; }

# reap <pid> <seconds>: waits for a child, killing it after <seconds>; sets reaped_rc (137 when killed).
reap() {
  local pid=$1 i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
  kill -9 "$pid" 2>/dev/null
  wait "$pid"
  reaped_rc=$?
}

# Everything a failed check prints: the tail of each file named.
detail() {
  local f
  for f in "$@"; do [ -s "$f" ] && printf '\n  --- %s: %s' "${f##*/}" "$(tail -c 700 "$f")"; done
}

# start_receiver [receive flags...]: a fresh receiver on a free loopback port: $receiver, $rport.
start_receiver() {
  rport=
  rm -f "$tmp/r.json" "$tmp/r.err"  # not the last receiver's port: the new one may not have opened it yet
  "$PMLMIG" receive --listen 127.0.0.1:0 --exit-after 1s --wait 20s --json "$@" >"$tmp/r.json" 2>"$tmp/r.err" &
  receiver=$!
  for _ in $(seq 100); do
    rport=$(sed -n 's/.*listening on .* (port \([0-9]*\)).*/\1/p' "$tmp/r.err")
    [ -n "$rport" ] && return 0
    sleep 0.05
  done
  echo "receiver did not start: $(cat "$tmp/r.err")"
  return 1
}

# stop_receiver: waits for the receiver to report (it must not hang either): $rcv_rc.
stop_receiver() {
  reap "$receiver" 60
  rcv_rc=$reaped_rc
  receiver=
}

# start_proxy <fault> <after> <direction>: the proxy in front of $rport: $proxy, $pport.
start_proxy() {
  rm -f "$tmp/p.port" "$tmp/p.log"
  "$FAULT_PROXY" --listen 127.0.0.1:0 --upstream "127.0.0.1:$rport" --fault "$1" --after "$2" --direction "$3" \
    --port-file "$tmp/p.port" --log "$tmp/p.log" 2>"$tmp/p.err" &
  proxy=$!
  for _ in $(seq 100); do
    [ -s "$tmp/p.port" ] && pport=$(cat "$tmp/p.port") && return 0
    sleep 0.05
  done
  echo "proxy did not start: $(cat "$tmp/p.err")"
  return 1
}

stop_proxy() {
  kill -TERM "$proxy" 2>/dev/null
  reap "$proxy" 5
  [ "$reaped_rc" -eq 0 ] || fail "$1: fault_proxy exit $reaped_rc on SIGTERM: $(cat "$tmp/p.err")"
  proxy=
}

# open_path <fault> <after> <direction> [receive flags...]: a fresh receiver behind a fresh proxy.
open_path() {
  local fault=$1 after=$2 dir=$3
  shift 3
  start_receiver "$@" && start_proxy "$fault" "$after" "$dir"
}

# close_path <name>: the receiver's report ($rcv_rc, $tmp/r.json); the proxy stopped.
close_path() {
  stop_receiver
  stop_proxy "$1"
}

# through_proxy <name> <fault> <after> <direction> <pmlmig run args...>
through_proxy() {
  local name=$1 fault=$2 after=$3 dir=$4 t0
  shift 4
  : >"$tmp/s.json"
  if ! open_path "$fault" "$after" "$dir" --attempts 1; then fail "$name: setup"; return 1; fi
  t0=$(now_ms)
  timeout -s KILL "$HANG_S" "$PMLMIG" run --migrate-to "127.0.0.1:$pport" --migrate-after 500ms --linger 500ms \
    --json "$@" >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  src_ms=$(($(now_ms) - t0))
  [ $src_rc -eq 137 ] && fail "$name: pmlmig run hung (killed after ${HANG_S}s): $(tail -3 "$tmp/s.err")"
  close_path "$name"
}

# vm_start <pmlmig run args...>: a VM under the control API, running until it migrates away.
vm_start() {
  rm -f "$sock"
  "$PMLMIG" run --duration 0 --control "$sock" --json "$@" >"$tmp/c.json" 2>"$tmp/c.err" &
  vm=$!
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
  fail "controlled VM did not start: $(cat "$tmp/c.err")"
  return 1
}

# migrate_to <name> <HOST:PORT> <pmlmig migrate args...>: one migration of the controlled VM.
migrate_to() {
  local name=$1 to=$2 t0
  shift 2
  : >"$tmp/m.json"
  t0=$(now_ms)
  timeout -s KILL "$HANG_S" "$PMLMIG" migrate --control "$sock" --to "$to" --json "$@" >"$tmp/m.json" 2>"$tmp/m.err"
  mig_rc=$?
  mig_ms=$(($(now_ms) - t0))
  [ $mig_rc -eq 137 ] && fail "$name: pmlmig migrate hung (killed after ${HANG_S}s): $(detail "$tmp/m.err" "$tmp/c.err")"
}

# migrate_through_proxy <name> <fault> <after> <direction> <pmlmig migrate args...>
migrate_through_proxy() {
  local name=$1 fault=$2 after=$3 dir=$4
  shift 4
  if ! open_path "$fault" "$after" "$dir" --attempts 1; then fail "$name: setup"; return 1; fi
  migrate_to "$name" "127.0.0.1:$pport" "$@"
  close_path "$name"
}

cat >"$tmp/check.py" <<'PY'
import json, re, sys

def load(path):
    try:
        return json.load(open(path))
    except Exception as e:  # noqa: BLE001 - any unreadable report is a failure
        sys.exit("cannot read %s: %s" % (path, e))

def need(cond, what):
    if not cond:
        sys.exit(what)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "failed":  # <stats json> <error regex>
    s = load(args[0])
    need(s.get("status") == "failed", "status %r, expected failed" % s.get("status"))
    need(s.get("downtime_ms") is None, "a failed migration reports downtime %r" % s.get("downtime_ms"))
    need(re.search(args[1], s.get("error") or ""), "error %r does not match %r" % (s.get("error"), args[1]))
    print("   source: " + s["error"])
elif cmd == "ran":  # <run json>: the guest kept writing while the migration ran, and after it failed
    s = load(args[0])
    need(s.get("vcpus") and all(v["pages_written_during_migration"] > 0 for v in s["vcpus"]),
         "vCPUs idle during the migration: %r" % s.get("vcpus"))
    need(all(v.get("pages_written_after_migration", 0) > 0 for v in s["vcpus"]),
         "vCPUs idle after the failed migration: %r" % s.get("vcpus"))
    need(s.get("source_vm_error") is None, "source VM error: %r" % s.get("source_vm_error"))
elif cmd == "discarded":  # <receive json>
    r = load(args[0])
    need(r.get("status") in ("failed", "cancelled"), "receiver status %r" % r.get("status"))
    need(r.get("resumed") is False and r.get("pages_written_after_resume") == 0, "receiver resumed a VM: %r" % r)
    need(len(r.get("failed_attempts", [])) == 1, "failed_attempts: %r" % r.get("failed_attempts"))
    print("   receiver: %s (%s received)" % (r.get("error"), r.get("received_bytes")))
elif cmd == "running":  # <status json> <status json 0.5 s later>
    a, b = load(args[0]), load(args[1])
    for x in (a, b):
        need(x.get("vm") == "running", "vm %r, expected running" % x.get("vm"))
        need(x.get("migration") == "failed", "migration %r, expected failed" % x.get("migration"))
    need(b["pages_written"] > a["pages_written"], "no writes: %d then %d pages" % (a["pages_written"], b["pages_written"]))
elif cmd == "completed":  # <migrate json> <receive json> [failed attempts before]
    m, r = load(args[0]), load(args[1])
    before = int(args[2]) if len(args) > 2 else 0
    need(len(r.get("failed_attempts", [])) == before, "receiver failed_attempts: %r" % r.get("failed_attempts"))
    need(m.get("status") == "completed" and m.get("verified") is True, "source: %r" % m)
    need(m.get("verification", {}).get("verdict") == "matched", "source verification: %r" % m.get("verification"))
    need(r.get("status") == "completed" and r.get("resumed") is True and r.get("verified_by") == "source",
         "receiver: %r" % r)
    need(r.get("pages_written_after_resume", 0) > 0, "target VM not writing: %r" % r)
    print("   retry: %d rounds, %.0f ms, downtime %.1f ms; target: %s" % (
        m["rounds"], m["total_time_ms"], m["downtime_ms"], r["verify_detail"]))
else:
    sys.exit("unknown check " + cmd)
PY
check() { python3 "$tmp/check.py" "$@"; }

# expect_source_failed <name> <stats json> <error regex>: also the proxy's fault line.
expect_source_failed() {
  local name=$1 json=$2 re=$3
  if check failed "$json" "$re" && grep -q "^fault_proxy: .* after [0-9]* bytes" "$tmp/p.log"; then
    pass "$name: source reports the failure ($(cat "$tmp/p.log"))"
  else
    fail "$name: source report$(detail "$json" "$tmp/s.err" "$tmp/m.err" "$tmp/p.log")"
  fi
}

expect_receiver_discarded() {
  if [ "$rcv_rc" -eq 1 ] && check discarded "$tmp/r.json"; then
    pass "$1: receiver discarded the partial VM"
  else
    fail "$1: receiver (rc $rcv_rc)$(detail "$tmp/r.json" "$tmp/r.err")"
  fi
}

# expect_vm_running <name>: the controlled VM still runs here, and writes, after the failure.
expect_vm_running() {
  "$PMLMIG" status --control "$sock" --json >"$tmp/st1.json" 2>"$tmp/st.err"
  sleep 0.5
  "$PMLMIG" status --control "$sock" --json >"$tmp/st2.json" 2>>"$tmp/st.err"
  if check running "$tmp/st1.json" "$tmp/st2.json"; then
    pass "$1: the VM keeps running on the source"
  else
    fail "$1: source VM$(detail "$tmp/st1.json" "$tmp/st2.json" "$tmp/st.err" "$tmp/c.err")"
  fi
}

# retry_direct <name> <migrate args...>: the same VM to a fresh receiver, no proxy, verified.
retry_direct() {
  local name=$1
  shift
  start_receiver --verify || { fail "$name: setup"; return 1; }
  migrate_to "$name" "127.0.0.1:$rport" --verify "$@"
  stop_receiver
  if [ $mig_rc -eq 0 ] && [ "$rcv_rc" -eq 0 ] && check completed "$tmp/m.json" "$tmp/r.json"; then
    pass "$name: retry to a fresh receiver completes, verified"
  else
    fail "$name: retry (migrate rc $mig_rc, receiver rc $rcv_rc)$(detail "$tmp/m.json" "$tmp/m.err" "$tmp/r.json" "$tmp/r.err")"
  fi
}

vm_finish() {
  reap "$vm" 20
  vm=
  if [ "$reaped_rc" -eq 0 ] && [ ! -e "$sock" ]; then
    pass "$1: controlled VM exits after migrating away"
  else
    fail "$1: controlled VM exit $reaped_rc$(detail "$tmp/c.err")"
  fi
}

start=$(now_ms)
section() { echo "== [$((($(now_ms) - start) / 1000)) s] $*"; }

# a. Cut in round 0 (a few MiB up): the source fails and keeps the VM; the
#    receiver discards; the same VM then migrates directly. Once with one
#    stream, once with four (each stream its own connection, all cut).
for variant in "1 none" "4 lz4"; do
  # shellcheck disable=SC2086
  set -- $variant
  name="cut in round 0, $1 stream(s), compress $2"
  section "$name"
  vm_start --memory 256M --vcpus 1 --workload random || continue
  sleep 0.5
  migrate_through_proxy "$name" cut 4M up --streams "$1" --compress "$2"
  [ "$mig_rc" -eq 1 ] || fail "$name: pmlmig migrate exit $mig_rc, expected 1"
  expect_source_failed "$name" "$tmp/m.json" '^round 0: .*(reset|unreachable|gone|closed)'
  echo "   pmlmig migrate returned after $mig_ms ms"
  expect_receiver_discarded "$name"
  expect_vm_running "$name"
  retry_direct "$name" --streams "$1" --compress "$2"
  vm_finish "$name"
done

# b. Cut in a later round. Rounds are kept long (zero fill: round 0 carries
#    only the pages written so far; a bandwidth cap below the dirty rate keeps
#    every round near a second), so the cut at 60 MiB lands in round 1 or 2.
#    A 1 ms downtime limit keeps a guest slowed by a loaded machine (fewer
#    dirty pages) from converging before the cut.
name="cut in a later round"
section "$name"
if vm_start --memory 256M --vcpus 1 --fill zero --workload hotset:fraction=0.05,share=0.9; then
  sleep 0.5
  migrate_through_proxy "$name" cut 60M up --max-bandwidth 40M --max-rounds 20 --downtime-limit 1
  [ "$mig_rc" -eq 1 ] || fail "$name: pmlmig migrate exit $mig_rc, expected 1"
  expect_source_failed "$name" "$tmp/m.json" '^round [1-9][0-9]*: .*(reset|unreachable|gone|closed)'
  expect_receiver_discarded "$name"
  expect_vm_running "$name"
  retry_direct "$name"
  vm_finish "$name"
fi

# e. The receiver waits on after a failed attempt (no --attempts): the same VM
#    retries through the same proxy (the fault fired once) to the same receiver.
name="cut in round 0, retry to the same receiver"
section "$name"
if vm_start --memory 256M --vcpus 1 --workload random; then
  sleep 0.5
  if open_path cut 4M up --verify; then
    migrate_to "$name" "127.0.0.1:$pport" --verify
    [ "$mig_rc" -eq 1 ] || fail "$name: first pmlmig migrate exit $mig_rc, expected 1"
    expect_source_failed "$name" "$tmp/m.json" '^round 0: .*(reset|unreachable|gone|closed)'
    expect_vm_running "$name"
    migrate_to "$name" "127.0.0.1:$pport" --verify
    close_path "$name"
    if [ "$mig_rc" -eq 0 ] && [ "$rcv_rc" -eq 0 ] && check completed "$tmp/m.json" "$tmp/r.json" 1; then
      pass "$name: the second attempt completes, verified; the receiver lists the failed one"
    else
      fail "$name: second attempt (migrate rc $mig_rc, receiver rc $rcv_rc)$(detail "$tmp/m.json" "$tmp/m.err" "$tmp/r.json" "$tmp/r.err")"
    fi
  else
    fail "$name: setup"
  fi
  vm_finish "$name"
fi

# c. Stall in round 0: nothing moves but nothing closes either; the source's
#    keepalive / stall watch (10 s, not configurable) ends the migration.
name="stall in round 0"
section "$name"
through_proxy "$name" stall 4M up --memory 256M --vcpus 1 --workload random
[ "$src_rc" -eq 1 ] || fail "$name: pmlmig run exit $src_rc, expected 1"
expect_source_failed "$name" "$tmp/s.json" '^round 0: .*(keepalive|stall|unreachable|gone)'
if [ "$src_ms" -lt 30000 ]; then pass "$name: noticed in $((src_ms / 1000)).$((src_ms % 1000 / 100)) s"; else fail "$name: took $src_ms ms"; fi
if check ran "$tmp/s.json"; then pass "$name: the guest kept running throughout"; else fail "$name: guest$(detail "$tmp/s.json")"; fi
expect_receiver_discarded "$name"

# c'. Stall of the acknowledgements only (receiver to source), in round 0.
name="stall of the acks (down) in round 0"
section "$name"
through_proxy "$name" stall 3000 down --memory 256M --vcpus 1 --workload random
[ "$src_rc" -eq 1 ] || fail "$name: pmlmig run exit $src_rc, expected 1"
expect_source_failed "$name" "$tmp/s.json" '^round 0: .*(keepalive|stall|unreachable|gone)'
if [ "$src_ms" -lt 30000 ]; then pass "$name: noticed in $((src_ms / 1000)).$((src_ms % 1000 / 100)) s"; else fail "$name: took $src_ms ms"; fi
expect_receiver_discarded "$name"

# d. One byte of round 0's payload flipped: the batch checksum catches it.
for after in 4194304 5012345; do
  name="corrupt byte $after of round 0"
  section "$name"
  through_proxy "$name" corrupt "$after" up --memory 256M --vcpus 1 --workload random
  [ "$src_rc" -eq 1 ] || fail "$name: pmlmig run exit $src_rc, expected 1"
  expect_source_failed "$name" "$tmp/s.json" '^round 0: .*(checksum mismatch|malformed)'
  if check ran "$tmp/s.json"; then pass "$name: the guest kept running"; else fail "$name: guest$(detail "$tmp/s.json")"; fi
  expect_receiver_discarded "$name"
done

# d''. The same with mutual TLS: the record MAC catches it before pmlmig sees it.
name="corrupt byte 4194304 of round 0 under TLS"
section "$name"
if bash "$(dirname "$0")/../../scripts/make-certs.sh" "$tmp/certs" >/dev/null &&
   open_path corrupt 4194304 up --attempts 1 --tls-ca "$tmp/certs/ca.pem" --tls-cert "$tmp/certs/receiver.pem" \
     --tls-key "$tmp/certs/receiver.key"; then
  timeout -s KILL "$HANG_S" "$PMLMIG" run --migrate-to "127.0.0.1:$pport" --migrate-after 500ms --linger 500ms --json \
    --memory 256M --vcpus 1 --workload random --tls-ca "$tmp/certs/ca.pem" --tls-cert "$tmp/certs/sender.pem" \
    --tls-key "$tmp/certs/sender.key" >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  close_path "$name"
  [ "$src_rc" -eq 1 ] || fail "$name: pmlmig run exit $src_rc, expected 1"
  expect_source_failed "$name" "$tmp/s.json" '^round 0: .*(unreachable|gone|reset|closed|SSL|TLS|decrypt|MAC)'
  if check ran "$tmp/s.json"; then pass "$name: the guest kept running"; else fail "$name: guest$(detail "$tmp/s.json")"; fi
  expect_receiver_discarded "$name"
else
  fail "$name: setup"
fi

# d'. A cut of the receiver's answers (down) in round 0.
name="cut down in round 0"
section "$name"
through_proxy "$name" cut 3000 down --memory 256M --vcpus 1 --workload random
[ "$src_rc" -eq 1 ] || fail "$name: pmlmig run exit $src_rc, expected 1"
expect_source_failed "$name" "$tmp/s.json" '^round 0: .*(reset|unreachable|gone|closed)'
expect_receiver_discarded "$name"

echo "fault_test: $fails failure(s) in $((($(now_ms) - start) / 1000)) s"
exit $((fails > 0))
