#!/usr/bin/env bash
# End-to-end tests of the pmlmig command line. $PMLMIG is the binary.
set -u
PMLMIG=${PMLMIG:-build/tools/pmlmig}
fails=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

# expect_error "<what>" <expected exit> "<substring of the one-line error>" args...
expect_error() {
  local what=$1 code=$2 msg=$3
  shift 3
  "$PMLMIG" "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  local lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -ne "$code" ]; then fail "$what: exit $rc, expected $code ($(cat "$tmp/err"))"; return; fi
  if ! grep -qF -- "$msg" "$tmp/err"; then fail "$what: stderr lacks '$msg': $(cat "$tmp/err")"; return; fi
  if [ "$lines" -ne 1 ]; then fail "$what: expected one error line, got $lines: $(cat "$tmp/err")"; return; fi
  pass "$what"
}

# Help for every command.
for cmd in "" probe run; do
  if "$PMLMIG" $cmd --help >"$tmp/out" 2>&1 && grep -q "Usage" "$tmp/out"; then pass "help '$cmd'"; else fail "help '$cmd'"; fi
done

# --version names the release this tree builds (not a number written by hand) and the wire protocol.
release=$(sed -n 's/^project(pmlmig VERSION \([0-9.]*\).*/\1/p' "$(dirname "$0")/../../CMakeLists.txt")
if [ -n "$release" ] && "$PMLMIG" --version 2>&1 | grep -qx "pmlmig $release (wire protocol [0-9]*)"; then
  pass "--version: $release"
else
  fail "--version: '$("$PMLMIG" --version 2>&1)', expected pmlmig $release"
fi

