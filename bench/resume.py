#!/usr/bin/env python3
"""Resumable upstream fetches: a cold pull of one large blob through docxy while the CDN
link is cut every --cut-mb MiB, against the same pull uninterrupted.

The upstream is the Hub-like harness of the test suite (tests/harness/upstream.py: the
distribution registry behind an nginx TLS front, token auth, blob GETs redirected with 307
to an nginx TLS "CDN"), with harness.cutter (a TCP proxy, TLS passing through) between the
redirects and the CDN. The blob is the large layer of `library/large` (--size-mb of random
bytes, gzip'd tar), pushed through the registry's API. docxy runs with its cache on and a
fresh --cache-dir for every pull (always cold); the client is curl with a token from docxy's
/auth/token, its body hashed by this script (every pull's sha256 is checked).

  uninterrupted  cutter.budget = None
  cut            cutter.budget = --cut-mb MiB: every CDN connection is cut (RST, or FIN with
                 --cut-style close) after that many bytes towards docxy

Each variant runs --repeat times, the order alternating every round. Reported: pull time
median and min-max, MB/s, the ratio cut/uninterrupted of the median times (target <= 1.5),
upstream bytes / blob size (bytes the cutter sent towards docxy for the pull, TLS included;
target <= 1.05), cuts, and docxy's resumes (docxy_upstream_resumes_total). Results go to
bench/results/resume.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import _common as c
from harness.daemon import Docxy, mirror_args  # noqa: E402  (tests/ is on sys.path via _common)
from harness.upstream import Upstream  # noqa: E402

VARIANTS = ("uninterrupted", "cut")
TARGET_TIME_RATIO = 1.5
TARGET_BYTES_RATIO = 1.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=2048,
                   help="random bytes in the large layer, MiB (default 2048)")
    p.add_argument("--cut-mb", type=int, default=256,
                   help="cut every CDN connection after this many MiB (default 256)")
    p.add_argument("--cut-style", choices=("reset", "close"), default="reset",
                   help="how the cutter cuts: RST to both ends (default) or a FIN to docxy")
    p.add_argument("--cut-grace", type=float, default=0.05,
                   help="seconds the cutter lets docxy read what it was sent before a RST "
                        "(harness.cutter's cut_grace, default 0.05); 0: in-flight bytes lost")
    p.add_argument("--repeat", type=int, default=3, help="pulls per variant (default 3)")
    p.add_argument("--pull-timeout", type=float, default=600,
                   help="seconds one pull may take before curl gives up (default 600)")
    p.add_argument("--layer-cache", type=Path, default=None,
                   help="keep the generated layer here between runs (default: the scratch "
                        "directory, removed afterwards)")
    p.add_argument("--results-dir", type=Path, default=c.RESULTS_DIR,
                   help="where resume.json/.md go (default bench/results)")
    p.add_argument("--results-name", default="resume",
                   help="base name of the results files (default resume)")
    p.add_argument("--no-results", action="store_true",
                   help="print only, write no results files")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (logs, configs, storage) afterwards")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1 or args.cut_mb < 1:
        p.error("--repeat, --size-mb and --cut-mb must be at least 1")
    return args


def token(docxy: Docxy, up: Upstream) -> str:
    """A pull token for `large` from docxy's /auth/token, as a client gets one."""
    query = urlencode({"service": up.service, "scope": "repository:large:pull"})
    status, _, body = docxy.request(f"/auth/token?{query}")
    if status != 200:
        raise RuntimeError(f"token from docxy: {status} {body[:200]!r}")
    return json.loads(body)["token"]


def resumes(docxy: Docxy) -> float:
    """docxy_upstream_resumes_total, summed over its labels (0 when docxy has none)."""
    status, _, body = docxy.request("/metrics")
    if status != 200:
        return float("nan")
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        m = re.match(r"docxy_upstream_resumes_total(\{[^}]*\})?\s+(\S+)", line)
        if m:
            total += float(m.group(2))
    return total


