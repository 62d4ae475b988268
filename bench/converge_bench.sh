#!/usr/bin/env bash
# The busy-guest benchmark (issue 12): migrations between two network
# namespaces joined by a veth pair with the issue's 1 Gbit/s link (tbf rate
# 1gbit burst 256kb latency 10ms on both ends; created and removed here,
# scripts/netns.sh), of a 1 GiB guest whose vCPUs 0 and 1
# write a 32 MiB hot set each as fast as they can, and (with --light) a third
# vCPU writing random pages at 1000/s. Every migration is verified.
#
#   bench/converge_bench.sh [--light] [--fraction F] [--repeat N] [--out FILE.json] [--plot FILE.png]
#                           [--source-flag FLAG]... [MODE...]
#
# --fraction: the hot share of each vCPU's part of memory (default 0.0625 with
# two vCPUs: 32 MiB each; with --light, scaled so the hot set is the same).
#
# MODE: idle (the same VM idle: one full send), none, auto-converge,
# dirty-limit (auto), postcopy (--postcopy now), postcopy-auto (--postcopy
# auto). Default: the first four. Prints a table (and for post-copy modes a
# second one: requests, latency, background pages); --out keeps every run's
# JSON (source and receiver); --plot draws the guest's pages written per
# second on the target over time for the post-copy runs (matplotlib).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PMLMIG=${PMLMIG:-$ROOT/build/tools/pmlmig}
light=0 repeat=1 out='' fraction=0.0625 plot='' extra=()
modes=()
while [ $# -gt 0 ]; do
  case $1 in
    --light) light=1 ;;
    --fraction) fraction=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --out) out=$2; shift ;;
    --plot) plot=$2; shift ;;
    --source-flag) extra+=("$2"); shift ;;
    idle|none|auto-converge|dirty-limit|postcopy|postcopy-auto) modes+=("$1") ;;
    *) echo "usage: $0 [--light] [--fraction F] [--repeat N] [--out FILE.json] [--plot FILE.png] [idle|none|auto-converge|dirty-limit|postcopy|postcopy-auto]..." >&2; exit 2 ;;
  esac
  shift
done
[ ${#modes[@]} -gt 0 ] || modes=(idle none auto-converge dirty-limit)
[ -x "$PMLMIG" ] || { echo "no $PMLMIG: build first (scripts/setup.sh build)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck source=../scripts/netns.sh
. "$ROOT/scripts/netns.sh"
netns_usable || { echo "SKIP: $netns_reason" >&2; exit 77; }
netns_create
netns_rate 1gbit 256kb 10ms

if [ $light -eq 1 ]; then
  f3=$(python3 -c "print($fraction * 1.5)")  # three shares instead of two: the same hot bytes
  VM=(--memory 1G --vcpus 3 --workload "hotset:fraction=$f3,share=0.9" --vcpu-workload 2=random:rate=1000)
else
  VM=(--memory 1G --vcpus 2 --workload "hotset:fraction=$fraction,share=0.9")
fi
port=29000
results=()
for ((i = 0; i < repeat; i++)); do
  for mode in "${modes[@]}"; do
    port=$((port + 1))
    flags=(--tracker ring --verify "${extra[@]}")
    vm=("${VM[@]}")
    case $mode in
      idle) vm=(--memory 1G --vcpus 2 --workload idle) ;;
      auto-converge) flags+=(--auto-converge) ;;
      dirty-limit) flags+=(--dirty-limit auto) ;;
      postcopy) flags+=(--postcopy now) ;;
      postcopy-auto) flags+=(--postcopy auto) ;;
    esac
    netns_spawn dst "$PMLMIG" receive --listen "$NETNS_DST_ADDR:$port" --insecure --exit-after 2s --wait 180s --json \
      >"$tmp/r.json" 2>"$tmp/r.err"
    rpid=$netns_pid
    sleep 0.5
    set +e
    netns_exec src "$PMLMIG" run "${vm[@]}" "${flags[@]}" --migrate-to "$NETNS_DST_ADDR:$port" \
      --migrate-after 2s --linger 1s --json >"$tmp/s.json" 2>"$tmp/s.err"
    set -e
    wait "$rpid" || true
    python3 - "$mode" "$tmp/s.json" "$tmp/r.json" "$light" >>"$tmp/rows.jsonl" <<'PY'
