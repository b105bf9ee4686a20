#!/usr/bin/env python3
"""docxy under load: --connections (default 500) concurrent connections for --duration
(default 60 s), from `hey` processes on 127.0.0.1 (a third of the connections each):
manifest HEADs by tag, tag lists, and GETs of a cached blob, against docxy in mirror mode
in front of the Hub-like test upstream (tests/harness: TLS front, token auth, CDN).

Reported: requests/s, errors (non-2xx answers and transport errors), p50/p99 latency per
kind and overall (from hey's per-request CSV), and docxy's RSS and open files before and
after.  Results go to bench/results/load.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import _common as c

from harness.upstream import Upstream  # noqa: E402  (tests/ is on sys.path via _common)

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--duration", type=int, default=60, help="seconds (default 60)")
    p.add_argument("--tag-ttl", type=float, default=0.0,
                   help="docxy --tag-ttl: 0 sends every tag HEAD upstream (default)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--results", type=Path, default=c.RESULTS_DIR)
    return p.parse_args(argv)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hey(url: str, method: str, workers: int, duration: int, out: Path) -> subprocess.Popen:
    argv = ["hey", "-z", f"{duration}s", "-c", str(workers), "-m", method, "-t", "30",
            "-H", f"Accept: {ACCEPT}", "-o", "csv", url]
    return subprocess.Popen(argv, stdout=open(out, "wb"), stderr=subprocess.STDOUT)


def read_csv(path: Path) -> tuple[list[float], dict[str, int]]:
    """Latencies (seconds) and status counts from hey's CSV; lines hey could not fit in
    the CSV (transport errors are printed as text) count as errors."""
    latencies, statuses = [], {}
    text = path.read_text(errors="replace")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 7 and row[0] != "response-time":
            try:
                latencies.append(float(row[0]))
            except ValueError:
                statuses["unparsed"] = statuses.get("unparsed", 0) + 1
                continue
            statuses[row[6]] = statuses.get(row[6], 0) + 1
        elif row and row[0] != "response-time" and row[0].strip():
            statuses["error"] = statuses.get("error", 0) + 1
    return latencies, statuses


def main(argv=None) -> int:
    args = parse_args(argv)
    c.install_signal_handlers()
    with c.workdir(args.keep, "docxy-load-") as work, contextlib.ExitStack() as stack:
        up = Upstream.start(work / "upstream", large_layer_size=1 << 20)
        stack.callback(up.stop)
        daemon = c.Docxy(work / "docxy", ["--upstream", up.registry_url, "--upstream-ca",
                                          str(up.ca_path), "--library", "--mirror-mode",
                                          "--tag-ttl", str(args.tag_ttl)])
        daemon.start()
        stack.callback(daemon.stop)
        alpine = up.images.alpine
        layer = alpine.blobs[-1]
        targets = {
            "manifest HEAD": ("HEAD", f"{daemon.url}/v2/library/alpine/manifests/latest"),
            "tag list": ("GET", f"{daemon.url}/v2/library/manytags/tags/list?n=50"),
            "cached blob GET": ("GET", f"{daemon.url}/v2/library/alpine/blobs/{layer.digest}"),
        }
        for method, url in [("GET", targets["manifest HEAD"][1]), ("GET", targets["cached blob GET"][1])]:
            request = urllib.request.Request(url, method=method, headers={"Accept": ACCEPT})
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()  # warm: now cached
        pid = daemon.process.pid
        before = {"rss": c.rss_bytes(pid), "open_files": open_files(pid)}
        # the connections split as evenly as they go: 500 = 167 + 167 + 166
        share = [args.connections // len(targets) + (i < args.connections % len(targets))
                 for i in range(len(targets))]
        started = time.monotonic()
        procs = {kind: hey(url, method, max(1, share[i]), args.duration, work / f"{i}.csv")
                 for i, (kind, (method, url)) in enumerate(targets.items())}
        with c.RssSampler(lambda: [pid]) as sampler:
            for proc in procs.values():
                proc.wait(timeout=args.duration + 120)
        elapsed = time.monotonic() - started
        after = {"rss": c.rss_bytes(pid), "open_files": open_files(pid)}
        kinds, all_latencies, total, errors = {}, [], 0, 0
        for i, kind in enumerate(targets):
            latencies, statuses = read_csv(work / f"{i}.csv")
            bad = sum(n for s, n in statuses.items() if not s.startswith("2"))
            kinds[kind] = {"requests": len(latencies), "statuses": statuses, "errors": bad,
                           "p50_ms": percentile(latencies, 0.50) * 1000,
                           "p99_ms": percentile(latencies, 0.99) * 1000}
            all_latencies += latencies
            total += len(latencies)
            errors += bad
        data = {
            "connections": sum(share), "duration_s": args.duration,
            "elapsed_s": round(elapsed, 1), "tag_ttl": args.tag_ttl,
            "requests": total, "requests_per_s": round(total / args.duration, 1),
            "errors": errors,
            "p50_ms": round(percentile(all_latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(all_latencies, 0.99) * 1000, 2),
            "rss_before_mb": round(before["rss"] / c.MB, 1), "rss_after_mb": round(after["rss"] / c.MB, 1),
            "rss_peak_mb": round(sampler.peak / c.MB, 1),
            "open_files_before": before["open_files"], "open_files_after": after["open_files"],
            "kinds": kinds, "machine": c.machine_info(),
        }
        rows = [[k, str(v["requests"]), str(v["errors"]), f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}"]
                for k, v in kinds.items()]
        rows.append(["all", str(total), str(errors), f"{data['p50_ms']:.1f}", f"{data['p99_ms']:.1f}"])
        markdown = "\n".join([
            f"# docxy under load: {data['connections']} connections for {args.duration} s",
            "", "Command: `python bench/load.py"
            + (f" --connections {args.connections}" if args.connections != 500 else "")
            + (f" --duration {args.duration}" if args.duration != 60 else "")
            + (f" --tag-ttl {args.tag_ttl:g}" if args.tag_ttl else "") + "`", "",
            c.table(["kind", "requests", "errors", "p50 ms", "p99 ms"], rows), "",
            f"Throughput: {data['requests_per_s']} requests/s. docxy RSS {data['rss_before_mb']} MB "
            f"before, {data['rss_after_mb']} MB after (peak {data['rss_peak_mb']} MB); open files "
            f"{data['open_files_before']} before, {data['open_files_after']} after.", "",
            c.machine_markdown(data["machine"]),
        ])
        json_path, md_path = c.write_results("load", data, markdown, args.results)
        print(markdown)
        print(f"\nwritten: {json_path} {md_path}", file=sys.stderr)
        return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