def curl_hashed(url: str, headers: dict[str, str], timeout: float) -> dict:
    """GET with curl, its body hashed here as it arrives; returns status, bytes, seconds
    (curl's time_total), sha256."""
    argv = ["curl", "-sS", "--http1.1", "--max-time", str(timeout), "-o", "-",
            "-w", "%{stderr}\n%{http_code} %{size_download} %{time_total}"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, c.MiB)
    except OSError:
        pass
    h, read = hashlib.sha256(), 0
    while chunk := proc.stdout.read1(c.MiB):
        h.update(chunk)
        read += len(chunk)
    stderr = proc.stderr.read().decode(errors="replace")
    rc = proc.wait(timeout + 30)
    fields = stderr.strip().splitlines()[-1].split() if stderr.strip() else []
    if len(fields) != 3:
        return {"status": None, "bytes": read, "curl_rc": rc, "error": stderr.strip()}
    return {"status": int(fields[0]), "bytes": int(fields[1]), "seconds": float(fields[2]),
            "hashed": read, "sha256": "sha256:" + h.hexdigest(), "curl_rc": rc,
            "stderr": "\n".join(stderr.strip().splitlines()[:-1])}


def round_order(i: int) -> list[str]:
    return list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))


def run(args) -> dict:
    info = c.machine_info()
    results: dict = {"benchmark": "resume", "machine": info, "repeat": args.repeat,
                     "size_mib": args.size_mb, "cut_mib": args.cut_mb,
                     "cut_style": args.cut_style, "cut_grace_s": args.cut_grace, "pulls": [],
                     "client": "curl -sS --http1.1 -o - (body hashed by the benchmark)"}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-resume-"))
        print(f"work directory {work}", file=sys.stderr)
        t = time.monotonic()
        up = Upstream.start(work / "upstream", large_layer_size=args.size_mb * c.MiB,
                            cache_dir=args.layer_cache or work / "layer", cdn_cutter=True)
        stack.callback(up.stop)
        assert up.cutter is not None
        layer = max(up.images.large.manifest.layers, key=lambda b: b.size)
        if args.layer_cache is None:
            shutil.rmtree(work / "layer", ignore_errors=True)  # the registry has its copy
        results["blob_bytes"], results["blob_digest"] = layer.size, layer.digest
        print(f"upstream with {layer.digest} ({layer.size} bytes) up in "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr)

        # One unmeasured read from the CDN puts the blob in the page cache for every pull.
        hex_ = layer.digest.split(":", 1)[1]
        cdn_path = f"/docker/registry/v2/blobs/sha256/{hex_[:2]}/{hex_}/data"
        warm = subprocess.run(["curl", "-sS", "--cacert", str(up.ca_path), "-o", "/dev/null",
                               "-w", "%{http_code} %{size_download}", up.cdn_url + cdn_path],
                              capture_output=True, text=True, timeout=args.pull_timeout)
        if warm.stdout.split() != ["200", str(layer.size)]:
            raise RuntimeError(f"warm-up read from the CDN failed: {warm.stdout} {warm.stderr}")

        for i in range(args.repeat):
            for variant in round_order(i):
                up.cutter.budget = args.cut_mb * c.MiB if variant == "cut" else None
                up.cutter.cut_style, up.cutter.cut_grace = args.cut_style, args.cut_grace
                home = work / f"docxy-{variant}-{i}"
                with contextlib.ExitStack() as pull_stack:
                    pull_stack.callback(shutil.rmtree, home, ignore_errors=True)
                    docxy = Docxy(home, mirror_args(up, cache=home / "cache"))
                    pull_stack.callback(docxy.stop)
                    docxy.start()
                    headers = {"Authorization": f"Bearer {token(docxy, up)}"}
                    before = up.cutter.counters()
                    r = curl_hashed(f"{docxy.url}/v2/large/blobs/{layer.digest}", headers,
                                    args.pull_timeout)
                    after = up.cutter.counters()
                    resumed = resumes(docxy)
                ok = (r.get("status") == 200 and r.get("bytes") == layer.size
                      and r.get("sha256") == layer.digest)
                sent = after["bytes_down"] - before["bytes_down"]
                record = {
                    "round": i, "variant": variant, "ok": ok, **r,
                    "mb_per_s": layer.size / r["seconds"] / c.MB if ok else None,
                    "upstream_bytes": sent, "upstream_ratio": sent / layer.size,
                    "connections": after["connections"] - before["connections"],
                    "cuts": after["cuts"] - before["cuts"], "resumes": resumed,
                }
                results["pulls"].append(record)
                shown = (f"{r['seconds']:7.2f}s {record['mb_per_s']:7.1f} MB/s" if ok
                         else f"FAILED {r}")
                print(f"round {i + 1}/{args.repeat}  {variant:13s} {shown}  upstream "
                      f"{record['upstream_ratio']:.4f}x, {record['cuts']} cuts, "
                      f"{resumed:g} resumes", file=sys.stderr)
    summarize(results)
    return results


