#!/usr/bin/env python3
"""docxy's pull-through cache, three measurements in one run:

  warm     Warm pulls of one large blob (--size-mb, default 512 MiB) from docxy's cache,
           against nginx serving the very same file statically (`root` = the directory of
           docxy's cache file for that digest; sendfile on): the physical reference.
           The blob is pulled once cold through docxy first. Reported: median MB/s of
           --repeat curl pulls each (curl -o /dev/null, order alternated every round) and
           the ratio docxy/nginx (target >= 0.5).
  cold     --clients (default 20) concurrent COLD pulls of the same blob: a fresh docxy
           with an empty cache directory, then, for comparison, a fresh distribution
           registry in proxy mode (proxy.remoteurl, empty storage). Every client reads the
           whole body and checks its sha256. Reported: bytes the upstream sent (GET bodies)
           divided by the blob size (target for docxy: exactly 1.0).
  docker   Upstream requests of one WARM `docker pull multiarch:latest` through docxy: a
           Hub-like upstream (tests/harness: TLS front, token auth, CDN redirects), docxy
           `--library` in front, the image pulled once by a fresh dockerd, then again by a
           second fresh dockerd; the registry requests (front access log) and the token
           requests made during the second pull are counted (target: 1 HEAD, 0 GET).

The upstream of `warm` and `cold` is a distribution registry (plain HTTP, no auth, no
redirect) behind an nginx that only logs: `proxy_pass` with proxy_buffering off, one JSON
line per request with $body_bytes_sent, so docxy and the proxy registry are counted the
same way. The registry's own access log is read as a cross-check.
Results go to bench/results/cache.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common as c

from harness.procs import free_port  # noqa: E402  (tests/ is on sys.path via _common)

ALL_PARTS = ("warm", "cold", "docker")
WARM_TARGET = 0.5          # docxy/nginx, median MB/s
COLD_TARGET = 1.0          # upstream bytes / blob size, docxy
DOCKER_TARGET = {"HEAD": 1, "GET": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB for 'warm' and 'cold' (default 512)")
    p.add_argument("--repeat", type=int, default=7,
                   help="warm pulls per path (default 7)")
    p.add_argument("--clients", type=int, default=20,
                   help="concurrent cold clients (default 20)")
    p.add_argument("--large-layer-mb", type=int, default=4,
                   help="size of the test images' large layer in MiB for 'docker' (default 4)")
    p.add_argument("--parts", default=",".join(ALL_PARTS),
                   help=f"comma-separated subset of {','.join(ALL_PARTS)} (default all)")
    p.add_argument("--pull-timeout", type=float, default=300,
                   help="seconds one pull may take (default 300)")
    p.add_argument("--results-dir", type=Path, default=c.RESULTS_DIR,
                   help="where cache.json/.md go (default bench/results)")
    p.add_argument("--results-name", default="cache",
                   help="base name of the results files (default cache)")
    p.add_argument("--no-results", action="store_true", help="print only, write no files")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (logs, configs, storage) afterwards")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in ALL_PARTS]
    if bad or not args.parts:
        p.error(f"unknown part(s) {bad}; choose from {ALL_PARTS}")
    if args.repeat < 1 or args.size_mb < 1 or args.large_layer_mb < 1:
        p.error("--repeat, --size-mb and --large-layer-mb must be at least 1")
    if not 1 <= args.clients <= 200:
        p.error("--clients must be 1..200")
    return args


# --- clients ------------------------------------------------------------------------------

def hashing_get(port: int, path: str, timeout: float) -> dict:
    """GET http://127.0.0.1:port/path, read the whole body in 1 MiB blocks and hash it."""
    t0 = time.monotonic()
    result: dict = {"status": None, "bytes": 0, "sha256": None, "error": None}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "docxy-bench-cache"})
        r = conn.getresponse()
        result["status"] = r.status
        result["content_length"] = r.getheader("Content-Length")
        result["ttfb"] = round(time.monotonic() - t0, 3)
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        n = 0
        while True:
            k = r.readinto(view)
            if not k:
                break
            h.update(view[:k])
            n += k
        result["bytes"] = n
        result["sha256"] = "sha256:" + h.hexdigest()
    except Exception as e:  # noqa: BLE001 - every failure is reported per client
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def concurrent_gets(port: int, path: str, n: int, timeout: float) -> tuple[list[dict], float]:
    """`n` threads start together (a barrier) and each runs hashing_get; returns the results
    and the wall time from the start to the last client's end."""
    results: list[dict | None] = [None] * n
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            results[i] = {"error": "barrier broken"}
            return
        results[i] = hashing_get(port, path, timeout)

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(30)
    t0 = time.monotonic()
    deadline = t0 + timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.monotonic() - t0
    return [r if r is not None else {"error": "client did not finish in time"}
            for r in results], wall


