#!/usr/bin/env bash
# Same-host handover end to end between two pmlmig processes
# (docs/ARCHITECTURE.md, "Same-host handover", states what is promised):
#   - a running, writing guest handed over with --verify: completed, both
#     mappings' digests equal, the test VM's checker passed at the target,
#     no page copied, the workload going on at the target, downtime small;
#   - the control API: `migrate --to unix:PATH --local`;
#   - the receiver killed after setup (fail point handover.setup): the source
#     resumes its VM, which keeps running here;
#   - the receiver killed once prepared (handover.prepared): the source sent
#     its commit and cannot learn the outcome: in doubt, exit 3, its VM stays
#     paused (the target might have run the guest on the shared memory);
#   - the commit's answer lost (tamper.handover_commit_reply): resolved on a
#     second connection, completed;
#   - a peer that connects and says nothing does not delay the next handover;
#   - refusals: the socket is 0600 (another user cannot connect), a process of
#     another uid that connects anyway (the socket opened to all) is refused
#     through SO_PEERCRED, and a source refuses a receiver of another uid;
#   - usage errors.
# Needs /dev/kvm (skips without); the uid cases need root and setpriv.
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
fails=0
tmp=$(mktemp -d)
chmod 755 "$tmp"
pids=()
trap 'for p in "${pids[@]}"; do kill -9 $p 2>/dev/null; done; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: handover tests need /dev/kvm"
  exit 0
fi
VM=(--memory 256M --vcpus 2 --workload random --tracker ring)
sock="$tmp/h.sock"

# receiver [env...]: `pmlmig receive --listen unix:$sock`, one handover.
receiver() {
  rm -f "$sock"
  env "$@" "$PMLMIG" receive --listen "unix:$sock" --exit-after 1s --wait 60s --attempts 1 --json \
    >"$tmp/r.json" 2>"$tmp/r.err" &
  rpid=$!
  pids+=($rpid)
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
}
show() { echo "source rc ${src_rc:-}, receiver rc ${rcv_rc:-}: $(tail -c 600 "$tmp/s.err") | $(tail -c 400 "$tmp/r.err")"; }
check() {
  python3 - "$tmp/s.json" "$tmp/r.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
try:
    r = json.load(open(sys.argv[2]))
except Exception:
    r = None
exec(sys.argv[3])
PY
}

# 1. A writing guest handed over, verified.
receiver
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 500ms --verify --json \
  >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check '
assert s["status"] == "completed" and s["verified"] is True and s["shared_memory"] is True, (s["status"], s["error"])
assert s["transferred_bytes"] == 0 and s["normal_pages"] == 0, s["transferred_bytes"]
assert s["verification"]["verdict"] == "matched" and s["verification"]["order"] == "before-commit", s["verification"]
assert s["downtime_ms"] < 2000, s["downtime_ms"]
assert all(v["pages_written_during_migration"] >= 0 for v in s["vcpus"])
assert r["status"] == "completed" and r["handover"] is True and r["pages_written_after_resume"] > 0, r
assert r["received_normal_pages"] == 0, r
assert "checked" in r["verify_detail"] or "pages" in r["verify_detail"], r["verify_detail"]
print("   downtime %.1f ms (verifying: both sides digest the memory), %d pages written at the target after" % (
    s["downtime_ms"], r["pages_written_after_resume"]))
'; then
  pass "handover of a writing guest: completed, verified, no page copied, the workload runs on at the target"
else
  fail "handover: $(show)"
fi

# 1b. Without --verify the downtime is the state alone.
receiver
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 300ms --json >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check '
assert s["status"] == "completed" and s["downtime_ms"] < 200, (s["status"], s["downtime_ms"], s["error"])
assert r["pages_written_after_resume"] > 0, r
print("   downtime %.1f ms" % s["downtime_ms"])
'; then
  pass "handover without verification: completed, downtime under 200 ms"
else
  fail "handover without verification: $(show)"
fi