def summarize(results: dict) -> None:
    summary = {}
    for variant in VARIANTS:
        pulls = [p for p in results["pulls"] if p["variant"] == variant]
        good = [p for p in pulls if p["ok"]]
        times = [p["seconds"] for p in good]
        summary[variant] = {
            "pulls": len(pulls), "failed": len(pulls) - len(good),
            "seconds_median": round(c.median(times), 2) if times else None,
            "seconds_min": round(min(times), 2) if times else None,
            "seconds_max": round(max(times), 2) if times else None,
            "mb_per_s_median": round(c.median([p["mb_per_s"] for p in good]), 1) if good else None,
            "upstream_ratio_max": round(max(p["upstream_ratio"] for p in good), 4) if good else None,
            "cuts_median": c.median([p["cuts"] for p in good]) if good else None,
            "resumes_median": c.median([p["resumes"] for p in good]) if good else None,
        }
    results["summary"] = summary
    base, cut = summary["uninterrupted"]["seconds_median"], summary["cut"]["seconds_median"]
    results["time_ratio"] = round(cut / base, 3) if base and cut else None
    results["bytes_ratio"] = summary["cut"]["upstream_ratio_max"]


def passed(results: dict) -> bool:
    return (not any(s["failed"] for s in results["summary"].values())
            and results["time_ratio"] is not None
            and results["time_ratio"] <= TARGET_TIME_RATIO
            and results["bytes_ratio"] is not None
            and results["bytes_ratio"] <= TARGET_BYTES_RATIO)


def render(results: dict) -> str:
    rows = []
    for variant, s in results["summary"].items():
        ok = s["seconds_median"] is not None
        rows.append([
            variant,
            f"{s['seconds_median']}" if ok else "FAILED",
            f"{s['seconds_min']}–{s['seconds_max']}" if ok else "",
            f"{s['mb_per_s_median']}" if ok else "",
            f"{s['upstream_ratio_max']}" if ok else "",
            f"{s['cuts_median']:g}" if ok else "",
            f"{s['resumes_median']:g}" if ok else "",
            f"{s['failed']}/{s['pulls']}",
        ])
    t = c.table(["variant", "pull s median", "min–max", "MB/s median",
                 "upstream bytes / blob (max)", "cuts", "docxy resumes", "failed"], rows)
    tr, br = results["time_ratio"], results["bytes_ratio"]
    verdict = [
        ["pull time cut / uninterrupted (medians)", f"{tr}" if tr else "–",
         f"≤ {TARGET_TIME_RATIO}", "met" if tr and tr <= TARGET_TIME_RATIO else "NOT met"],
        ["upstream bytes / blob size (cut, worst pull)", f"{br}" if br else "–",
         f"≤ {TARGET_BYTES_RATIO}", "met" if br and br <= TARGET_BYTES_RATIO else "NOT met"],
    ]
    v = c.table(["measure", "value", "target", ""], verdict)
    size_mib = results["size_mib"]
    command = (f"python bench/resume.py --size-mb {size_mib} --cut-mb {results['cut_mib']} "
               f"--repeat {results['repeat']}"
               + (" --cut-style close" if results["cut_style"] == "close" else ""))
    return (f"# Resumable upstream fetches: a {size_mib} MiB blob, the CDN cut every "
            f"{results['cut_mib']} MiB\n\n"
            f"Command: `{command}`\n\n"
            f"{c.machine_markdown(results['machine'])}"
            f"- blob: the large layer of library/large, {results['blob_bytes']} bytes, in a "
            f"Hub-like upstream (TLS registry, token auth, 307 to a TLS CDN) with "
            f"harness.cutter before the CDN (cut style: {results['cut_style']})\n"
            f"- docxy: cache on, a fresh --cache-dir for every pull (cold); "
            f"{results['repeat']} pulls per variant, order alternating\n"
            f"- client: {results['client']}; MB = 10^6 bytes; upstream bytes are what the "
            f"cutter sent towards docxy (TLS records, handshakes and headers included)\n\n"
            f"{t}\n{v}")


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render, passed)


if __name__ == "__main__":
    sys.exit(main())
