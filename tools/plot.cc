#include "plot.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>

namespace pmlmig::tools {
namespace {

// Reads the results JSON of `pmlmig bench dirty`; argv: json png.
constexpr const char* kDirtyPlot = R"PY(
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
doc = json.load(open(sys.argv[1]))
rows = doc["results"]
fig, ax = plt.subplots(figsize=(8, 5))
styles = {"ring": "o-", "bitmap": "s--", "bitmap-clear": "^:"}
for tracker in sorted({r["tracker"] for r in rows}):
    for dirty in sorted({r["dirty_bytes"] for r in rows}):
        pts = sorted((r["guest_bytes"], r["collect_ms"]) for r in rows
                     if r["tracker"] == tracker and r["dirty_bytes"] == dirty)
        if not pts:
            continue
        ax.plot([p[0] / 2**30 for p in pts], [p[1] for p in pts], styles.get(tracker, "x-"),
                label="%s, %d MiB dirty" % (tracker, dirty // 2**20))
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("guest memory (GiB)")
ax.set_ylabel("time to collect one round (ms, wall)")
ax.set_title("Dirty-page collection: KVM dirty ring vs dirty bitmap\n" + doc.get("machine", ""), fontsize=9)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
)PY";

// Reads the results JSON of `pmlmig bench migrate`; argv: json png.
constexpr const char* kMigratePlot = R"PY(
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
doc = json.load(open(sys.argv[1]))
rows = [r for r in doc["results"] if r["scenario"] == "hotset"]
fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 3, 2]})
for r in rows:
    m = r["migration"]
    rounds = m["round_stats"]
    if not rounds:
        continue
    label = "%d GiB, %d vCPUs, %d stream(s), %s, limit %d ms: %s, downtime %s ms" % (
        r["guest_bytes"] // 2**30, r["vcpus"], r["streams"], r["compress"] + "/" + r.get("data_path", "grpc"),
        doc["downtime_limit_ms"], m["status"],
        "%.1f" % m["downtime_ms"] if m["downtime_ms"] is not None else "-")
    x = [s["round"] for s in rounds]
    line, = top.plot(x, [max(s["dirty_pages"], 0.5) for s in rounds], "o-", markersize=4, label=label)
    color = line.get_color()
    mid.plot(x, [s["bandwidth_mbps"] / 8000 for s in rounds], "o-", markersize=4, color=color)
    batches = r.get("round_batches", [])
    if len(batches) == len(rounds):
        bottom.plot(x, [s["pages"] / b if b else 0 for s, b in zip(rounds, batches)], "o-", markersize=4, color=color)
    if m["status"] == "completed":
        # The last round is the stop-and-copy one, sent with the vCPUs paused.
        top.plot([x[-1]], [max(rounds[-1]["dirty_pages"], 0.5)], "s", color=color, markersize=11, fillstyle="none")
top.set_yscale("log")
top.set_ylabel("dirty pages sent (4 KiB)")
top.set_title("Live migration of a hotset guest, per round (square: stop-and-copy)\n" + doc.get("machine", ""),
              fontsize=9)
top.grid(True, which="both", alpha=0.3)
if rows:
    top.legend(fontsize=7)
mid.set_ylabel("round bandwidth (GB/s)")
mid.grid(True, alpha=0.3)
baselines = doc.get("baseline", [])
for b in baselines:
    mid.axhline(b["gbps"], linestyle=":", color="gray")
if baselines:
    mid.annotate("raw loopback TCP: " + ", ".join("%g GiB %.2f GB/s" % (b["bytes"] / 2**30, b["gbps"])
                                                  for b in baselines),
                 (0, max(b["gbps"] for b in baselines)), fontsize=7, color="gray", va="bottom")
mid.set_ylim(0, max([b["gbps"] for b in doc.get("baseline", [])] + [mid.get_ylim()[1]]) * 1.1)
bottom.set_yscale("log")
bottom.set_ylabel("pages per batch")
bottom.set_xlabel("round (0: all memory)")
bottom.grid(True, which="both", alpha=0.3)
bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
)PY";

