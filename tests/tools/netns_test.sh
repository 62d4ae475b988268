#!/usr/bin/env bash
# Migrations between two network namespaces joined by a veth pair
# (scripts/netns.sh): the receiver listens on its namespace's own address, so
# the rule that a non-loopback listener needs TLS or a token applies for real.
#   - without TLS or a token, `receive` refuses to listen there (exit 2);
#   - mutual TLS: a plaintext sender and one whose certificate another CA
#     signed are refused, a sender refuses a receiver whose certificate is not
#     issued for the address it connects to (and accepts it when told the
#     name), and a migration completes, verified on both sides, its bytes
#     through the veth pair;
#   - a token: a wrong and a missing one are refused, the right one completes,
#     verified;
#   - a rate limit (tbf, 100 Mbit/s) on the pair: the migration takes at least
#     the time its bytes need at that rate.
# Refused senders run against the receiver that then completes: its report
# must list no failed attempt, so no refusal created state. Skips (77) without /dev/kvm, root or `ip netns`; removes the
# namespaces and every process in them on any exit (see scripts/netns.sh).
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

if [ ! -w /dev/kvm ]; then
  echo "SKIP: namespace migrations need /dev/kvm"
  exit 77
fi
# shellcheck source=scripts/netns.sh
. "$ROOT/scripts/netns.sh"
if ! netns_usable; then
  echo "SKIP: $netns_reason"
  exit 77
fi
# gRPC would send a non-loopback target through a configured proxy.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY grpc_proxy all_proxy ALL_PROXY
netns_create || { echo "FAIL: cannot create the namespaces"; exit 1; }
echo "namespaces $NETNS_SRC ($NETNS_SRC_ADDR) -> $NETNS_DST ($NETNS_DST_ADDR)"
start=$SECONDS

C=$tmp/ok O=$tmp/other
if ! bash "$ROOT/scripts/make-certs.sh" "$C" "$NETNS_DST_ADDR" >/dev/null ||
   ! bash "$ROOT/scripts/make-certs.sh" "$O" >/dev/null; then
  echo "FAIL: make-certs.sh"
  exit 1
fi
RTLS=(--tls-ca "$C/ca.pem" --tls-cert "$C/receiver.pem" --tls-key "$C/receiver.key")
STLS=(--tls-ca "$C/ca.pem" --tls-cert "$C/sender.pem" --tls-key "$C/sender.key")
OSTLS=(--tls-ca "$O/ca.pem" --tls-cert "$O/sender.pem" --tls-key "$O/sender.key")  # all from the other CA
printf 'not-the-right-token-0123456789\n' >"$tmp/wrong" && chmod 600 "$tmp/wrong"
declare -A pid rc

# receiver <name> <port> <receive flags...>: `pmlmig receive` in the target
# namespace on its address, --verify, one migration; $tmp/<name>.json, .err.
receiver() {
  local name=$1 port=$2
  shift 2
  netns_spawn dst timeout -s KILL 60 "$PMLMIG" receive --listen "$NETNS_DST_ADDR:$port" --exit-after 300ms \
    --wait 40s --attempts 1 --verify --json "$@" >"$tmp/$name.json" 2>"$tmp/$name.err"
  pid[$name]=$netns_pid
  for _ in $(seq 100); do
    grep -q "listening on" "$tmp/$name.err" && return 0
    kill -0 "${pid[$name]}" 2>/dev/null || break
    sleep 0.05
  done
  fail "receiver $name did not start: $(cat "$tmp/$name.err")"
  return 1
}

# sender <name> <port> <run flags...>: a small VM in the source namespace
# (memory $MEM, workload $LOAD), migrated to the receiver's address with
# --verify, in the background.
sender() {
  local name=$1 port=$2
  shift 2
  netns_spawn src timeout -s KILL 60 "$PMLMIG" run --memory "${MEM:-32M}" \
    --workload "${LOAD:-hotset:fraction=0.05,share=0.9}" --migrate-to "$NETNS_DST_ADDR:$port" \
    --migrate-after 200ms --linger 200ms --verify --json "$@" \
    >"$tmp/$name.json" 2>"$tmp/$name.err"
  pid[$name]=$netns_pid
}

