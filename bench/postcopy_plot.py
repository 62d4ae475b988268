#!/usr/bin/env python3
"""The guest's progress on the target during post-copy, from the JSON of
bench/converge_bench.sh --out: pages written per second (solid) and owed
pages still missing (dashed) against time since the VM resumed.

    python3 bench/postcopy_plot.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [r for r in json.load(open(sys.argv[1])) if r.get("postcopy", {}).get("used")]
if not rows:
    sys.exit("no post-copy runs in " + sys.argv[1])
fig, ax = plt.subplots(figsize=(8, 4))
ax2 = ax.twinx()
seen = set()
for r in rows:
    if r["mode"] in seen:  # the first run of each mode
        continue
    seen.add(r["mode"])
    pts = r["progress"]
    if len(pts) < 2:
        continue
    t = [(a[0] + b[0]) / 2000 for a, b in zip(pts, pts[1:])]
    rate = [(b[1] - a[1]) / ((b[0] - a[0]) / 1000) for a, b in zip(pts, pts[1:])]
    line, = ax.plot(t, rate, label="%s: guest pages written/s" % r["mode"])
    ax2.plot([a[0] / 1000 for a in pts], [a[2] for a in pts], "--", color=line.get_color(),
             label="%s: owed pages still missing" % r["mode"])
ax.set_xlabel("seconds since the VM resumed on the target")
ax.set_ylabel("guest pages written per second")
ax2.set_ylabel("owed pages still missing")
h1, l1 = ax.get_legend_handles_labels()
h2, l2 = ax2.get_legend_handles_labels()
ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
ax.set_title("Guest progress on the target during post-copy")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