expect_error "no command" 2 "no command given (commands: probe, run, receive, migrate, snapshot, status, cancel, restore, bench; see 'pmlmig --help')"
expect_error "unknown command" 2 "unknown command 'frobnicate' (commands: probe, run, receive, migrate, snapshot, status, cancel, restore, bench; see 'pmlmig --help')" frobnicate
expect_error "unknown command before flags" 2 "unknown command 'frobnicate'" frobnicate --memory 1G
expect_error "no bench command" 2 "no bench command given (commands: dirty, migrate; see 'pmlmig bench --help')" bench
expect_error "unknown bench command" 2 "unknown bench command 'frobnicate' (commands: dirty, migrate; see 'pmlmig bench --help')" bench frobnicate
# Addresses: gRPC would take port 99999 modulo 65536 (34463), an empty port for 443.
expect_error "listen port too large" 2 "--listen \"127.0.0.1:99999\": port 99999 is outside 0..65535" receive --wait 1s --listen 127.0.0.1:99999
expect_error "listen port empty" 2 "--listen \"127.0.0.1:\": no port after the ':'" receive --wait 1s --listen 127.0.0.1:
expect_error "listen port not a number" 2 "port 'http' is not a decimal number" receive --wait 1s --listen 127.0.0.1:http
expect_error "listen host empty" 2 "no host before the port" receive --wait 1s --listen :7400
expect_error "listen without port" 2 "no port (expected HOST:PORT)" receive --wait 1s --listen 127.0.0.1
expect_error "target port too large" 2 "migration target \"127.0.0.1:99999\": port 99999 is outside 0..65535" run --migrate-to 127.0.0.1:99999
expect_error "target port 0" 2 "migration target \"127.0.0.1:0\": port 0" run --migrate-to 127.0.0.1:0
expect_error "unknown flag" 2 "--bogus" run --bogus
expect_error "bad size" 2 "invalid size '12Q'" run --memory 12Q
expect_error "size not multiple of 2M" 2 "multiple of 2 MiB" run --memory 3M
expect_error "size too large" 2 "outside the supported range" run --memory 4T --fill zero
expect_error "size too small" 2 "outside the supported range" run --memory 1M
expect_error "bad vcpus" 2 "--vcpus" run --vcpus 0
expect_error "vcpus not a number" 2 "--vcpus" run --vcpus two
expect_error "bad workload" 2 "unknown workload 'walk'" run --workload walk
expect_error "bad hotset" 2 "fraction must be" run --workload hotset:fraction=7
expect_error "bad fill" 2 "invalid fill 'ones'" run --fill ones
# --vcpu-workload N=SPEC: each mistake named, before anything starts.
expect_error "vcpu-workload without =" 2 "--vcpu-workload: '2random' has no '=' (expected N=SPEC" run --vcpus 3 --vcpu-workload 2random
expect_error "vcpu-workload N not a number" 2 "--vcpu-workload: 'two=random': vCPU 'two' is not a number" run --vcpus 3 --vcpu-workload two=random
expect_error "vcpu-workload N too large" 2 "--vcpu-workload: '3=random': vCPU 3 does not exist (the VM has 3 vCPUs, 0..2)" run --vcpus 3 --vcpu-workload 3=random
expect_error "vcpu-workload N beyond default vcpus" 2 "vCPU 1 does not exist (the VM has 1 vCPU, 0..0)" run --vcpu-workload 1=random
expect_error "vcpu-workload same N twice" 2 "--vcpu-workload: vCPU 1 is given twice ('1=random' and '1=seq')" run --vcpus 3 --vcpu-workload 1=random --vcpu-workload 1=seq
expect_error "vcpu-workload bad spec" 2 "--vcpu-workload: vCPU 2: invalid workload 'walk': unknown workload 'walk'" run --vcpus 3 --vcpu-workload 2=walk
expect_error "vcpu-workload bad rate" 2 "--vcpu-workload: vCPU 2: invalid workload 'random:rate=0': rate must be" run --vcpus 3 --vcpu-workload 2=random:rate=0
if "$PMLMIG" run --help 2>&1 | grep -q -- "--vcpu-workload"; then pass "help 'run' explains --vcpu-workload"; else fail "help 'run' lacks --vcpu-workload"; fi
expect_error "bad duration" 2 "invalid duration '5 parsecs'" run --duration "5 parsecs"
expect_error "random fill beyond host memory" 2 "use --fill zero" run --memory 200G
expect_error "bad tracker" 2 "unknown tracker 'pml'" run --tracker pml
expect_error "ring entries without ring" 2 "--ring-entries needs --tracker ring" run --tracker bitmap --ring-entries 4096
expect_error "missing kvm device" 1 "/nonexistent/kvm" probe --device /nonexistent/kvm
# bench migrate: every flag is checked before anything runs.
expect_error "bench migrate --qemu without --peers" 2 "--qemu needs --peers" bench migrate --qemu /usr/bin/true
expect_error "bench migrate --qemu-timeout 0" 2 "--qemu-timeout must be at least 1" bench migrate --peers --qemu-timeout 0
expect_error "bench migrate --repeat 0" 2 "--repeat" bench migrate --repeat 0
expect_error "bench migrate --streams 0" 2 "--streams: '0' is not a number from 1 to" bench migrate --streams 1,0
expect_error "bench migrate --streams word" 2 "--streams: 'two' is not a number" bench migrate --streams two
expect_error "bench migrate --scenarios" 2 "--scenarios: 'busy' is not untouched, random or hotset" bench migrate --scenarios busy
expect_error "bench migrate --sizes" 2 "--sizes: memory size 3 MiB is not a multiple of 2 MiB" bench migrate --sizes 3M
expect_error "bench migrate --baseline-runs 0" 2 "--baseline-runs must be at least 1" bench migrate --baseline-runs 0
expect_error "bench migrate --uffd-fill" 2 "--uffd-fill: 'maybe' is not on or off" bench migrate --uffd-fill on,maybe
expect_error "bench migrate --in-place" 2 "--in-place: 'maybe' is not on or off" bench migrate --in-place maybe
expect_error "bench migrate --paused" 2 "--paused: 'yes' is not on or off" bench migrate --paused yes
expect_error "bench migrate --peers too large" 2 "use smaller --sizes" bench migrate --peers --scenarios untouched --sizes 200G

if [ ! -w /dev/kvm ]; then
  echo "SKIP: KVM end-to-end checks (/dev/kvm absent or not writable)"
  exit $((fails > 0))
fi

# probe --json: the documented keys.
if "$PMLMIG" probe --json >"$tmp/probe.json" 2>"$tmp/err" &&
   python3 - "$tmp/probe.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