# finish <name>...: waits for each; their exit status in ${rc[name]}.
finish() {
  local name
  for name in "$@"; do
    wait "${pid[$name]}"
    rc[$name]=$?
  done
}

show() {
  local name
  for name in "$@"; do printf '\n  --- %s (rc %s): %s' "$name" "${rc[$name]:-}" "$(tail -c 500 "$tmp/$name.err")"; done
}

cat >"$tmp/check.py" <<'PY'
import json, re, sys
cmd, args = sys.argv[1], sys.argv[2:]
load = lambda name: json.load(open(name))
sys.excepthook = lambda t, e, tb: sys.exit("   check %s: %s: %s" % (cmd, t.__name__, e))
if cmd == "completed":  # <source json> <receiver json>: both sides verified, no refusal left state
    s, r = load(args[0]), load(args[1])
    assert s["status"] == "completed" and s["verified"] is True, s
    assert s["verification"]["verdict"] == "matched", s["verification"]
    assert r["status"] == "completed" and r["resumed"] is True, r
    # Before commit the receiver compared too; after commit the source did.
    assert (r["verified"] is True) == (s["verification"]["order"] == "before-commit"), r
    assert r["verified_by"] == ("target" if r["verified"] else "source"), r
    assert r["pages_written_after_resume"] > 0, r
    assert r["failed_attempts"] == [], r["failed_attempts"]
    print("   %d rounds, %s bytes in %.0f ms; target: %s" % (s["rounds"], s["transferred_bytes"], s["total_time_ms"],
                                                          r["verify_detail"]))
elif cmd == "refused":  # <source json> <error regex>: failed with that reason, the VM kept running
    s = load(args[0])
    assert s["status"] == "failed" and re.search(args[1], s["error"] or ""), s.get("error")
    assert sum(v["pages_written_after_migration"] for v in s["vcpus"]) > 0, "source VM not running after the failure"
elif cmd == "veth":  # <source json> <bytes the target's veth end received>
    s = load(args[0])
    assert int(args[1]) >= s["transferred_bytes"], "%s bytes on the veth, %s sent" % (args[1], s["transferred_bytes"])
elif cmd == "at-most":  # <source json> <bits per second>: its bytes went no faster than that
    s, rate = load(args[0]), float(args[1])
    need_ms = s["transferred_bytes"] * 8 / rate * 1000
    assert s["total_time_ms"] >= 0.9 * need_ms, "%.0f ms, expected >= %.0f ms" % (s["total_time_ms"], need_ms)
    print("   %s bytes in %.0f ms (%.0f ms at the limit), %.1f Mbit/s" % (
        s["transferred_bytes"], s["total_time_ms"], need_ms, s["transferred_bytes"] * 8 / s["total_time_ms"] / 1000))
else:
    sys.exit("unknown check " + cmd)
PY
check() { python3 "$tmp/check.py" "$@"; }

# expect_refused <sender> <receiver> <error regex> <what>: the sender failed
# (exit 1) with that reason and kept its VM running.
expect_refused() {
  if [ "${rc[$1]}" -eq 1 ] && check refused "$tmp/$1.json" "$3"; then pass "$4"; else fail "$4:$(show "$1" "$2")"; fi
}

# expect_completed <sender> <receiver> <what>: both exit 0, verified (check completed).
expect_completed() {
  if [ "${rc[$1]}" -eq 0 ] && [ "${rc[$2]}" -eq 0 ] && check completed "$tmp/$1.json" "$tmp/$2.json"; then
    pass "$3"
  else
    fail "$3:$(show "$1" "$2")"
    return 1
  fi
}

