# shellcheck shell=bash
# Two network namespaces joined by a veth pair, for migrations between
# processes that reach each other over a real (non-loopback) link: the shell
# tests (tests/tools/netns_test.sh) and benchmarks source this file.
#
#   . scripts/netns.sh
#   netns_usable || { echo "SKIP: $netns_reason"; exit 77; }   # root, ip netns
#   netns_create                   # $NETNS_SRC, $NETNS_DST: the namespaces;
#                                  # $NETNS_SRC_ADDR, $NETNS_DST_ADDR: their
#                                  # addresses (one /30 chosen per run);
#                                  # $NETNS_SRC_IF, $NETNS_DST_IF: the veth ends
#   netns_exec src|dst CMD...      # CMD in that namespace
#   netns_spawn src|dst CMD...     # CMD in the background there: $netns_pid
#   netns_rate RATE                # tc tbf on both veth ends (e.g. 100mbit);
#                                  # netns_rate off removes it
#   netns_teardown                 # kills every process in the namespaces,
#                                  # deletes them (and with them the veth
#                                  # pair); idempotent
#
# What it must never do: touch the host's own network. Both veth ends are
# created directly inside the new namespaces and every address and qdisc is
# set there (`ip -n`, `tc -n`), so the root namespace gains no link, address
# or route, and nothing routes out of the pair. Names carry the creating
# shell's pid, so parallel runs do not collide.
#
# Safe under `set -euo pipefail`. Cleanup: netns_create chains netns_teardown in front of the caller's EXIT
# trap (set yours before calling it), turns INT, TERM and HUP into an exit
# (130, 143, 129) so that trap runs, and starts a detached guard process that
# tears down if the shell dies without running it (SIGKILL, a test timeout).

# shellcheck disable=SC2034  # the caller reads these
netns_reason='' netns_pid=''
NETNS_SRC='' NETNS_DST=''
_netns_guard_pid=''
_netns_prev_exit=''  # the caller's EXIT trap, run after the teardown

# netns_usable: 0 where namespaces can be made here; else 1 with $netns_reason.
netns_usable() {
  if [ "$EUID" -ne 0 ]; then
    netns_reason="network namespaces need root"
  elif ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    netns_reason="ip and tc (iproute2) are not installed"
  elif ! netns_reason=$(ip netns add "pmlmig-probe-$$" 2>&1); then
    netns_reason="cannot create a network namespace: $netns_reason"
  else
    ip netns del "pmlmig-probe-$$" 2>/dev/null || true
    netns_reason=''
    return 0
  fi
  return 1
}

# netns_create: the namespaces, the veth pair, addresses, lo and the link up.
netns_create() {
  local id=$BASHPID a b c ns
  if [ -n "$NETNS_SRC" ]; then echo "netns: already created ($NETNS_SRC, $NETNS_DST)" >&2; return 1; fi
  NETNS_SRC=pmlmig-src-$id NETNS_DST=pmlmig-dst-$id
  NETNS_SRC_IF=mig-src NETNS_DST_IF=mig-dst
  # A /30 in 10.100.0.0/14, from the pid and a random number.
  a=$((100 + RANDOM % 4)) b=$((id % 256)) c=$((RANDOM % 64 * 4))
  NETNS_SRC_ADDR=10.$a.$b.$((c + 1)) NETNS_DST_ADDR=10.$a.$b.$((c + 2))
  _netns_install_traps
  for ns in "$NETNS_SRC" "$NETNS_DST"; do
    ip netns add "$ns" || { echo "netns: cannot create namespace $ns" >&2; return 1; }
  done
  # One command puts each end straight into its namespace: the root
  # namespace never holds either.
  if ! { ip link add "$NETNS_SRC_IF" netns "$NETNS_SRC" type veth peer name "$NETNS_DST_IF" netns "$NETNS_DST" &&
          ip -n "$NETNS_SRC" addr add "$NETNS_SRC_ADDR/30" dev "$NETNS_SRC_IF" &&
          ip -n "$NETNS_DST" addr add "$NETNS_DST_ADDR/30" dev "$NETNS_DST_IF" &&
          ip -n "$NETNS_SRC" link set lo up && ip -n "$NETNS_DST" link set lo up &&
          ip -n "$NETNS_SRC" link set "$NETNS_SRC_IF" up && ip -n "$NETNS_DST" link set "$NETNS_DST_IF" up; }; then
    echo "netns: cannot set up the veth pair between $NETNS_SRC and $NETNS_DST" >&2
    return 1
  fi
}