import json, sys
mode, s, r, light = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), sys.argv[4] == "1"
row = {"mode": mode, "status": s["status"], "total_s": s["total_time_ms"] / 1000, "downtime_ms": s["downtime_ms"],
       "rounds": s["rounds"], "gib_sent": s["transferred_bytes"] / 2**30, "verified": s["verified"],
       "steps": s["throttle"]["steps"], "final_pct": s["throttle"]["final_pct"],
       "final_quota": s["throttle"]["final_quota_pages_per_s"], "error": s["error"],
       "postcopy": s.get("postcopy", {}), "progress": r.get("postcopy_progress", [])}
# The light vCPU's write rate, before the migration and while it ran (the
# guest's own counter), and each vCPU's hold time.
v = s.get("vcpus", [])
if light and len(v) == 3:
    x = v[2]
    before = x["pages_written"] - x["pages_written_during_migration"] - x["pages_written_after_migration"]
    row["light_rate_before"] = before / 2.0  # --migrate-after 2s
    row["light_rate_during"] = x["pages_written_during_migration"] / (s["total_time_ms"] / 1000)
row["held_ms"] = [round(x["held_ms"]) for x in s["throttle"]["vcpus"]]
row["source"] = s
row["receiver"] = r
print(json.dumps(row))
PY
    tail -1 "$tmp/rows.jsonl" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("%-14s %-9s %6.1f s %8s ms %3d rounds %5.2f GiB %s" % (r["mode"], r["status"], r["total_s"], "%.0f" % r["downtime_ms"] if r["downtime_ms"] is not None else "-", r["rounds"], r["gib_sent"], "verified" if r["verified"] else "NOT verified"), file=sys.stderr)'
  done
done
netns_teardown
python3 - "$tmp/rows.jsonl" "${out:-}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
idle = [r["total_s"] for r in rows if r["mode"] == "idle" and r["status"] == "completed"]
one = statistics.median(idle) if idle else None
print("| mode | completed | total s (median) | x one full send | downtime ms | rounds | GiB sent | steps | final throttle | held ms per vCPU | light vCPU pages/s before / during |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for mode in dict.fromkeys(r["mode"] for r in rows):
    rs = [r for r in rows if r["mode"] == mode]
    ok = [r for r in rs if r["status"] == "completed" and r["verified"]]
    t = statistics.median(r["total_s"] for r in rs)
    dt = statistics.median(r["downtime_ms"] for r in ok) if ok else None
    last = rs[-1]
    thr = "%d%%" % last["final_pct"] if last["final_pct"] else ("%.0f pages/s/vCPU" % last["final_quota"] if last["final_quota"] else "-")
    light = "-"
    if "light_rate_before" in last and last["light_rate_before"]:
        light = "%.0f / %.0f" % (last["light_rate_before"], last["light_rate_during"] or 0)
    print("| %s | %d/%d | %.1f | %s | %s | %d | %.2f | %d | %s | %s | %s |" % (
        mode, len(ok), len(rs), t, "%.2f" % (t / one) if one else "-", "%.0f" % dt if dt is not None else "-",
        last["rounds"], last["gib_sent"], last["steps"], thr, last["held_ms"], light))
pc = [r for r in rows if r["postcopy"].get("used")]
if pc:
    print()
    print("| mode | owed pages | post-copy s | requests | latency p50 / p99 / max ms | background pages | duplicates | x one full send |")
    print("|---|---|---|---|---|---|---|---|")
    for r in pc:
        p = r["postcopy"]
        print("| %s | %d | %.2f | %d | %.2f / %.2f / %.2f | %d | %d | %s |" % (
            r["mode"], p["owed_pages"], p["duration_ms"] / 1000, p["requests"], p["latency_ms"]["p50"],
            p["latency_ms"]["p99"], p["latency_ms"]["max"], p["background_pages"], p["duplicate_pages"],
            "%.2f" % (r["total_s"] / one) if one else "-"))
if sys.argv[2]:
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
PY
if [ -n "$plot" ]; then
  json=${out:-$tmp/rows.json}
  [ -n "$out" ] || python3 -c 'import json,sys; json.dump([json.loads(l) for l in open(sys.argv[1])], open(sys.argv[2], "w"))' "$tmp/rows.jsonl" "$json"
  py=python3; [ -x /usr/bin/python3 ] && py=/usr/bin/python3  # Debian's, with python3-matplotlib
  "$py" "$ROOT/bench/postcopy_plot.py" "$json" "$plot" || echo "no plot (python3 with matplotlib needed)" >&2
fi