def client_ok(r: dict, blob: c.BlobFile) -> bool:
    return (r.get("status") == 200 and r.get("bytes") == blob.size
            and r.get("sha256") == blob.digest and not r.get("error"))


# --- processes ----------------------------------------------------------------------------

def start_log_front(stack: contextlib.ExitStack, work: Path, registry_port: int) -> c.NginxProcess:
    """nginx in front of the upstream registry that only logs (JSON, with body_bytes_sent):
    streaming (proxy_buffering off), HTTP/1.1 with keep-alive to the registry."""
    port = free_port()
    body = f"""
    upstream bench_registry {{ server 127.0.0.1:{registry_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 900s;
        proxy_send_timeout 900s;
        location / {{ proxy_pass http://bench_registry; }}
    }}
"""
    n = c.NginxProcess("upstream-log", work / "upstream-log", port, body)
    stack.callback(n.stop)
    n.start()
    return n


def start_static_nginx(stack: contextlib.ExitStack, work: Path, root: Path) -> c.NginxProcess:
    """nginx serving files from `root` (sendfile on, tcp_nopush on: the harness defaults)."""
    port = free_port()
    body = f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}; }}
    }}
"""
    n = c.NginxProcess("nginx-static", work / "nginx-static", port, body)
    stack.callback(n.stop)
    n.start()
    return n


def start_docxy(stack: contextlib.ExitStack, workdir: Path, args: list[str]) -> c.Docxy:
    d = c.Docxy(workdir, args)
    stack.callback(d.stop)
    d.start()
    return d


def docxy_health(d: c.Docxy) -> dict:
    with urllib.request.urlopen(f"{d.plain_url}/health", timeout=10) as r:
        return json.loads(r.read())


def cache_file(cache_dir: Path, digest: str) -> Path:
    algorithm, hex_part = digest.split(":", 1)
    return cache_dir / "blobs" / algorithm / hex_part[:2] / hex_part


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def front_entries(front: c.NginxProcess) -> list[dict]:
    out = []
    for line in front.access_log_lines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def upstream_traffic(entries: list[dict], blob: c.BlobFile) -> dict:
    """Requests and body bytes the upstream sent, from the logging front's entries."""
    blob_uri = c.blob_path(c.REPOSITORY, blob.digest)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["method"]] = counts.get(e["method"], 0) + 1
    gets = [e for e in entries if e["method"] == "GET" and e["uri"].split("?")[0] == blob_uri]
    get_bytes = sum(int(e["body_bytes_sent"]) for e in gets)
    return {
        "requests": len(entries),
        "by_method": counts,
        "blob_gets": len(gets),
        "blob_gets_complete": sum(1 for e in gets if e.get("completion") == "OK"),
        "blob_heads": sum(1 for e in entries if e["method"] == "HEAD"
                          and e["uri"].split("?")[0] == blob_uri),
        "blob_get_body_bytes": get_bytes,
        "bytes_ratio": round(get_bytes / blob.size, 4),
        "all_body_bytes": sum(int(e["body_bytes_sent"]) for e in entries),
        "requests_list": [f"{e['method']} {e['uri']} {e['status']} "
                          f"{e['body_bytes_sent']}B {e.get('completion') or '-'}"
                          for e in entries],
    }


_COMBINED = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