# 2. The control API.
csock="$tmp/vm.sock"
"$PMLMIG" run "${VM[@]}" --duration 0 --control "$csock" -q >"$tmp/vm.out" 2>"$tmp/vm.err" &
vm=$!
pids+=($vm)
for _ in $(seq 100); do [ -S "$csock" ] && break; sleep 0.1; done
receiver
"$PMLMIG" migrate --control "$csock" --to "unix:$sock" --local --verify >"$tmp/m.out" 2>"$tmp/m.err"
m_rc=$?
st=$("$PMLMIG" status --control "$csock" --json 2>/dev/null)
wait $rpid
rcv_rc=$?
kill $vm 2>/dev/null
if [ $m_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && echo "$st" | python3 -c '
import json, sys
j = json.load(sys.stdin)
assert j["migration"] == "completed" and j["vm"] == "migrated", j' && python3 - "$tmp/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "completed" and r["handover"] and r["pages_written_after_resume"] > 0, r
PY
then
  pass "control API: migrate --to unix:PATH --local, completed; the VM runs at the target"
else
  fail "control API: migrate rc $m_rc, receiver rc $rcv_rc: $(cat "$tmp/m.err") ${st:-}"
fi

# 3. The receiver dies after setup: the source resumes and runs on.
receiver PMLMIG_FAILPOINTS=handover.setup=1
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 300ms --linger 500ms --json \
  >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 1 ] && check '
assert s["status"] == "failed", s["status"]
assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) > 0, s["vcpus"]
'; then
  pass "receiver killed after setup: the source failed the handover and its VM runs on"
else
  fail "receiver killed after setup: $(show)"
fi

# 4. The receiver dies once prepared: the commit's outcome cannot be known.
receiver PMLMIG_FAILPOINTS=handover.prepared=1
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 300ms --json \
  >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 3 ] && check '
assert s["status"] == "in-doubt", s["status"]
assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) == 0, s["vcpus"]
' && grep -q "shared memory" "$tmp/s.err"; then
  pass "receiver killed once prepared: in doubt (exit 3), the source's VM stays paused"
else
  fail "receiver killed once prepared: $(show)"
fi

# 5. The commit's answer lost: resolved on a new connection.
receiver PMLMIG_FAILPOINTS=tamper.handover_commit_reply=1
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 300ms --json >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
wait $rpid
rcv_rc=$?
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && check '
assert s["status"] == "completed" and s["commit_resolved"] is True, (s["status"], s["error"])
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
'; then
  pass "commit answer lost: resolved on a new connection, completed"
else
  fail "commit answer lost: $(show)"
fi

# 5b. A peer of this uid that connects and says nothing holds up nobody: the
# handover after it goes through at once, not after the receiver's 30 s
# handshake timeout.
receiver
python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1]); time.sleep(60)
' "$sock" &
staller=$!
pids+=($staller)
sleep 0.3
start=$SECONDS
"$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 200ms --json >"$tmp/s.json" 2>"$tmp/s.err"
src_rc=$?
took=$((SECONDS - start))
wait $rpid
rcv_rc=$?
kill $staller 2>/dev/null
if [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && [ $took -lt 15 ] && check 'assert s["status"] == "completed", s["status"]'; then
  pass "a silent peer holds up nobody: the next handover completed in ${took} s"
else
  fail "silent peer: took ${took} s; $(show)"
fi

# 6. Who may connect.
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null && [ -x /usr/bin/python3 ]; then
  as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
  py=/usr/bin/python3  # not a shim under /root, which nobody cannot read
  probe='
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:", e.strerror); sys.exit(0)
s.settimeout(5)
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk: break
    data += chunk
print("answer:", data[4:].decode("utf-8", "replace"))
'
  receiver
  out=$(as_nobody $py -c "$probe" "$sock" 2>&1)
  if echo "$out" | grep -q "connect: Permission denied"; then
    pass "the socket is 0600: another user cannot connect ($out)"
  else
    fail "socket mode: $out; $(ls -l "$sock")"
  fi
  chmod 666 "$sock"
  out=$(as_nobody $py -c "$probe" "$sock" 2>&1)
  if echo "$out" | grep -q "uid 65534 is not allowed"; then
    pass "a process of another uid on a socket opened to all: refused (SO_PEERCRED): ${out:0:120}"
  else
    fail "peer credentials: $out"
  fi
  # The receiver is still waiting: a real handover still goes through.
  "$PMLMIG" run "${VM[@]}" --migrate-to "unix:$sock" --local --migrate-after 200ms --json >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  wait $rpid
  [ $src_rc -eq 0 ] && pass "after the refusal the receiver took the next handover" || fail "after refusal: $(show)"

  # A receiver of another uid: the source refuses it.
  mkdir -m 1777 "$tmp/nobody"
  fake="$tmp/nobody/fake.sock"
  as_nobody $py -c '
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666); s.listen(1)
c, _ = s.accept(); time.sleep(3)
' "$fake" &
  pids+=($!)
  for _ in $(seq 50); do [ -S "$fake" ] && break; sleep 0.1; done
  "$PMLMIG" run "${VM[@]}" --migrate-to "unix:$fake" --local --migrate-after 200ms --linger 300ms --json \
    >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  if [ $src_rc -eq 1 ] && grep -q "refused a handover receiver: pid [0-9]*, uid 65534 is not allowed" "$tmp/s.err" &&
    check 'assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) > 0'; then
    pass "a receiver of another uid: refused by the source, whose VM runs on"
  else
    fail "foreign receiver: $(show)"
  fi