# 1. The rule itself: no TLS, no token, a non-loopback address.
netns_exec dst "$PMLMIG" receive --listen "$NETNS_DST_ADDR:7400" >"$tmp/noauth.out" 2>"$tmp/noauth.err"
r=$?
if [ $r -eq 2 ] && grep -q "refusing to listen on $NETNS_DST_ADDR:7400 without authentication" "$tmp/noauth.err"; then
  pass "no TLS, no token: receive refuses to listen on $NETNS_DST_ADDR ($(cut -c1-70 "$tmp/noauth.err")...)"
else
  fail "no-auth listener (rc $r): $(cat "$tmp/noauth.err")"
fi

# 2. Mutual TLS. Receiver "tls" has a certificate for the address; "name" one
#    that is valid only for localhost and 127.0.0.1 (the other CA's).
if receiver tls 7400 "${RTLS[@]}" &&
   receiver name 7401 --tls-ca "$O/ca.pem" --tls-cert "$O/receiver.pem" --tls-key "$O/receiver.key"; then
  sender plain 7400
  sender otherca 7400 --tls-ca "$C/ca.pem" --tls-cert "$O/sender.pem" --tls-key "$O/sender.key"
  sender wrongname 7401 "${OSTLS[@]}"
  finish plain otherca wrongname
  expect_refused plain tls "demands TLS" "TLS: a plaintext sender is refused"
  expect_refused otherca tls "no connection" "TLS: a sender certificate from another CA is refused"
  expect_refused wrongname name "no connection" \
    "TLS: the sender refuses a receiver certificate not issued for $NETNS_DST_ADDR"
  # The name alone was wrong: told to expect "localhost", the same sender gets through.
  sender rightname 7401 "${OSTLS[@]}" --tls-server-name localhost
  finish rightname name
  expect_completed rightname name "TLS: with --tls-server-name localhost that receiver is accepted"

  rx0=$(netns_exec dst cat "/sys/class/net/$NETNS_DST_IF/statistics/rx_bytes")
  sender stls 7400 "${STLS[@]}" --verify-order before-commit
  finish stls tls
  rx1=$(netns_exec dst cat "/sys/class/net/$NETNS_DST_IF/statistics/rx_bytes")
  if expect_completed stls tls "mutual TLS: $NETNS_SRC -> $NETNS_DST completes, verified"; then
    if check veth "$tmp/stls.json" $((rx1 - rx0)); then
      pass "mutual TLS: its $((rx1 - rx0)) bytes crossed the veth pair"
    else fail "mutual TLS: not over the veth pair"; fi
  fi
fi

# 3. A token.
if receiver token 7402 --token-file "$C/token"; then
  sender wrongtoken 7402 --token-file "$tmp/wrong"
  sender notoken 7402
  finish wrongtoken notoken
  expect_refused wrongtoken token "token does not match" "token: a wrong token is refused"
  expect_refused notoken token "requires a token" "token: a missing token is refused"
  sender stoken 7402 --token-file "$C/token"
  finish stoken token
  expect_completed stoken token "token: $NETNS_SRC -> $NETNS_DST completes, verified"
fi

# 4. 100 Mbit/s on the pair: 16 MiB of incompressible memory need over 1.3 s.
#    The guest writes slowly enough (2000 pages/s, most into a hot set) for
#    the rounds to converge at that rate.
if netns_rate 100mbit && receiver rate 7403 --token-file "$C/token"; then
  MEM=16M LOAD=hotset:fraction=0.05,share=0.9,rate=2000 sender srate 7403 --token-file "$C/token"
  finish srate rate
  if expect_completed srate rate "rate limit: completes, verified"; then
    if check at-most "$tmp/srate.json" 100e6; then
      pass "rate limit: the migration took the time 100 Mbit/s implies"
    else fail "rate limit: faster than 100 Mbit/s allows"; fi
  fi
  netns_rate off
fi

echo "netns_test: $fails failure(s) in $((SECONDS - start)) s"
exit $((fails > 0))
