#!/usr/bin/env python3
"""Moves without a network copy, measured (issue 13; docs/BENCHMARKS.md, "Handover and snapshots").

  handover   `pmlmig run --migrate-to unix:S --local` into `pmlmig receive --listen unix:S`:
             the downtime for each size, and in the same run a loopback network migration of
             the same VM (sizes whose two copies fit in the host's memory).
  snapshot   `pmlmig run --snapshot-to F` of a random-content guest (the VM paused for the
             whole write), interleaved with the baseline: writing as many bytes sequentially to
             the same file system with dd (O_DIRECT and buffered, each with fdatasync). And an
             untouched guest's snapshot: time and allocated size.
  restore    `pmlmig restore F` eager (read GB/s against dd reading the same file, O_DIRECT)
             and lazy (time until the guest runs, until all memory is in).

Every figure is the median of --repeat runs; every run is kept in the JSON (--out).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_size(text):
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_json(cmd, timeout=900):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    try:
        return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr
    except (ValueError, IndexError):
        return p.returncode, None, p.stderr


def dd(args):
    t = time.monotonic()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.monotonic() - t


def read_into_fresh_memory(path, nbytes):
    """Seconds to read nbytes of `path` sequentially (O_DIRECT, 4 MiB) into a new memfd mapping of that
    size that nothing has touched: the limit of any restore on a host where fresh memory is expensive."""
    import mmap
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    mfd = os.memfd_create("fresh")
    os.ftruncate(mfd, nbytes)
    mm = mmap.mmap(mfd, nbytes)
    view = memoryview(mm)
    step = 4 << 20
    t = time.monotonic()
    for off in range(0, nbytes, step):
        os.preadv(fd, [view[off:off + min(step, nbytes - off)]], off)
    seconds = time.monotonic() - t
    view.release()
    mm.close()
    os.close(mfd)
    os.close(fd)
    return seconds


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def migrate_once(pmlmig, size, tmp, local):
    """One handover (local) or loopback migration of a random-content guest; the source's JSON."""
    addr = "unix:" + os.path.join(tmp, "h.sock") if local else "127.0.0.1:%d" % free_port()
    if local and os.path.exists(addr[5:]):
        os.unlink(addr[5:])
    recv = subprocess.Popen([pmlmig, "receive", "--listen", addr, "--exit-after", "500ms", "--wait", "600s",
                             "--attempts", "1", "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)
    cmd = [pmlmig, "run", "--memory", size, "--vcpus", "2", "--workload", "random", "--migrate-to", addr,
           "--migrate-after", "1s", "--json", "-q"]
    if local:
        cmd.append("--local")
    rc, src, err = run_json(cmd)
    out, rerr = recv.communicate(timeout=600)
    if rc != 0 or src is None or src.get("status") != "completed":
        raise RuntimeError("%s %s failed: rc %d %s | %s" % ("handover" if local else "migration", size, rc,
                                                          err[-400:], rerr[-400:]))
    return {"downtime_ms": src["downtime_ms"], "total_ms": src["total_time_ms"], "setup_ms": src["setup_time_ms"],
            "target_restore_ms": src["target_restore_ms"], "transferred_bytes": src["transferred_bytes"],
            "pages_written_at_target": json.loads(out.strip().splitlines()[-1]).get("pages_written_after_resume")}


def bench_handover(pmlmig, sizes, repeat, tmp):
    rows = []
    for size in sizes:
        bytes_ = parse_size(size)
        network = 2 * bytes_ < mem_available() * 0.8
        runs = {"handover": [], "network": []}
        for _ in range(repeat):
            runs["handover"].append(migrate_once(pmlmig, size, tmp, True))
            if network:
                runs["network"].append(migrate_once(pmlmig, size, tmp, False))
        row = {"size": size, "runs": runs,
               "handover_downtime_ms": statistics.median(r["downtime_ms"] for r in runs["handover"]),
               "handover_total_ms": statistics.median(r["total_ms"] for r in runs["handover"])}
        if network:
            row["network_downtime_ms"] = statistics.median(r["downtime_ms"] for r in runs["network"])
            row["network_total_ms"] = statistics.median(r["total_ms"] for r in runs["network"])
        else:
            row["network_skipped"] = "two copies of %s do not fit in this host's memory" % size
        print("handover %s: downtime %.1f ms, total %.0f ms%s" % (
            size, row["handover_downtime_ms"], row["handover_total_ms"],
            "; network: downtime %.1f ms, total %.0f ms" % (row["network_downtime_ms"], row["network_total_ms"])
            if network else "; network skipped"), flush=True)
        rows.append(row)
    return rows


def snapshot_once(pmlmig, size, path, fill="random", live=False):
    if os.path.exists(path):
        os.unlink(path)
    cmd = [pmlmig, "run", "--memory", size, "--vcpus", "1", "--workload", "idle", "--fill", fill,
           "--snapshot-to", path, "--migrate-after", "200ms", "--duration", "300ms", "--json", "-q"]
    if live:
        cmd.append("--live")
    rc, d, err = run_json(cmd)
    if rc != 0 or d is None:
        raise RuntimeError("snapshot %s failed: %s" % (size, err[-400:]))
    return {"total_ms": d["total_time_ms"], "write_ms": sum(r["duration_ms"] for r in d["round_stats"]),
            "finish_ms": d["target_restore_ms"], "file_bytes": d["snapshot"]["file_bytes"],
            "allocated_bytes": d["snapshot"]["allocated_bytes"]}


def restore_once(pmlmig, path, lazy):
    cmd = [pmlmig, "restore", path, "--exit-after", "200ms", "--json", "-q"] + (["--lazy"] if lazy else [])
    rc, d, err = run_json(cmd)
    if rc != 0 or d is None or d.get("status") != "completed":
        raise RuntimeError("restore failed: %s %s" % (err[-400:], d))
    return {k: d[k] for k in ("running_ms", "complete_ms", "load_ms", "bytes_read", "read_gb_per_s", "faults",
                              "verified")}


def bench_snapshot(pmlmig, size, repeat, tmp):
    bytes_ = parse_size(size)
    count = bytes_ >> 22  # 4 MiB blocks
    snap = os.path.join(tmp, "bench.snap")
    seq = os.path.join(tmp, "seq.out")
    runs = []
    for _ in range(repeat):
        r = {"dd_direct_s": dd(["if=/dev/zero", "of=" + seq, "bs=4M", "count=%d" % count, "oflag=direct",
                                "conv=fdatasync"])}
        os.unlink(seq)
        r["dd_buffered_s"] = dd(["if=/dev/zero", "of=" + seq, "bs=4M", "count=%d" % count, "conv=fdatasync"])
        os.unlink(seq)
        r["snapshot"] = snapshot_once(pmlmig, size, snap)
        r["dd_read_direct_s"] = dd(["if=" + snap, "of=/dev/null", "bs=4M", "iflag=direct"])
        r["read_fresh_s"] = read_into_fresh_memory(snap, bytes_)
        r["restore_eager"] = restore_once(pmlmig, snap, False)
        r["restore_lazy"] = restore_once(pmlmig, snap, True)
        runs.append(r)
    med = lambda f: statistics.median(f(r) for r in runs)
    seq_write = min(med(lambda r: r["dd_direct_s"]), med(lambda r: r["dd_buffered_s"]))
    row = {"size": size, "runs": runs,
           "snapshot_s": med(lambda r: r["snapshot"]["total_ms"] / 1e3),
           "seq_write_direct_s": med(lambda r: r["dd_direct_s"]),
           "seq_write_buffered_s": med(lambda r: r["dd_buffered_s"]),
           "seq_read_direct_s": med(lambda r: r["dd_read_direct_s"]),
           "seq_read_fresh_s": med(lambda r: r["read_fresh_s"]),
           "eager_load_s": med(lambda r: r["restore_eager"]["load_ms"] / 1e3),
           "lazy_running_ms": med(lambda r: r["restore_lazy"]["running_ms"]),
           "lazy_complete_ms": med(lambda r: r["restore_lazy"]["complete_ms"])}
    row["snapshot_vs_seq_write"] = seq_write / row["snapshot_s"]
    row["eager_vs_seq_read"] = row["seq_read_direct_s"] / row["eager_load_s"]
    row["eager_vs_fresh_read"] = row["seq_read_fresh_s"] / row["eager_load_s"]
    print("snapshot %s: %.2f s (sequential write: direct %.2f s, buffered %.2f s) = %.0f%% of the faster; "
          "eager restore %.2f s vs sequential read %.2f s = %.0f%% (into fresh memory %.2f s = %.0f%%); "
          "lazy: running after %.1f ms, all in after %.0f ms"
          % (size, row["snapshot_s"], row["seq_write_direct_s"], row["seq_write_buffered_s"],
             100 * row["snapshot_vs_seq_write"], row["eager_load_s"], row["seq_read_direct_s"],
             100 * row["eager_vs_seq_read"], row["seq_read_fresh_s"], 100 * row["eager_vs_fresh_read"],
             row["lazy_running_ms"], row["lazy_complete_ms"]), flush=True)
    os.unlink(snap)
    return row


def bench_untouched(pmlmig, size, repeat, tmp):
    snap = os.path.join(tmp, "untouched.snap")
    runs = []
    for _ in range(repeat):
        r = snapshot_once(pmlmig, size, snap, fill="zero")
        r["restore_lazy"] = restore_once(pmlmig, snap, True)
        runs.append(r)
    row = {"size": size, "runs": runs,
           "snapshot_ms": statistics.median(r["total_ms"] for r in runs),
           "allocated_bytes": statistics.median(r["allocated_bytes"] for r in runs),
           "lazy_running_ms": statistics.median(r["restore_lazy"]["running_ms"] for r in runs)}
    print("untouched %s: snapshot %.1f ms, %d KiB allocated; lazy restore running after %.1f ms" % (
        size, row["snapshot_ms"], row["allocated_bytes"] >> 10, row["lazy_running_ms"]), flush=True)
    os.unlink(snap)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pmlmig", default=os.path.join(ROOT, "build/tools/pmlmig"))
    ap.add_argument("--handover-sizes", default="1G,4G,16G")
    ap.add_argument("--snapshot-sizes", default="1G,4G")
    ap.add_argument("--untouched-size", default="4G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where snapshot files go (default: a new directory under /var/tmp)")
    ap.add_argument("--out", default=None, help="write every run and the medians as JSON")
    ap.add_argument("--only", choices=["handover", "snapshot"], default=None)
    a = ap.parse_args()
    if not os.access(a.pmlmig, os.X_OK):
        sys.exit("local_bench: %s is not built (scripts/setup.sh build)" % a.pmlmig)
    tmp = tempfile.mkdtemp(prefix="pmlmig-bench-", dir=a.dir or "/var/tmp")
    uname = os.uname()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": uname.nodename,
              "kernel": uname.release, "cpus": os.cpu_count(), "dir": tmp, "repeat": a.repeat}
    try:
        if a.only in (None, "handover"):
            result["handover"] = bench_handover(a.pmlmig, a.handover_sizes.split(","), a.repeat, tmp)
        if a.only in (None, "snapshot"):
            result["snapshot"] = [bench_snapshot(a.pmlmig, s, a.repeat, tmp) for s in a.snapshot_sizes.split(",")]
            result["untouched"] = bench_untouched(a.pmlmig, a.untouched_size, a.repeat, tmp)
    finally:
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
