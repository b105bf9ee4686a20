#!/usr/bin/env python3
"""Cold pull throughput of one large blob over loopback, side by side:

  docxy        twistd docxy --upstream http://127.0.0.1:REG --no-library, its cache on (the
               default) in a fresh directory for every pull so that it is always cold
  docxy-nocache  the same with --no-cache: the plain streaming relay
  nginx        nginx proxy_pass to the same registry, nginx's default proxy buffering
  distproxy    the distribution registry in proxy mode (remoteurl = the registry), a fresh
               storage directory for every pull so that it is always cold
  direct       the upstream registry itself (the physical reference)
  nginx-nobuf  (optional, --paths) nginx proxy_pass with `proxy_buffering off`

The upstream is the CNCF distribution registry (docker-registry) on plain HTTP, no auth; the
blob is random bytes pushed through the registry API. The client is curl writing to
/dev/null; each pull must answer 200 with exactly the blob's size. Every path is pulled
--repeat times, the order rotated (and reversed every other round) so that no path always
goes first on a noisy machine. Reported: median MB/s (10^6 bytes/s), ratios of docxy to the
others, CPU seconds per GB used by the proxy process(es) and the upstream, peak proxy RSS.
Results go to bench/results/throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

import _common as c

ALL_PATHS = ("docxy", "docxy-nocache", "nginx", "distproxy", "direct", "nginx-nobuf")
DEFAULT_PATHS = "docxy,docxy-nocache,nginx,distproxy,direct"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB (default 512)")
    p.add_argument("--repeat", type=int, default=3,
                   help="pulls per path (default 3)")
    p.add_argument("--paths", default=DEFAULT_PATHS,
                   help=f"comma-separated subset of {','.join(ALL_PATHS)} "
                        f"(default {DEFAULT_PATHS})")
    p.add_argument("--pull-timeout", type=float, default=300,
                   help="seconds one pull may take before curl gives up (default 300)")
    p.add_argument("--results-dir", type=Path, default=c.RESULTS_DIR,
                   help="where throughput.json/.md go (default bench/results)")
    p.add_argument("--results-name", default="throughput",
                   help="base name of the results files (default throughput)")
    p.add_argument("--no-results", action="store_true",
                   help="print only, write no results files")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (logs, configs, storage) afterwards")
    args = p.parse_args(argv)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in ALL_PATHS]
    if bad or not args.paths:
        p.error(f"unknown path(s) {bad}; choose from {ALL_PATHS}")
    if args.repeat < 1 or args.size_mb < 1:
        p.error("--repeat and --size-mb must be at least 1")
    return args


def upstream_blob_gets(upstream) -> int:
    """Blob GETs the upstream registry has logged so far (its access log, one line each)."""
    try:
        text = upstream.log_path.read_text(errors="replace")
    except OSError:
        return 0
    return text.count(f'"GET /v2/{c.REPOSITORY}/blobs/')


def round_order(paths: list[str], i: int) -> list[str]:
    k = i % len(paths)
    order = paths[k:] + paths[:k]
    return order[::-1] if i % 2 else order


def run(args) -> dict:
    info = c.machine_info()
    size = args.size_mb * c.MiB
    results: dict = {"benchmark": "throughput", "machine": info, "blob_bytes": size,
                     "repeat": args.repeat, "paths": args.paths, "pulls": [],
                     "nginx_note": c.NGINX_DEFAULTS_NOTE,
                     "client": "curl -sS --http1.1 -o /dev/null (body discarded)"}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-throughput-"))
        print(f"work directory {work}", file=sys.stderr)
        t = time.monotonic()
        blob = c.make_random_blob(work / "blob.bin", size)
        print(f"blob {blob.digest} ({size} bytes) written in {time.monotonic() - t:.1f}s",
              file=sys.stderr)
        upstream = c.start_registry(stack, work, "upstream")
        t = time.monotonic()
        c.push_blob(upstream.url, c.REPOSITORY, blob)
        print(f"pushed to {upstream.url} in {time.monotonic() - t:.1f}s", file=sys.stderr)
        blob.path.unlink()  # the registry has its own copy; save the disk space
        path = c.blob_path(c.REPOSITORY, blob.digest)
        upstream_pid = upstream.process.pid

        targets: dict[str, tuple[str, callable]] = {}
        if "docxy-nocache" in args.paths:
            d = c.start_docxy(stack, work, upstream.url, ["--no-cache"])
            targets["docxy-nocache"] = (d.url, lambda d=d: [d.process.pid])
        if "nginx" in args.paths:
            n = c.start_nginx(stack, work, upstream.port, buffering=True, name="nginx")
            targets["nginx"] = (f"http://127.0.0.1:{n.port}", lambda n=n: c.nginx_worker_pids(n))
        if "nginx-nobuf" in args.paths:
            n2 = c.start_nginx(stack, work, upstream.port, buffering=False, name="nginx-nobuf")
            targets["nginx-nobuf"] = (f"http://127.0.0.1:{n2.port}",
                                      lambda n=n2: c.nginx_worker_pids(n))
        if "direct" in args.paths:
            targets["direct"] = (upstream.url, lambda: [])

        # One unmeasured direct pull: the blob file is then in the page cache for everyone.
        warm = c.curl_pull(upstream.url + path, args.pull_timeout)
        if warm.get("status") != 200 or warm.get("bytes") != size:
            raise RuntimeError(f"warm-up pull from the upstream failed: {warm}")

        for i in range(args.repeat):
            for name in round_order(args.paths, i):
                proxy = None
                if name == "docxy":
                    # A fresh docxy with an empty cache directory: always cold.
                    proxy_stack = contextlib.ExitStack()
                    stack.enter_context(proxy_stack)
                    proxy = c.start_docxy(proxy_stack, work / f"docxy-r{i}", upstream.url)
                    base, pids = proxy.url, (lambda p=proxy: [p.process.pid])
                elif name == "distproxy":
                    # A fresh proxy with a fresh storage directory: always cold.
                    proxy_stack = contextlib.ExitStack()
                    stack.enter_context(proxy_stack)
                    proxy = c.start_registry(proxy_stack, work, f"distproxy-r{i}",
                                             proxy_remote=upstream.url)
                    base, pids = proxy.url, (lambda p=proxy: [p.process.pid])
                else:
                    base, pids = targets[name]
                gets_before = upstream_blob_gets(upstream)
                try:
                    cpu_before = {p: c.cpu_seconds(p) for p in [*pids(), upstream_pid]}
                    with c.RssSampler(pids, 0.05) as sampler:
                        r = c.curl_pull(base + path, args.pull_timeout)
                    cpu_after = {p: c.cpu_seconds(p) for p in cpu_before}
                finally:
                    if proxy is not None:
                        proxy_stack.close()
                        shutil.rmtree(work / f"distproxy-r{i}-storage", ignore_errors=True)
                        shutil.rmtree(work / f"docxy-r{i}", ignore_errors=True)
                time.sleep(0.3)  # the registry logs a request when it has finished it
                gets = upstream_blob_gets(upstream) - gets_before
                ok = r.get("status") == 200 and r.get("bytes") == size
                proxy_cpu = sum(cpu_after[p] - cpu_before[p] for p in cpu_before
                                if p != upstream_pid)
                record = {
                    "round": i, "path": name, "ok": ok, **r,
                    "mb_per_s": (r["bytes"] / r["seconds"] / c.MB) if ok else None,
                    "proxy_cpu_s": round(proxy_cpu, 2),
                    "upstream_cpu_s": round(cpu_after[upstream_pid] - cpu_before[upstream_pid], 2),
                    "proxy_peak_rss": sampler.peak,
                    "upstream_blob_gets": gets,
                }
                results["pulls"].append(record)
                shown = f"{record['mb_per_s']:8.1f} MB/s" if ok else f"FAILED {r}"
                print(f"round {i + 1}/{args.repeat}  {name:12s} {shown}  "
                      f"({r.get('seconds', 0):.2f}s, proxy cpu {proxy_cpu:.1f}s)",
                      file=sys.stderr)
    summarize(results)
    return results


def summarize(results: dict) -> None:
    size = results["blob_bytes"]
    summary = {}
    for name in results["paths"]:
        pulls = [p for p in results["pulls"] if p["path"] == name]
        good = [p for p in pulls if p["ok"]]
        speeds = [p["mb_per_s"] for p in good]
        summary[name] = {
            "pulls": len(pulls), "failed": len(pulls) - len(good),
            "mb_per_s_median": round(c.median(speeds), 1) if speeds else None,
            "mb_per_s_min": round(min(speeds), 1) if speeds else None,
            "mb_per_s_max": round(max(speeds), 1) if speeds else None,
            "mb_per_s_all": [round(s, 1) for s in speeds],
            "proxy_cpu_s_per_gb": round(c.median([p["proxy_cpu_s"] for p in good])
                                        / (size / 1e9), 2) if good else None,
            "upstream_cpu_s_per_gb": round(c.median([p["upstream_cpu_s"] for p in good])
                                           / (size / 1e9), 2) if good else None,
            "upstream_blob_gets_per_pull": max(p["upstream_blob_gets"] for p in good)
            if good else None,
            "proxy_peak_rss_mb": round(max(p["proxy_peak_rss"] for p in good) / c.MB, 1)
            if good else None,
        }
    results["summary"] = summary
    ratios = {}
    dx = summary.get("docxy", {}).get("mb_per_s_median")
    for other in ("docxy-nocache", "nginx", "nginx-nobuf", "distproxy", "direct"):
        o = summary.get(other, {}).get("mb_per_s_median")
        if dx and o:
            ratios[f"docxy/{other}"] = round(dx / o, 3)
    results["ratios"] = ratios


def render(results: dict) -> str:
    info = results["machine"]
    rows = []
    for name, s in results["summary"].items():
        rows.append([
            name,
            f"{s['mb_per_s_median']}" if s["mb_per_s_median"] else "FAILED",
            f"{s['mb_per_s_min']}–{s['mb_per_s_max']}" if s["mb_per_s_median"] else "",
            ", ".join(str(x) for x in s["mb_per_s_all"]),
            str(s["proxy_cpu_s_per_gb"]) if name != "direct" else "–",
            str(s["upstream_cpu_s_per_gb"]),
            str(s["proxy_peak_rss_mb"]) if name != "direct" else "–",
            str(s["upstream_blob_gets_per_pull"]),
            f"{s['failed']}/{s['pulls']}",
        ])
    t = c.table(["path", "MB/s median", "min–max", "all pulls (MB/s)", "proxy CPU s/GB",
                 "upstream CPU s/GB", "proxy peak RSS MB", "upstream GETs/pull", "failed"], rows)
    r = c.table(["ratio (median MB/s)", "value"],
                [[k, f"{v:.3f}"] for k, v in results["ratios"].items()])
    size_mib = results["blob_bytes"] // c.MiB
    return (f"# Cold blob pull throughput over loopback\n\n"
            f"{c.machine_markdown(info)}"
            f"- blob: {size_mib} MiB ({results['blob_bytes']} bytes) of random data, "
            f"{results['repeat']} pulls per path, order rotated between rounds\n"
            f"- client: {results['client']}; MB = 10^6 bytes\n"
            f"- nginx: {results['nginx_note']}\n"
            f"- distproxy: docker-registry in proxy mode, restarted with an empty storage "
            f"directory before each pull (cold)\n\n"
            f"{t}\n{r}")


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render,
                           lambda results: not sum(s["failed"] for s in results["summary"].values()))


if __name__ == "__main__":
    sys.exit(main())