for k, t in [("kvm", bool), ("api_version", int), ("dirty_ring_max_entries", int), ("dirty_ring_acq_rel", bool),
             ("manual_dirty_log_protect2", int), ("dirty_ring_with_bitmap", bool), ("cpu_vendor", str),
             ("pagemap_scan", bool), ("uffd_wp_async", bool)]:
    assert isinstance(j[k], t), k
assert "pml" in j and j["pml"] in (True, False, None)
assert j["kvm"] is True and j["api_version"] == 12
PY
then pass "probe --json"; else fail "probe --json: $(cat "$tmp/probe.json" "$tmp/err")"; fi

# run --json: both vCPUs write; the summary is one JSON object on stdout.
if "$PMLMIG" run --memory 256M --vcpus 2 --workload random --duration 2s --json --check >"$tmp/run.json" 2>"$tmp/err" &&
   python3 - "$tmp/run.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["status"] == "completed", j
assert j["duration_s"] > 1.5 and j["pages_written"] > 0 and j["pages_per_second"] > 0
assert len(j["vcpus"]) == 2
for v in j["vcpus"]:
    assert v["pages_written"] > 0 and v["pages_per_second"] > 0, v
assert j["check"]["ok"] is True and j["check"]["pages_stamped"] > 0
assert j["workload"] == "random" and j["vcpu_workloads"] == {}, j
PY
then pass "run random 2 vCPUs --json --check"; else fail "run random: $(cat "$tmp/run.json" "$tmp/err")"; fi

# Per-vCPU workloads: vCPU 2 paced at 1000 pages/s, the other two on a hot set at full speed.
if "$PMLMIG" run --memory 64M --vcpus 3 --workload hotset:fraction=0.0625,share=0.9 --vcpu-workload 2=random:rate=1000 \
     --duration 2s --json --check >"$tmp/per.json" 2>"$tmp/err" &&
   grep -qF "workload hotset:fraction=0.0625,share=0.9 (vcpu 2: random:rate=1000)" "$tmp/err" &&
   python3 - "$tmp/per.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["status"] == "completed", j
assert j["workload"] == "hotset:fraction=0.0625,share=0.9", j
assert j["vcpu_workloads"] == {"2": "random:rate=1000"}, j
v = j["vcpus"]
assert len(v) == 3 and all(x["pages_written"] > 0 for x in v), v
assert 300 < v[2]["pages_per_second"] < 2000, v[2]
assert v[0]["pages_written"] > 3 * v[2]["pages_written"] and v[1]["pages_written"] > 3 * v[2]["pages_written"], v
assert j["check"]["ok"] is True, j["check"]
print("   vcpu 2: %.0f pages/s; vcpus 0, 1: %.0f, %.0f" % (v[2]["pages_per_second"], v[0]["pages_per_second"], v[1]["pages_per_second"]))
PY
then pass "run --vcpus 3 --vcpu-workload 2=random:rate=1000 --json"; else fail "run --vcpu-workload: $(cat "$tmp/per.json" "$tmp/err")"; fi

# Every tracker collects while the guest runs; the JSON says what it collected.
for t in ring bitmap bitmap-clear; do
  if "$PMLMIG" run --memory 128M --vcpus 2 --workload random --duration 1500ms --tracker $t --json --check >"$tmp/t.json" 2>"$tmp/err" &&
     python3 - "$tmp/t.json" "$t" <<'PY2'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["status"] == "completed" and j["tracker"] == sys.argv[2], j
assert j["pages_collected"] > 0 and j["collect_ms_total"] > 0 and j["collections"] >= 2, j
assert j["check"]["ok"] is True
assert j["setup_s"] > 0 and (j["ring_entries"] > 0) == (sys.argv[2] == "ring"), j
for k in ("ring_full_exits", "ring_overflows", "peak_rss_bytes", "memory_bytes", "fill", "error"):
    assert k in j, k
PY2
  then pass "run --tracker $t"; else fail "run --tracker $t: $(cat "$tmp/t.json" "$tmp/err")"; fi
done
expect_error "ring entries not a power of two" 2 "power of two from 256" run --tracker ring --ring-entries 1000
expect_error "ring entries too small" 2 "power of two from 256" run --tracker ring --ring-entries 128