// Reads the results JSON of `pmlmig bench migrate` run with several stream
// counts; argv: json png.
constexpr const char* kStreamsPlot = R"PY(
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
doc = json.load(open(sys.argv[1]))
fig, ax = plt.subplots(figsize=(8, 5))
sizes = sorted({c["guest_bytes"] for c in doc["comparison"]})
dashes = ["-", "--", "-.", ":"]
def gib(b):
    return "%g GiB" % (b / 2**30) if b >= 2**30 else "%d MiB" % (b // 2**20)
for k, size in enumerate(sizes):
    ls = dashes[k % len(dashes)]
    tag = "" if len(sizes) == 1 else ", " + gib(size)
    def cfg_of(c):
        return (c["scenario"], c["compress"], c["verify"], c.get("data_path", ""))
    paths = {cfg_of(c)[3] for c in doc["comparison"]}
    for cfg in sorted({cfg_of(c) for c in doc["comparison"]}):
        pts = sorted((c["streams"], c["pmlmig_gbps"]) for c in doc["comparison"]
                     if c["guest_bytes"] == size and cfg_of(c) == cfg and c["pmlmig_gbps"] is not None)
        if pts:
            label = "pmlmig " + cfg[0] + ("" if cfg[1] == "none" else ", " + cfg[1]) + \
                    ("" if cfg[2] == "off" else ", verify " + cfg[2]) + \
                    ("" if len(paths) == 1 else ", " + cfg[3] + " data") + tag
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" + ls, label=label)
    q = [m for m in doc["qemu"]["medians"] if m["guest_bytes"] == size]
    pts = sorted((m["channels"], m["gbps"]) for m in q if m["multifd"])
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s" + ls, color="tab:red", label="QEMU multifd" + tag)
    for m in q:
        if not m["multifd"]:
            ax.axhline(m["gbps"], linestyle=ls, color="tab:red", alpha=0.4, label="QEMU one channel" + tag)
    for key, name, color in (("fresh_memory_baseline", "(b) raw TCP into fresh memfd", "black"),
                             ("baseline", "(a) raw TCP into reused buffer", "gray")):
        pts = sorted((b["connections"], b["gbps"]) for b in doc.get(key, []) if b["bytes"] == size)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "^" + ls, color=color, label=name + tag)
ax.set_xlabel("streams / channels / TCP connections")
ax.set_ylabel("GB/s (10^9 bytes of guest memory per second)")
ax.set_xticks(sorted({c["streams"] for c in doc["comparison"]}))
ax.set_ylim(bottom=0)
ax.set_title("Migration throughput against stream count, medians of %d interleaved runs\n%s" %
             (doc.get("repeat", 1), doc.get("machine", "")), fontsize=9)
ax.grid(True, alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
)PY";

Status RunPython(const char* script, const std::string& a, const std::string& b) {
  // Debian's python3 (with python3-matplotlib), even when another python3
  // (pyenv, a venv) comes first in PATH.
  const char* python = ::access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
  const std::string cmd = std::string(python) + " - '" + a + "' '" + b + "'";
  for (char c : a + b) {
    if (c == '\'') return InvalidArgument("plot: file names must not contain a quote");
  }
  FILE* p = ::popen(cmd.c_str(), "w");
  if (p == nullptr) return Status::FromErrno(errno, "popen python3");
  std::fputs(script, p);
  const int rc = ::pclose(p);
  if (rc != 0) {
    return Unavailable("plot: python3 with matplotlib failed (exit " + std::to_string(WEXITSTATUS(rc)) +
                       "); install python3-matplotlib (scripts/setup.sh does)");
  }
  return Status::Ok();
}

}  // namespace

Status PlotDirtyBench(const std::string& json_path, const std::string& png_path) {
  return RunPython(kDirtyPlot, json_path, png_path);
}

Status PlotMigrateBench(const std::string& json_path, const std::string& png_path) {
  return RunPython(kMigratePlot, json_path, png_path);
}

Status PlotMigrateStreams(const std::string& json_path, const std::string& png_path) {
  return RunPython(kStreamsPlot, json_path, png_path);
}

std::string StreamsPlotPath(const std::string& png_path) {
  const std::string ext = ".png";
  if (png_path.size() > ext.size() && png_path.compare(png_path.size() - ext.size(), ext.size(), ext) == 0) {
    return png_path.substr(0, png_path.size() - ext.size()) + "-streams.png";
  }
  return png_path + "-streams.png";
}

}  // namespace pmlmig::tools
