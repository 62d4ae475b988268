#!/usr/bin/env bash
# The migration port's security, end to end between two pmlmig processes:
# mutual TLS (a certificate from the wrong CA, none at all, plaintext against
# TLS), the token (right, wrong, missing, a file others can read), and the
# refusal to listen on a non-loopback address without either. Every refusal
# happens before the receiver creates any state: its report lists no failed
# attempt. Needs /dev/kvm (skips without) and openssl (scripts/setup.sh).
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
fails=0
tmp=$(mktemp -d)
receiver=
trap '[ -n "$receiver" ] && kill $receiver 2>/dev/null; rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: security tests need /dev/kvm"
  exit 0
fi
bash "$ROOT/scripts/make-certs.sh" "$tmp/ok" >/dev/null || { echo "FAIL: make-certs.sh"; exit 1; }
bash "$ROOT/scripts/make-certs.sh" "$tmp/other" >/dev/null || { echo "FAIL: make-certs.sh (second CA)"; exit 1; }
C=$tmp/ok
RTLS=(--tls-ca "$C/ca.pem" --tls-cert "$C/receiver.pem" --tls-key "$C/receiver.key")
STLS=(--tls-ca "$C/ca.pem" --tls-cert "$C/sender.pem" --tls-key "$C/sender.key")
port=$((21000 + RANDOM % 2000))

# attempt <receiver flags (array name)> <sender flags (array name)>: one migration of a small VM.
attempt() {
  local -n rf=$1 sf=$2
  port=$((port + 1))
  "$PMLMIG" receive --listen 127.0.0.1:$port --exit-after 300ms --wait 8s --attempts 1 --json "${rf[@]}" \
    >"$tmp/r.json" 2>"$tmp/r.err" &
  receiver=$!
  sleep 0.3
  "$PMLMIG" run --memory 64M --workload hotset:fraction=0.05,share=0.9 --migrate-to 127.0.0.1:$port \
    --migrate-after 200ms --linger 200ms --json "${sf[@]}" >"$tmp/s.json" 2>"$tmp/s.err"
  src_rc=$?
  wait $receiver
  rcv_rc=$?
  receiver=
}

completed() {
  [ $src_rc -eq 0 ] && [ $rcv_rc -eq 0 ] && python3 - "$tmp/s.json" "$tmp/r.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
assert s["status"] == "completed", s
assert r["status"] == "completed" and r["pages_written_after_resume"] > 0, r
PY
}

# refused "<what the source's error must say>": the source failed with that
# reason, its VM kept running, and the receiver never created a session.
refused() {
  [ $src_rc -eq 1 ] && grep -q -- "$1" "$tmp/s.err" && python3 - "$tmp/s.json" "$tmp/r.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); r = json.load(open(sys.argv[2]))
assert s["status"] == "failed", s
assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) > 0, "source VM not running after the failure"
assert r["status"] == "failed" and r["failed_attempts"] == [], r
PY
}
show() { echo "source rc $src_rc, receiver rc $rcv_rc: $(tail -c 400 "$tmp/s.err") | $(tail -c 300 "$tmp/r.err")"; }

r=("${RTLS[@]}"); s=("${STLS[@]}")
attempt r s
if completed; then pass "mutual TLS: migration completes"; else fail "mutual TLS: $(show)"; fi

s=(--tls-ca "$C/ca.pem" --tls-cert "$tmp/other/sender.pem" --tls-key "$tmp/other/sender.key")
attempt r s
if refused "no connection"; then pass "TLS: a sender certificate from another CA is refused"; else fail "TLS other CA: $(show)"; fi

s=(--tls-ca "$tmp/other/ca.pem" --tls-cert "$C/sender.pem" --tls-key "$C/sender.key")
attempt r s
if refused "no connection"; then pass "TLS: the sender refuses a receiver its CA did not sign"; else fail "TLS server verify: $(show)"; fi

s=()
attempt r s
if refused "demands TLS"; then pass "TLS: a plaintext sender is refused"; else fail "TLS plaintext sender: $(show)"; fi

cp "$C/token" "$tmp/token" && chmod 600 "$tmp/token"
printf 'not-the-right-token-0123456789\n' >"$tmp/wrong" && chmod 600 "$tmp/wrong"
r=(--token-file "$tmp/token"); s=(--token-file "$tmp/token")
attempt r s
if completed; then pass "token: migration completes"; else fail "token: $(show)"; fi
s=(--token-file "$tmp/wrong")
attempt r s
if refused "token does not match"; then pass "token: a wrong token is refused before any state"; else fail "wrong token: $(show)"; fi
s=()
attempt r s
if refused "requires a token"; then pass "token: a missing token is refused before any state"; else fail "missing token: $(show)"; fi

r=("${RTLS[@]}" --token-file "$tmp/token"); s=("${STLS[@]}" --token-file "$tmp/token")
attempt r s
if completed; then pass "TLS and token together: migration completes"; else fail "TLS+token: $(show)"; fi

# Usage errors: named, one line, exit 2, nothing started.
chmod 644 "$tmp/wrong"
usage() {
  local name=$1 want=$2
  shift 2
  "$@" >"$tmp/o" 2>"$tmp/e"
  local rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <"$tmp/e")" -eq 1 ] && grep -q -- "$want" "$tmp/e"; then pass "$name"; else fail "$name (rc $rc): $(cat "$tmp/e")"; fi
}
usage "token file readable by others" "chmod 600" "$PMLMIG" receive --listen 127.0.0.1:0 --token-file "$tmp/wrong"
usage "TLS needs all three files" "all three" "$PMLMIG" receive --listen 127.0.0.1:0 --tls-cert "$C/receiver.pem"
usage "missing certificate file" "no-such.pem" "$PMLMIG" run --migrate-to 127.0.0.1:1 --tls-ca "$tmp/no-such.pem" --tls-cert "$C/sender.pem" --tls-key "$C/sender.key"
usage "a key that is not PEM" "not a PEM" "$PMLMIG" receive --listen 127.0.0.1:0 --tls-ca "$C/ca.pem" --tls-cert "$C/receiver.pem" --tls-key "$tmp/token"
usage "non-loopback listen without authentication" "without authentication" "$PMLMIG" receive --listen 0.0.0.0:0
# With --insecure (or a token) it listens; stop it at once. Nothing is sent anywhere.
for extra in "--insecure" "--token-file $tmp/token"; do
  # shellcheck disable=SC2086
  timeout 3 "$PMLMIG" receive --listen 0.0.0.0:0 --wait 1s $extra >"$tmp/o" 2>"$tmp/e"
  rc=$?
  if [ $rc -eq 1 ] && grep -q "listening on 0.0.0.0" "$tmp/e" && grep -q "no migration completed" "$tmp/e"; then
    pass "non-loopback listen allowed with $extra"
  else fail "non-loopback with $extra (rc $rc): $(cat "$tmp/e")"; fi
done

echo "security_test: $fails failure(s)"
exit $((fails > 0))
