#!/usr/bin/env python3
"""Many concurrent clients, the same request mix against docxy and against the distribution
registry in proxy mode, in one run, in front of the same Hub-like upstream.

The upstream is the suite's (tests/harness/upstream.py: distribution behind an nginx TLS
front, token auth, blob GETs answered 307 to an nginx TLS CDN, tag lists paginated by the
front). In front of it, both pulling anonymously for their clients:

  docxy      twistd docxy --upstream <front> --upstream-ca <CA> --library --mirror-mode
             --tag-ttl <--tag-ttl>, cache on (docxy fetches the upstream tokens itself)
  distproxy  docker-registry in proxy mode (remoteurl = the front, the harness user's
             credentials, the harness CA trusted), no auth for its clients

Each is warmed (the image's manifest and one blob pulled once, so the blob is cached), then
--connections connections (default 500) for --duration seconds (default 30) per phase, from
three `hey` processes at once, a third of the connections each:

  manifest HEAD    HEAD /v2/library/alpine/manifests/latest (with --tag-ttl 0 docxy asks the
                   upstream every time; the proxy registry does too)
  tag list         GET /v2/library/manytags/tags/list?n=50 (relayed upstream by both)
  cached blob GET  GET of a cached blob of alpine

The phases alternate docxy, distproxy, distproxy, docxy, ... for --rounds rounds (default 2:
four phases, two minutes of load). hey writes every request to a CSV; the script reads the
latencies and status codes from it. Reported per target: requests/s (per phase: median,
min-max), errors (non-2xx answers and transport errors), p50/p99 latency per kind and
overall (every request of every phase), the server's CPU seconds, RSS and open files, and
the requests that reached the upstream's front. Exits 1 if docxy had any error.
The hey processes, the upstream and the server under test share the machine's 2 CPUs.
Results go to bench/results/<--results-name>.{json,md}.
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
import _hub as hub
from harness.upstream import Upstream  # noqa: E402  (tests/ is on sys.path via _common)

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
TARGETS = ("docxy", "distproxy")
KINDS = ("manifest HEAD", "tag list", "cached blob GET")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=500,
                   help="concurrent connections, split over the three kinds (default 500)")
    p.add_argument("--duration", type=int, default=30,
                   help="seconds of load per phase (default 30)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of one phase per target, the order alternating (default 2)")
    p.add_argument("--tag-ttl", type=float, default=0.0,
                   help="docxy --tag-ttl: 0 sends every tag HEAD upstream (default)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)} (default both)")
    c.add_common_options(p, "load")
    args = p.parse_args(argv)
    args.targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    if not args.targets or any(t not in TARGETS for t in args.targets):
        p.error(f"--targets: choose from {TARGETS}")
    if not 3 <= args.connections <= 3000:
        p.error("--connections must be 3..3000")
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 10:
        p.error("--duration must be 1..600 and --rounds 1..10")
    return args


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hey(url: str, method: str, workers: int, duration: int, out: Path) -> subprocess.Popen:
    argv = ["hey", "-z", f"{duration}s", "-c", str(workers), "-m", method, "-t", "30",
            "-H", f"Accept: {ACCEPT}", "-o", "csv", url]
    with open(out, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


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


def warm(base: str, alpine) -> None:
    """Pull the manifest and the blob once: the blob is then cached."""
    layer = alpine.blobs[-1]
    for path in ("/v2/library/alpine/manifests/latest", f"/v2/library/alpine/blobs/{layer.digest}"):
        request = urllib.request.Request(base + path, headers={"Accept": ACCEPT})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def phase(args, work: Path, name: str, base: str, pid: int, alpine, up: Upstream,
          index: int) -> dict:
    """One phase of load against one server: three hey processes for --duration."""
    layer = alpine.blobs[-1]
    urls = {
        "manifest HEAD": ("HEAD", f"{base}/v2/library/alpine/manifests/latest"),
        "tag list": ("GET", f"{base}/v2/library/manytags/tags/list?n=50"),
        "cached blob GET": ("GET", f"{base}/v2/library/alpine/blobs/{layer.digest}"),
    }
    # the connections split as evenly as they go: 500 = 167 + 167 + 166
    share = [args.connections // len(urls) + (i < args.connections % len(urls))
             for i in range(len(urls))]
    front0, token0 = len(up.registry_log_lines()), len(up.token_log_entries())
    cpu0 = c.cpu_seconds(pid)
    files0 = open_files(pid)
    started = time.monotonic()
    csvs = {kind: work / f"{name}-{index}-{i}.csv" for i, kind in enumerate(urls)}
    with contextlib.ExitStack() as procs:
        running = []
        for i, (kind, (method, url)) in enumerate(urls.items()):
            proc = hey(url, method, share[i], args.duration, csvs[kind])
            procs.callback(lambda p=proc: p.poll() is None and p.kill())
            running.append(proc)
        with c.RssSampler(lambda: [pid]) as sampler:
            for proc in running:
                proc.wait(timeout=args.duration + 120)
    elapsed = time.monotonic() - started
    hub.wait_for_logs(1.0)
    front = up.registry_log_entries()[front0:]
    tokens = len(up.token_log_entries()) - token0
    by_method: dict[str, int] = {}
    for e in front:
        by_method[e["method"]] = by_method.get(e["method"], 0) + 1
    kinds = {}
    for kind, path in csvs.items():
        latencies, statuses = read_csv(path)
        kinds[kind] = {"latencies": latencies, "statuses": statuses,
                       "errors": sum(n for s, n in statuses.items() if not s.startswith("2"))}
        path.unlink()
    total = sum(len(k["latencies"]) for k in kinds.values())
    rec = {"target": name, "index": index, "connections": sum(share),
           "elapsed_s": round(elapsed, 1), "requests": total,
           "requests_per_s": round(total / args.duration, 1),
           "errors": sum(k["errors"] for k in kinds.values()),
           "cpu_s": round(c.cpu_seconds(pid) - cpu0, 1),
           "rss_peak_mb": round(sampler.peak / c.MB, 1),
           "open_files_before": files0, "open_files_after": open_files(pid),
           "upstream_front_requests": len(front), "upstream_front_by_method": by_method,
           "upstream_token_requests": tokens, "kinds": kinds}
    print(f"phase {index + 1}: {name:9s} {total} requests, {rec['requests_per_s']} req/s, "
          f"{rec['errors']} errors, cpu {rec['cpu_s']} s, peak RSS {rec['rss_peak_mb']} MB, "
          f"upstream {by_method}, {tokens} token requests", file=sys.stderr)
    return rec


def run(args) -> dict:
    info = c.machine_info()
    results: dict = {"benchmark": "load", "machine": info, "connections": args.connections,
                     "duration_s": args.duration, "rounds": args.rounds,
                     "tag_ttl": args.tag_ttl, "targets": args.targets, "phases": []}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-load-"))
        print(f"work directory {work}", file=sys.stderr)
        up = Upstream.start(work / "upstream", large_layer_size=1 << 20,
                            cache_dir=work / "layer")
        stack.callback(up.stop)
        alpine = up.images.alpine
        servers: dict[str, tuple[str, int]] = {}
        before: dict[str, dict] = {}
        if "docxy" in args.targets:
            d = hub.start_docxy(stack, work / "docxy", up, "--mirror-mode",
                                "--tag-ttl", str(args.tag_ttl))
            servers["docxy"] = (d.url, d.process.pid)
        if "distproxy" in args.targets:
            reg = hub.start_distproxy(stack, work, up, "distproxy")
            servers["distproxy"] = (reg.url, reg.process.pid)
        for name, (base, pid) in servers.items():
            warm(base, alpine)
            before[name] = {"rss_mb": round(c.rss_bytes(pid) / c.MB, 1),
                            "open_files": open_files(pid)}
        index = 0
        for r in range(args.rounds):
            for name in c.round_order(args.targets, r):
                base, pid = servers[name]
                results["phases"].append(phase(args, work, name, base, pid, alpine, up, index))
                index += 1
        for name, (_, pid) in servers.items():
            before[name].update(rss_after_mb=round(c.rss_bytes(pid) / c.MB, 1),
                                open_files_after=open_files(pid))
        results["process"] = before
    summarize(results)
    return results


def summarize(results: dict) -> None:
    summary = {}
    for name in results["targets"]:
        phases = [p for p in results["phases"] if p["target"] == name]
        kinds = {}
        everything: list[float] = []
        for kind in KINDS:
            latencies = [x for p in phases for x in p["kinds"][kind]["latencies"]]
            statuses: dict[str, int] = {}
            for p in phases:
                for s, n in p["kinds"][kind]["statuses"].items():
                    statuses[s] = statuses.get(s, 0) + n
            everything += latencies
            kinds[kind] = {
                "requests": len(latencies), "statuses": statuses,
                "errors": sum(p["kinds"][kind]["errors"] for p in phases),
                "requests_per_s": c.spread([len(p["kinds"][kind]["latencies"])
                                            / results["duration_s"] for p in phases]),
                "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            }
        front = sum(p["upstream_front_requests"] for p in phases)
        tokens = sum(p["upstream_token_requests"] for p in phases)
        total = sum(p["requests"] for p in phases)
        summary[name] = {
            "requests": total, "errors": sum(p["errors"] for p in phases),
            "requests_per_s": c.spread([p["requests_per_s"] for p in phases]),
            "p50_ms": round(percentile(everything, 0.50) * 1000, 1),
            "p99_ms": round(percentile(everything, 0.99) * 1000, 1),
            "kinds": kinds,
            "cpu_s_per_1000_requests": round(sum(p["cpu_s"] for p in phases) / total * 1000, 3)
            if total else None,
            "rss_peak_mb": max(p["rss_peak_mb"] for p in phases),
            "upstream_requests_per_request": round(front / total, 3) if total else None,
            "upstream_token_requests": tokens,
            **results["process"].get(name, {}),
        }
    results["summary"] = summary
    dx, dp = summary.get("docxy"), summary.get("distproxy")
    if dx and dp and dp["requests_per_s"]["median"]:
        results["ratio_requests_per_s"] = round(dx["requests_per_s"]["median"]
                                                / dp["requests_per_s"]["median"], 3)
    # the per-request latencies are in the summary's percentiles; the JSON keeps counts only
    for p in results["phases"]:
        for k in p["kinds"].values():
            k["requests"] = len(k.pop("latencies"))


def render(results: dict) -> str:
    rows = []
    for name, s in results["summary"].items():
        for kind, k in s["kinds"].items():
            rows.append([name, kind, str(k["requests"]), c.fmt_spread(k["requests_per_s"]),
                         str(k["errors"]), f"{k['p50_ms']}", f"{k['p99_ms']}"])
        rows.append([name, "**all**", str(s["requests"]), c.fmt_spread(s["requests_per_s"]),
                     str(s["errors"]), f"{s['p50_ms']}", f"{s['p99_ms']}"])
    t = c.table(["server", "kind", "requests", "requests/s per phase: median (min–max)",
                 "errors", "p50 ms", "p99 ms"], rows)
    prow = []
    for name, s in results["summary"].items():
        prow.append([name, str(s["cpu_s_per_1000_requests"]), str(s.get("rss_mb")),
                     str(s["rss_peak_mb"]), str(s.get("rss_after_mb")),
                     f"{s.get('open_files')} / {s.get('open_files_after')}",
                     str(s["upstream_requests_per_request"]), str(s["upstream_token_requests"])])
    pt = c.table(["server", "CPU s per 1000 requests", "RSS before MB", "peak RSS MB",
                  "RSS after MB", "open files before / after",
                  "upstream front requests per request", "token service requests"], prow)
    ratio = results.get("ratio_requests_per_s")
    command = (f"python bench/load.py --connections {results['connections']} --duration "
               f"{results['duration_s']} --rounds {results['rounds']} --tag-ttl "
               f"{results['tag_ttl']:g} --targets {','.join(results['targets'])}"
               + c.extra_flags(results))
    order = ", ".join(p["target"] for p in results["phases"])
    return (f"# Under load: docxy and the distribution proxy, {results['connections']} "
            f"connections\n\n"
            f"Command: `{command}`\n\n"
            f"- **path: hub** — both in front of the suite's Hub-like upstream (TLS front, "
            f"token auth, 307 to a TLS CDN); docxy `--mirror-mode --tag-ttl "
            f"{results['tag_ttl']:g}` with its cache, the distribution registry in proxy mode "
            f"logging in as the harness user; clients anonymous\n"
            f"- phases of {results['duration_s']} s each, in this order: {order}; three `hey` "
            f"processes per phase (a third of the connections each)\n"
            f"{c.machine_markdown(results['machine'])}\n"
            f"{t}\n{pt}\n"
            + (f"requests/s docxy / distproxy (medians of the phases): **{ratio}**\n"
               if ratio else ""))


def passed(results: dict) -> bool:
    dx = results["summary"].get("docxy")
    return dx is None or dx["errors"] == 0


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render, passed)


if __name__ == "__main__":
    sys.exit(main())