else
  echo "SKIP: the uid cases need root, setpriv and /usr/bin/python3"
fi

# 6b. Two receivers started at once on one path: exactly one listens, and
# the other's exit does not remove the winner's socket.
race_ok=1
for i in 1 2 3; do
  rs="$tmp/race$i.sock"
  "$PMLMIG" receive --listen "unix:$rs" --wait 3s -q >/dev/null 2>"$tmp/ra.err" &
  a=$!
  "$PMLMIG" receive --listen "unix:$rs" --wait 3s -q >/dev/null 2>"$tmp/rb.err" &
  b=$!
  sleep 1
  refused=$(cat "$tmp/ra.err" "$tmp/rb.err" | grep -c "another receiver")
  alive=0
  kill -0 $a 2>/dev/null && alive=$((alive + 1))
  kill -0 $b 2>/dev/null && alive=$((alive + 1))
  if [ "$refused" -ne 1 ] || [ $alive -ne 1 ] || [ ! -S "$rs" ]; then
    race_ok=0
    echo "   try $i: $refused refused, $alive alive, socket $( [ -S "$rs" ] && echo there || echo gone)"
  fi
  kill $a $b 2>/dev/null
  wait $a $b 2>/dev/null
done
if [ $race_ok -eq 1 ]; then pass "two receivers at once on one path: one listens, the other is refused"; else fail "receivers racing for one path"; fi

# 7. Usage errors.
usage() {
  local what=$1 want=$2
  shift 2
  "$PMLMIG" "$@" >"$tmp/u.out" 2>"$tmp/u.err"
  local rc=$?
  if [ $rc -eq 2 ] && grep -q -- "$want" "$tmp/u.err"; then pass "usage: $what"; else fail "usage: $what: rc $rc, $(cat "$tmp/u.err")"; fi
}
usage "--local without unix:" "is not unix:PATH" run --memory 64M --migrate-to 127.0.0.1:1 --local
usage "unix: without --local" "only a same-host handover" run --memory 64M --migrate-to "unix:$sock"
usage "--local without --migrate-to" "--local needs --migrate-to" run --memory 64M --local
usage "--local with --postcopy" "do not apply" run --memory 64M --migrate-to "unix:$sock" --local --postcopy now
usage "--local with --compress" "do not apply" run --memory 64M --migrate-to "unix:$sock" --local --compress lz4
usage "receive unix: with --insecure" "do not apply" receive --listen "unix:$sock" --insecure
usage "--allow-uid without unix:" "--allow-uid needs" receive --listen 127.0.0.1:0 --allow-uid 5

echo "handover tests: $fails failure(s)"
[ $fails -eq 0 ]