# idle writes nothing.
if "$PMLMIG" run --memory 64M --vcpus 1 --workload idle --duration 500ms --json >"$tmp/idle.json" 2>"$tmp/err" &&
   python3 -c "import json,sys; j=json.load(open('$tmp/idle.json')); assert j['pages_written']==0 and j['vcpus'][0]['pages_written']==0, j"
then pass "run idle"; else fail "run idle: $(cat "$tmp/idle.json" "$tmp/err")"; fi

# Ctrl-C stops cleanly and still prints the summary.
"$PMLMIG" run --memory 64M --workload seq --duration 0 --json >"$tmp/int.json" 2>"$tmp/err" &
pid=$!
sleep 1.5
kill -INT $pid
wait $pid
rc=$?
if [ "$rc" -eq 130 ] && python3 -c "import json; j=json.load(open('$tmp/int.json')); assert j['status']=='interrupted' and j['pages_written']>0, j"
then pass "Ctrl-C prints the summary"; else fail "Ctrl-C: rc=$rc $(cat "$tmp/int.json" "$tmp/err")"; fi

# A 64 GiB idle guest costs little resident memory.
if "$PMLMIG" run --memory 64G --vcpus 1 --workload idle --fill zero --duration 2s --json >"$tmp/big.json" 2>"$tmp/err" &&
   python3 -c "import json; j=json.load(open('$tmp/big.json')); print('64G idle peak RSS', j['peak_rss_bytes']//(1<<20), 'MiB'); assert j['peak_rss_bytes'] < 256*(1<<20), j"
then pass "64G idle under 256 MiB RSS"; else fail "64G idle: $(cat "$tmp/big.json" "$tmp/err")"; fi

# bench_ab <what> <switch> <bytes> <label> <flags...>: a 2-stream migration of a
# 64 MiB random guest with the data-path switch (a JSON field of each row) on,
# then off (rows say +<label>); on moves 60-64 MiB that way (<bytes>), off none.
bench_ab() {
  local what=$1 switch=$2 bytes=$3 label=$4
  shift 4
  if "$PMLMIG" bench migrate --repeat 1 --baseline-runs 1 --sizes 64M --scenarios random --streams 2 \
       --migrate-after 100ms --json "$tmp/ab.json" "$@" >"$tmp/ab.out" 2>"$tmp/err" &&
     python3 - "$tmp/ab.json" "$switch" "$bytes" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
switch, count, label = sys.argv[2:5]
assert [x["data_path"] for x in r] == ["direct", "direct+" + label], r
assert all(x["migration"]["status"] == "completed" for x in r), r
on, off = r
assert on[switch] and not off[switch], r
assert 60 << 20 <= on[count] <= 64 << 20 and off[count] == 0, (on, off)
assert on["uffd_zero_faults"] == 0, on
PY
  then pass "$what"; else fail "$what: $(cat "$tmp/ab.out" "$tmp/err")"; fi
}
# Two streams place round 0 into fresh memory with userfaultfd (the default),
# and copy it with --uffd-fill off.
bench_ab "bench migrate: two streams fill fresh memory with userfaultfd, and copy it with --uffd-fill off" \
  uffd_fill uffd_filled_bytes nouffd --uffd-fill on,off
# Into resident memory the direct streams read every batch straight into
# guest memory (the default), and stage and copy it with --in-place off.
bench_ab "bench migrate: direct streams read round 0 in place into resident memory, and stage it with --in-place off" \
  read_in_place in_place_bytes staged --in-place on,off --prefault-target

# --paused off,on: the same guest migrated live (round 0, then the final
# round), then paused from the start (every page once, in one round).
if "$PMLMIG" bench migrate --repeat 1 --baseline-runs 1 --sizes 64M --scenarios random --streams 2 \
     --migrate-after 100ms --paused off,on --json "$tmp/paused.json" >"$tmp/paused.out" 2>"$tmp/err" &&
   python3 - "$tmp/paused.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
assert [x["data_path"] for x in r] == ["direct", "direct+paused"], r
assert all(x["migration"]["status"] == "completed" for x in r), r
live, paused = r
assert not live["paused"] and paused["paused"], r
assert live["migration"]["rounds"] >= 2 and paused["migration"]["rounds"] == 1, (live["migration"], paused["migration"])
assert paused["round0_cpu_s_per_gb"] > 0 and paused["round0_gbps"] > 0, paused
assert paused["migration"]["normal_pages"] >= 15 << 10, paused["migration"]
PY
then pass "bench migrate --paused off,on: live, then paused in one round"; else fail "bench migrate --paused: $(cat "$tmp/paused.out" "$tmp/err")"; fi