# _netns_ns src|dst: the namespace's name.
_netns_ns() {
  case "$1" in
    src) echo "$NETNS_SRC" ;;
    dst) echo "$NETNS_DST" ;;
    *) echo "netns: '$1' is neither src nor dst" >&2; return 1 ;;
  esac
}

netns_exec() {
  local ns
  ns=$(_netns_ns "$1") || return 2
  shift
  ip netns exec "$ns" "$@"
}

# netns_spawn src|dst CMD...: `netns_exec ... &` would leave $! naming a
# subshell; this gives CMD's own pid (ip execs it), to wait for or signal.
netns_spawn() {
  local ns
  ns=$(_netns_ns "$1") || return 2
  shift
  ip netns exec "$ns" "$@" &
  netns_pid=$!
}

# netns_rate RATE|off [BURST LATENCY]: a token bucket (tbf) on both ends, so
# each direction carries at most RATE (tc's units: 100mbit, 10mbps...), with
# tbf's BURST and LATENCY (its queue: what waits longer is dropped; default
# 64kb and 100ms). netem is not available on every kernel; tbf is.
netns_rate() {
  local ns dev
  for ns in src dst; do
    if [ $ns = src ]; then dev=$NETNS_SRC_IF; else dev=$NETNS_DST_IF; fi
    tc -n "$(_netns_ns $ns)" qdisc del dev "$dev" root 2>/dev/null || true  # none there: fine
    [ "$1" = off ] && continue
    # A burst of 64 KiB (one TSO segment) keeps the limit tight; tbf drops
    # what waits longer than 100 ms, which TCP then paces to the rate.
    tc -n "$(_netns_ns $ns)" qdisc add dev "$dev" root tbf rate "$1" burst "${2:-64kb}" latency "${3:-100ms}" ||
      { echo "netns: tc tbf rate $1 on $dev failed" >&2; return 1; }
  done
}

# netns_teardown: safe to call any number of times, from any trap. The names
# carry this shell's pid: whatever stands under them is this run's.
netns_teardown() {
  local ns pids p
  if [ -n "$_netns_guard_pid" ]; then
    kill -TERM "$_netns_guard_pid" 2>/dev/null
    _netns_guard_pid=''
  fi
  for ns in $NETNS_SRC $NETNS_DST; do
    [ -e "/run/netns/$ns" ] || continue
    # A namespace lives on (with its end of the pair) while a process is in
    # it, so those go first.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [ -z "$pids" ] && break
      # shellcheck disable=SC2086  # a list of pids
      kill -9 $pids 2>/dev/null || true
      for p in $pids; do wait "$p" 2>/dev/null || true; done  # this shell's own: reaped quietly
      sleep 0.05
    done
    [ -n "$pids" ] && echo "netns: processes $pids outlived SIGKILL in $ns" >&2
    ip netns del "$ns" 2>/dev/null || true
  done
  return 0
}

# The guard: a detached process (reparented away from this shell, so a test
# runner's kill of the shell's process tree misses it, and holding none of its
# output) that tears down once this shell is gone, unless told (TERM) that
# the shell did it itself.
_netns_guard() {
  local parent=$1 s=''
  trap '[ -n "$s" ] && kill "$s" 2>/dev/null; exit 0' TERM
  trap '' INT HUP
  while _netns_alive "$parent"; do
    sleep 0.5 &
    s=$!
    wait "$s"
  done
  trap - TERM
  netns_teardown
}

# _netns_alive PID: running (a zombie, killed but not yet reaped, is gone).
_netns_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }  # past "pid (comm) ": the state letter
  [ "${stat%% *}" != Z ]
}

_netns_on_exit() {
  local rc=$?
  netns_teardown
  # The caller's trap sees the exit status in $? (a failing status does not
  # end this handler under set -e: it is on the left of ||).
  if [ $rc -eq 0 ]; then eval "$_netns_prev_exit"; else _netns_status $rc || eval "$_netns_prev_exit"; fi
  return $rc
}
_netns_status() { return "$1"; }

_netns_install_traps() {
  local prev
  eval "prev=($(trap -p EXIT))"  # (trap -- 'CMD' EXIT), or () with none
  [ "${prev[2]:-}" = _netns_on_exit ] || _netns_prev_exit=${prev[2]:-}
  trap _netns_on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
  local me=$BASHPID
  _netns_guard_pid=$( (_netns_guard "$me" </dev/null >/dev/null 2>&1 & echo $!))
}