def registry_log_blob_bytes(registry: c.Registry, blob: c.BlobFile, offset: int) -> dict:
    """Cross-check: blob GET bytes from the registry's own access log (combined format)
    written after byte `offset` of the log."""
    try:
        with open(registry.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return {"blob_gets": None, "blob_get_bytes": None}
    uri = c.blob_path(c.REPOSITORY, blob.digest)
    gets = [m for m in _COMBINED.finditer(text) if m.group(1) == "GET" and m.group(2) == uri]
    total = sum(int(m.group(4)) for m in gets if m.group(4) != "-")
    return {"blob_gets": len(gets), "blob_get_bytes": total,
            "bytes_ratio": round(total / blob.size, 4)}


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- the parts ----------------------------------------------------------------------------

def part_warm(stack, work: Path, args, blob: c.BlobFile, front: c.NginxProcess) -> dict:
    path = c.blob_path(c.REPOSITORY, blob.digest)
    cache_dir = work / "warm-cache"
    d = start_docxy(stack, work / "docxy-warm",
                    ["--upstream", f"http://127.0.0.1:{front.port}", "--no-library",
                     "--cache-dir", str(cache_dir)])
    before = len(front_entries(front))
    t = time.monotonic()
    cold = hashing_get(d.port, path, args.pull_timeout)
    cold_s = time.monotonic() - t
    if not client_ok(cold, blob):
        raise RuntimeError(f"cold pull through docxy failed: {cold}")
    print(f"warm: cold pull through docxy {blob.size / cold_s / c.MB:.0f} MB/s "
          f"(hashed by the client)", file=sys.stderr)
    fpath = cache_file(cache_dir, blob.digest)
    wait_until(lambda: fpath.exists() and docxy_health(d)["cache"]["downloads_in_flight"] == 0,
               60, f"{fpath} to appear")
    if fpath.stat().st_size != blob.size:
        raise RuntimeError(f"{fpath} has {fpath.stat().st_size} bytes, not {blob.size}")
    n = start_static_nginx(stack, work, fpath.parent)
    targets = {
        "docxy": (f"{d.url}{path}", lambda: [d.process.pid]),
        "nginx": (f"http://127.0.0.1:{n.port}/{fpath.name}", lambda: c.nginx_worker_pids(n)),
    }
    # One unmeasured pull from each (the file is in the page cache for both alike).
    for name, (url, _) in targets.items():
        r = c.curl_pull(url, args.pull_timeout)
        if r.get("status") != 200 or r.get("bytes") != blob.size:
            raise RuntimeError(f"warm-up pull from {name} failed: {r}")
    time.sleep(1)
    after_cold = len(front_entries(front))
    pulls = []
    for i in range(args.repeat):
        order = ["docxy", "nginx"] if i % 2 == 0 else ["nginx", "docxy"]
        for name in order:
            url, pids = targets[name]
            cpu_before = {p: c.cpu_seconds(p) for p in pids()}
            r = c.curl_pull(url, args.pull_timeout)
            cpu = sum(c.cpu_seconds(p) - v for p, v in cpu_before.items())
            ok = r.get("status") == 200 and r.get("bytes") == blob.size
            rec = {"round": i, "path": name, "ok": ok, **r, "cpu_s": round(cpu, 3),
                   "mb_per_s": round(r["bytes"] / r["seconds"] / c.MB, 1) if ok else None}
            pulls.append(rec)
            shown = f"{rec['mb_per_s']:8.1f} MB/s" if ok else f"FAILED {r}"
            print(f"warm: round {i + 1}/{args.repeat} {name:6s} {shown} "
                  f"(cpu {cpu:.2f}s)", file=sys.stderr)
    time.sleep(1)
    entries = front_entries(front)
    health = docxy_health(d)
    summary = {}
    for name in targets:
        good = [p for p in pulls if p["path"] == name and p["ok"]]
        speeds = [p["mb_per_s"] for p in good]
        summary[name] = {
            "pulls": sum(1 for p in pulls if p["path"] == name),
            "failed": sum(1 for p in pulls if p["path"] == name and not p["ok"]),
            "mb_per_s_median": round(c.median(speeds), 1) if speeds else None,
            "mb_per_s_min": min(speeds) if speeds else None,
            "mb_per_s_max": max(speeds) if speeds else None,
            "mb_per_s_all": speeds,
            "cpu_s_per_gb": round(c.median([p["cpu_s"] for p in good]) / (blob.size / 1e9), 3)
            if good else None,
        }
    dx, ng = summary["docxy"]["mb_per_s_median"], summary["nginx"]["mb_per_s_median"]
    ratio = round(dx / ng, 3) if dx and ng else None
    return {
        "cache_file": str(fpath),
        "cold_pull_through_docxy": {**cold, "mb_per_s": round(blob.size / cold_s / c.MB, 1)},
        "upstream_requests_cold_pull": [f"{e['method']} {e['uri']} {e['status']}"
                                        for e in front_entries(front)[before:after_cold]],
        "upstream_requests_during_warm_pulls": [f"{e['method']} {e['uri']} {e['status']}"
                                                for e in entries[after_cold:]],
        "pulls": pulls,
        "summary": summary,
        "ratio_docxy_nginx": ratio,
        "target_ratio": WARM_TARGET,
        "met": ratio is not None and ratio >= WARM_TARGET
        and len(entries) == after_cold,
        "docxy_health_after": health,
        "_stop": [d.stop, n.stop],
    }


def part_cold(stack, work: Path, args, blob: c.BlobFile, upstream: c.Registry,
              front: c.NginxProcess) -> dict:
    path = c.blob_path(c.REPOSITORY, blob.digest)
    front_url = f"http://127.0.0.1:{front.port}"
    out: dict = {"clients": args.clients}
    for name in ("docxy", "distproxy"):
        with contextlib.ExitStack() as sub:
            if name == "docxy":
                cache_dir = work / "cold-cache"
                d = start_docxy(sub, work / "docxy-cold",
                                ["--upstream", front_url, "--no-library",
                                 "--cache-dir", str(cache_dir)])
                port, pid = d.port, d.process.pid
                done_file = cache_file(cache_dir, blob.digest)
            else:
                reg = c.start_registry(sub, work, "distproxy", proxy_remote=front_url)
                port, pid = reg.port, reg.process.pid
                hex_part = blob.digest.split(":", 1)[1]
                done_file = (work / "distproxy-storage" / "docker" / "registry" / "v2" / "blobs"
                             / "sha256" / hex_part[:2] / hex_part / "data")
            time.sleep(0.5)
            before = len(front_entries(front))
            reg_offset = log_size(upstream.log_path)
            cpu0 = c.cpu_seconds(pid)
            with c.RssSampler(lambda: [pid], 0.1) as sampler:
                results, wall = concurrent_gets(port, path, args.clients, args.pull_timeout)
            cpu = c.cpu_seconds(pid) - cpu0
            # The proxy may still be filling its store: wait until the blob is stored and
            # nothing is in flight, then give nginx a moment to write its last lines.
            stored = True
            try:
                if name == "docxy":
                    wait_until(lambda: done_file.exists() and
                               docxy_health(d)["cache"]["downloads_in_flight"] == 0,
                               120, "docxy's download to end")
                else:
                    wait_until(lambda: done_file.exists()
                               and done_file.stat().st_size == blob.size,
                               120, "the proxy registry to store the blob")
            except RuntimeError as e:
                stored = False
                print(f"cold: {name}: {e}", file=sys.stderr)
            time.sleep(1.5)
            entries = front_entries(front)[before:]
            traffic = upstream_traffic(entries, blob)
            good = sum(1 for r in results if client_ok(r, blob))
            rec = {
                "clients_ok": good,
                "clients_failed": [r for r in results if not client_ok(r, blob)],
                "wall_s": round(wall, 2),
                "aggregate_mb_per_s": round(good * blob.size / wall / c.MB, 1),
                "client_seconds": sorted(r.get("seconds", 0) for r in results),
                "cpu_s": round(cpu, 2),
                "peak_rss_mb": round(sampler.peak / c.MB, 1),
                "stored": stored,
                "upstream": traffic,
                "registry_log_crosscheck": registry_log_blob_bytes(upstream, blob, reg_offset),
            }
            if name == "docxy":
                rec["docxy_health_after"] = docxy_health(d)
            out[name] = rec
            print(f"cold: {name:9s} {good}/{args.clients} clients ok in {wall:.1f}s; upstream "
                  f"sent {traffic['blob_get_body_bytes']} bytes = "
                  f"{traffic['bytes_ratio']} x blob ({traffic['blob_gets']} GETs, "
                  f"{traffic['by_method']})", file=sys.stderr)
        if name == "docxy":
            shutil.rmtree(work / "cold-cache", ignore_errors=True)
        else:
            shutil.rmtree(work / "distproxy-storage", ignore_errors=True)
    dx = out["docxy"]
    out["met"] = (dx["clients_ok"] == args.clients
                  and dx["upstream"]["blob_get_body_bytes"] == blob.size)
    out["target_bytes_ratio"] = COLD_TARGET
    return out


def part_docker(stack, work: Path, args) -> dict:
    from harness.clients import DockerDaemon
    from harness.upstream import Upstream

    up = Upstream.start(work / "hub", large_layer_size=args.large_layer_mb << 20,
                        cache_dir=work / "images")
    stack.callback(up.stop)
    d = start_docxy(stack, work / "docxy-docker",
                    ["--upstream", up.registry_url, "--upstream-ca", str(up.ca_path),
                     "--library", "--cache-dir", str(work / "docker-cache")])
    pulls = []
    for which in ("cold", "warm", "warm-again"):
        # A short work directory: dockerd's unix sockets live in it.
        ddir = Path(tempfile.mkdtemp(prefix="dx-", dir="/tmp"))
        stack.callback(shutil.rmtree, ddir, True)
        with contextlib.ExitStack() as sub:
            dd = DockerDaemon(ddir, mirrors=[d.url])
            sub.callback(dd.stop)
            dd.start()
            time.sleep(1)
            reg0, tok0, cdn0 = (len(up.registry_log_entries()), len(up.token_log_entries()),
                                len(up.cdn_log_entries()))
            h0 = docxy_health(d)["cache"]
            t = time.monotonic()
            result = dd.pull("multiarch:latest")
            seconds = time.monotonic() - t
            time.sleep(1.0)  # nginx writes a log line once the response is done
            reg = up.registry_log_entries()[reg0:]
            tok = up.token_log_entries()[tok0:]
            cdn = up.cdn_log_entries()[cdn0:]
            h1 = docxy_health(d)["cache"]
        by_method: dict[str, int] = {}
        for e in reg:
            by_method[e["method"]] = by_method.get(e["method"], 0) + 1
        rec = {
            "pull": which,
            "digest": result.digest,
            "seconds": round(seconds, 2),
            "registry_requests": len(reg),
            "registry_by_method": by_method,
            "registry_requests_list": [f"{e['method']} {e['uri']} {e['status']} "
                                       f"(user agent: {e.get('user_agent', '')[:24] or '-'})"
                                       for e in reg],
            "token_requests": len(tok),
            "token_requests_list": [f"{e.get('method', '?')} {e.get('uri', e.get('path', '?'))}"
                                    f" {e.get('status', '')} (Authorization: "
                                    f"{e.get('auth_scheme') or 'none'})" for e in tok],
            "cdn_requests": len(cdn),
            "cdn_requests_list": [f"{e['method']} {e['uri']} {e['status']}" for e in cdn],
            "docxy_cache_delta": {k: h1[k] - h0[k] for k in
                                  ("blob_hits", "blob_misses", "manifest_hits",
                                   "manifest_misses", "bytes_from_upstream", "stale_serves")},
        }
        pulls.append(rec)
        print(f"docker: {which} pull {result.digest[:19]} in {seconds:.1f}s: upstream registry "
              f"{by_method or 'none'}, token {len(tok)}, cdn {len(cdn)}", file=sys.stderr)
        for line in rec["registry_requests_list"]:
            print(f"docker:   {line}", file=sys.stderr)
    warm = pulls[1]
    # The target is about content (manifests and blobs: what Hub counts and limits);
    # dockerd's GET /v2/ ping, passed upstream, is reported beside it.
    content = [x for x in warm["registry_requests_list"] if "/manifests/" in x or "/blobs/" in x]
    heads = sum(1 for x in content if x.startswith("HEAD "))
    gets = sum(1 for x in content if x.startswith("GET "))
    return {"image": "multiarch:latest (docker manifest list, linux/amd64 + linux/arm64/v8)",
            "large_layer_bytes": args.large_layer_mb << 20,
            "pulls": pulls, "warm_heads": heads, "warm_gets": gets,
            "warm_other": warm["registry_requests"] - heads - gets,
            "warm_pings": sum(1 for x in warm["registry_requests_list"] if x.startswith("GET /v2/ ")),
            "warm_token_requests": warm["token_requests"],
            "target": DOCKER_TARGET,
            "met": heads == 1 and gets == 0}


# --- run, report --------------------------------------------------------------------------

def run(args) -> dict:
    info = c.machine_info()
    size = args.size_mb * c.MiB
    results: dict = {"benchmark": "cache", "machine": info, "parts": args.parts,
                     "blob_bytes": size, "repeat": args.repeat, "clients": args.clients}
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-cache-"))
        print(f"work directory {work}", file=sys.stderr)
        if "warm" in args.parts or "cold" in args.parts:
            t = time.monotonic()
            blob = c.make_random_blob(work / "blob.bin", size)
            upstream = c.start_registry(stack, work, "upstream")
            c.push_blob(upstream.url, c.REPOSITORY, blob)
            blob.path.unlink()
            print(f"blob {blob.digest} ({size} bytes) pushed to {upstream.url} in "
                  f"{time.monotonic() - t:.1f}s", file=sys.stderr)
            results["blob_digest"] = blob.digest
            front = start_log_front(stack, work, upstream.port)
            if "warm" in args.parts:
                warm = part_warm(stack, work, args, blob, front)
                for stop in warm.pop("_stop"):
                    stop()
                shutil.rmtree(work / "warm-cache", ignore_errors=True)
                results["warm"] = warm
            if "cold" in args.parts:
                results["cold"] = part_cold(stack, work, args, blob, upstream, front)
            front.stop()
            upstream.stop()
            shutil.rmtree(work / "upstream-storage", ignore_errors=True)
        if "docker" in args.parts:
            results["docker"] = part_docker(stack, work, args)
    results["run_seconds"] = round(time.monotonic() - t_start, 1)
    return results


def verdict(ok: bool | None) -> str:
    return "met" if ok else "NOT met"


def render(results: dict) -> str:
    out = ["# docxy's pull-through cache\n\n", c.machine_markdown(results["machine"])]
    size = results["blob_bytes"]
    out.append(f"- run time {results['run_seconds']} s; MB = 10^6 bytes\n\n")
    if "warm" in results:
        w = results["warm"]
        rows = []
        for name, s in w["summary"].items():
            rows.append([name if name == "docxy" else "nginx static (same file)",
                         str(s["mb_per_s_median"]),
                         f"{s['mb_per_s_min']}–{s['mb_per_s_max']}",
                         ", ".join(str(x) for x in s["mb_per_s_all"]),
                         str(s["cpu_s_per_gb"]), f"{s['failed']}/{s['pulls']}"])
        out.append(f"## 1. Warm pull of one {size // c.MiB} MiB blob from the cache\n\n"
                   f"curl -o /dev/null, {results['repeat']} pulls each, order alternated; "
                   f"nginx serves docxy's own cache file (`root` = its directory, sendfile "
                   f"on). The cold pull through docxy before: "
                   f"{w['cold_pull_through_docxy']['mb_per_s']} MB/s.\n\n")
        out.append(c.table(["path", "MB/s median", "min–max", "all pulls (MB/s)",
                            "server CPU s/GB", "failed"], rows))
        out.append(f"\nratio docxy/nginx = **{w['ratio_docxy_nginx']}** (target ≥ "
                   f"{w['target_ratio']}: {verdict(w['met'])}); upstream requests during the "
                   f"warm pulls (incl. warm-up): "
                   f"{len(w['upstream_requests_during_warm_pulls'])}\n\n")
    if "cold" in results:
        cd = results["cold"]
        rows = []
        for name in ("docxy", "distproxy"):
            r = cd[name]
            u = r["upstream"]
            rows.append([name if name == "docxy" else "distribution proxy",
                         f"{r['clients_ok']}/{cd['clients']}",
                         f"{u['blob_get_body_bytes']}", f"**{u['bytes_ratio']}**",
                         str(u["blob_gets"]), str(u["blob_heads"]),
                         ", ".join(f"{k} {v}" for k, v in sorted(u["by_method"].items())),
                         str(r["registry_log_crosscheck"].get("bytes_ratio")),
                         str(r["wall_s"]), str(r["aggregate_mb_per_s"]), str(r["cpu_s"]),
                         str(r["peak_rss_mb"])])
        out.append(f"## 2. {cd['clients']} concurrent cold pulls of one {size // c.MiB} MiB "
                   f"blob\n\nEach client reads the whole body and checks its sha256. Upstream "
                   f"bytes = `$body_bytes_sent` of the blob GETs in the log of an nginx "
                   f"(proxy_pass, unbuffered) in front of the upstream registry; the "
                   f"registry's own access log as a cross-check.\n\n")
        out.append(c.table(["path", "clients ok", "upstream bytes", "bytes / blob",
                            "blob GETs", "blob HEADs", "all upstream requests",
                            "cross-check ratio", "wall s", "aggregate MB/s", "CPU s",
                            "peak RSS MB"], rows))
        out.append(f"\ndocxy: upstream bytes / blob size = "
                   f"{cd['docxy']['upstream']['bytes_ratio']} (target exactly "
                   f"{cd['target_bytes_ratio']}: {verdict(cd['met'])})\n\n")
    if "docker" in results:
        dk = results["docker"]
        rows = []
        for p in dk["pulls"]:
            m = p["registry_by_method"]
            rows.append([p["pull"], str(m.get("HEAD", 0)), str(m.get("GET", 0)),
                         str(p["registry_requests"] - m.get("HEAD", 0) - m.get("GET", 0)),
                         str(p["token_requests"]), str(p["cdn_requests"]), str(p["seconds"])])
        out.append(f"## 3. Upstream requests of one `docker pull` of a multi-arch image\n\n"
                   f"{dk['image']} through docxy (`--library`), a Hub-like upstream (TLS front, "
                   f"token auth, CDN redirects, large layer {dk['large_layer_bytes'] // c.MiB} "
                   f"MiB); each pull by a fresh dockerd.\n\n")
        out.append(c.table(["pull", "registry HEADs", "registry GETs", "other",
                            "token requests", "CDN requests", "seconds"], rows))
        for p in dk["pulls"][1:]:
            listing = "\n".join(f"  - `{x}`" for x in p["registry_requests_list"]) or "  - none"
            tok = "\n".join(f"  - `{x}`" for x in p["token_requests_list"]) or "  - none"
            out.append(f"\n{p['pull']} pull, upstream registry requests:\n{listing}\n"
                       f"{p['pull']} pull, token service requests:\n{tok}\n")
        out.append(f"\nwarm pull (the second), manifest and blob requests upstream: "
                   f"{dk['warm_heads']} HEAD, {dk['warm_gets']} GET "
                   f"(target 1 HEAD, 0 GET: {verdict(dk['met'])}); besides them "
                   f"{dk['warm_other']} other request(s) ({dk.get('warm_pings', 0)} of them "
                   f"dockerd's GET /v2/ ping) and {dk['warm_token_requests']} token request(s)\n")
    return "".join(out)


def all_met(results: dict) -> bool:
    return all(results[p]["met"] for p in ALL_PARTS if p in results)


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render, all_met)


if __name__ == "__main__":
    sys.exit(main())