# bench migrate --peers, small: the baselines (a) and (b), one migration and
# the comparison; QEMU is skipped with a reason when it is not on PATH (as in
# CI), and runs (one channel and multifd) when it is.
bench_smoke() {  # bench_smoke <what> <expect qemu: ran|skipped> [env...]
  local what=$1 qemu=$2
  shift 2
  if env "$@" "$PMLMIG" bench migrate --peers --repeat 1 --baseline-runs 1 --sizes 64M --scenarios random --streams 1 \
       --migrate-after 100ms --json "$tmp/bench.json" >"$tmp/bench.out" 2>"$tmp/err" &&
     python3 - "$tmp/bench.json" "$qemu" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["peers"] is True and j["repeat"] == 1, j
for key in ("baseline", "fresh_memory_baseline"):
    b = j[key]
    assert len(b) == 1 and b[0]["connections"] == 1 and b[0]["gbps"] > 0 and b[0]["cpu_s_per_gb"] > 0, b
assert len(j["results"]) == 1 and j["results"][0]["migration"]["status"] == "completed", j["results"]
c = j["comparison"][0]
assert c["pmlmig_gbps"] > 0 and c["fresh_memory_gbps"] > 0 and c["ratio_to_fresh_memory"] > 0, c
assert c["pmlmig_cpu_s_per_gb"] > 0 and c["round0_ratio_to_reused_buffer"] > 0, c
assert 0 < c["pmlmig_round0_cpu_s_per_gb"] and j["results"][0]["round0_cpu_s_per_gb"] > 0, c
q = j["qemu"]
assert q["status"] == sys.argv[2], q
if q["status"] == "skipped":
    assert q["runs"] == [] and c["qemu_multifd_ms"] is None and c["x_faster_than_qemu_multifd"] is None, (q, c)
else:
    assert sorted(r["multifd"] for r in q["runs"]) == [False, True], q
    for r in q["runs"]:
        # QEMU's own total-time against the same interval polled here.
        assert 0 < r["total_ms"] <= r["wall_ms"] + 5 and r["wall_ms"] < r["total_ms"] + 500, r
        assert r["transferred_bytes"] >= 64 << 20 and r["zero_pages"] < 1024, r
        assert r["source_cpu_ms"] > 0 and r["target_cpu_ms"] > 0, r
    assert c["x_faster_than_qemu_multifd"] > 0 and c["qemu_multifd_cpu_s_per_gb"] > 0, c
PY
  then pass "bench migrate --peers ($what)"; else fail "bench migrate --peers ($what): $(cat "$tmp/err")"; fi
}
bench_smoke "no QEMU" skipped PATH=/nonexistent
if grep -qF "qemu: skipped (qemu-system-x86_64 not installed)" "$tmp/err"; then pass "bench migrate says QEMU was skipped"
else fail "bench migrate: no 'qemu: skipped' line: $(cat "$tmp/err")"; fi
if command -v qemu-system-x86_64 >/dev/null; then bench_smoke "QEMU" ran; else echo "SKIP: bench migrate against QEMU (not installed)"; fi
# A QEMU that does not start fails the benchmark clearly and leaves nothing in /dev/shm
# (its files are named after the benchmark's pid).
"$PMLMIG" bench migrate --peers --repeat 1 --baseline-runs 1 --sizes 64M --scenarios random --migrate-after 100ms \
  --qemu /bin/false >"$tmp/out" 2>"$tmp/err" &
pid=$!
wait $pid
rc=$?
if [ "$rc" -eq 1 ] && grep -qF "QEMU source (-accel tcg): /bin/false exited with status 1 at start" "$tmp/err" &&
   ! compgen -G "/dev/shm/pmlmig-qemu-$pid-*" >/dev/null
then pass "bench migrate --qemu that does not start"; else fail "bench migrate --qemu /bin/false: rc=$rc $(cat "$tmp/err")"; fi

echo "cli_test: $fails failure(s)"
exit $((fails > 0))
