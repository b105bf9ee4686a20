#!/usr/bin/env python3
"""docxy's pull-through cache, three measurements in one run:

  warm     Warm pulls of one large blob (--size-mb, default 512 MiB) from docxy's cache,
           against nginx serving the very same file (`root` = the directory of docxy's
           cache file for that digest, `sendfile on`), in plain HTTP and in TLS: docxy
           with --tls/--cert/--key, nginx terminating TLS with the same certificate and key
           (from the harness pki); and a third path, nginx in front of a docxy started with
           --accel-redirect (the README's configuration: nginx sends the cached file, plain
           and TLS). The blob is pulled once cold through docxy first (the
           client hashes it). Then per transport one unmeasured pull from each, and
           --repeat curl pulls each (curl --http1.1 -o /dev/null, order alternated every
           round). Reported: MB/s median and min-max, the ratio docxy/nginx (of the medians
           and per round), CPU s/GB of the server process, upstream requests during the
           warm pulls (no blob may be fetched upstream).
  cold     --clients (default 20) concurrent COLD pulls of the same blob: a fresh docxy
           with an empty cache directory, then, for comparison, a fresh distribution
           registry in proxy mode (empty storage). Every client reads the whole body and
           checks its sha256. Reported: bytes the upstream sent for the blob divided by the
           blob size (target for docxy: exactly 1.0), upstream requests.
  docker   Upstream requests of one WARM `docker pull multiarch:latest` through docxy: a
           Hub-like upstream (small images), docxy `--library` in front, the image pulled
           once by a fresh dockerd, then again by a second and a third fresh dockerd;
           registry requests (front access log) and token requests are counted
           (target for the second pull: 1 HEAD, 0 GET).

--upstream hub (default) for warm and cold: the suite's Hub-like upstream
(tests/harness/upstream.py: TLS front, token auth, blob GETs answered 307 to a TLS CDN),
the blob being the large layer of library/large; docxy's clients use a token from docxy's
/auth/token, the proxy registry logs in with the harness user. Upstream bytes = the CDN's
$body_bytes_sent for the blob; requests = the front's access log.
--upstream plain: a distribution registry on plain HTTP, no auth, no redirect, behind an
nginx that only logs (JSON, $body_bytes_sent); the registry's own log as a cross-check.
Results go to bench/results/<--results-name>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import _common as c
import _hub as hub
from harness.nginx import accel_front_locations  # noqa: E402
from harness.procs import free_port  # noqa: E402  (tests/ is on sys.path via _common)

ALL_PARTS = ("warm", "cold", "docker")
WARM_TARGET = 0.8          # docxy/nginx, median MB/s, plain and TLS
ACCEL_PREFIX = "/_docxy_blobs"
COLD_TARGET = 1.0          # upstream bytes / blob size, docxy
DOCKER_TARGET = {"HEAD": 1, "GET": 0}
TRANSPORTS = ("plain", "tls")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", choices=("hub", "plain"), default="hub",
                   help="the upstream of 'warm' and 'cold': hub (TLS registry, token auth, "
                        "307 to a TLS CDN; default) or plain (plain-HTTP registry, no auth)")
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB for 'warm' and 'cold' (default 512)")
    p.add_argument("--repeat", type=int, default=7,
                   help="warm pulls per path and transport, after one unmeasured pull "
                        "(default 7)")
    p.add_argument("--clients", type=int, default=20,
                   help="concurrent cold clients (default 20)")
    p.add_argument("--large-layer-mb", type=int, default=4,
                   help="size of the test images' large layer in MiB for 'docker' (default 4)")
    p.add_argument("--parts", default=",".join(ALL_PARTS),
                   help=f"comma-separated subset of {','.join(ALL_PARTS)} (default all)")
    p.add_argument("--pull-timeout", type=float, default=300,
                   help="seconds one pull may take (default 300)")
    p.add_argument("--layer-cache", type=Path, default=None,
                   help="hub: build the large layer here and keep it for the next run "
                        "(default: in the scratch directory, removed afterwards)")
    c.add_common_options(p, "cache")
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

def hashing_get(base_url: str, path: str, headers: dict[str, str], timeout: float,
                cafile: Path | None = None) -> dict:
    """GET base_url + path, read the whole body in 1 MiB blocks and hash it."""
    t0 = time.monotonic()
    result: dict = {"status": None, "bytes": 0, "sha256": None, "error": None}
    u = urlsplit(base_url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(
            u.hostname, u.port, timeout=timeout,
            context=ssl.create_default_context(cafile=str(cafile) if cafile else None))
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "docxy-bench-cache", **headers})
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


def concurrent_gets(base_url: str, path: str, headers: dict[str, str], n: int,
                    timeout: float) -> tuple[list[dict], float]:
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
        results[i] = hashing_get(base_url, path, headers, timeout)

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


def client_ok(r: dict, digest: str, size: int) -> bool:
    return (r.get("status") == 200 and r.get("bytes") == size
            and r.get("sha256") == digest and not r.get("error"))


# --- the upstreams of 'warm' and 'cold' ---------------------------------------------------

class HubSource:
    """The Hub-like upstream: the large layer of library/large, tokens, the CDN's log."""

    name = "hub"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        self.blob = hub.start_hub(stack, work, args.size_mb * c.MiB, args.layer_cache)
        self.up = self.blob.up
        self.digest, self.size, self.path = self.blob.digest, self.blob.size, self.blob.path

    def docxy_args(self, cache_dir: Path) -> list[str]:
        return hub.mirror_args(self.up, cache=cache_dir)

    def headers(self, d: c.Docxy, cafile: Path | None = None) -> dict[str, str]:
        """What a client sends docxy: a token from docxy's /auth/token, fetched now."""
        return hub.bearer(hub.docxy_token(d, self.up, cafile=cafile))

    def start_distproxy(self, stack, work: Path, name: str) -> c.Registry:
        return hub.start_distproxy(stack, work, self.up, name)

    def marks(self):
        return hub.log_marks(self.up)

    def traffic(self, marks) -> dict:
        t = hub.traffic_since(self.up, self.blob, marks)
        return {"requests": t["front_requests"], "by_method": t["front_by_method"],
                "blob_gets": t["front_blob_gets"], "blob_heads": t["front_blob_heads"],
                "data_gets": t["cdn_blob_gets"], "data_gets_complete": t["cdn_blob_gets_complete"],
                "body_bytes": t["cdn_body_bytes"], "bytes_ratio": t["bytes_ratio"],
                "requests_list": t["requests_list"]}

    def describe(self) -> str:
        return ("**upstream: hub** — the suite's Hub-like upstream (distribution behind an nginx "
                "TLS front, token auth, blob GETs answered 307 to an nginx TLS CDN); the blob is "
                f"the large layer of `{hub.REPOSITORY}`, {self.size} bytes; upstream bytes = the "
                "CDN's `$body_bytes_sent` for the blob, requests = the front's access log")


_COMBINED = re.compile(r'"(GET|HEAD) (/v2/\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


class PlainSource:
    """A plain-HTTP registry (no auth, no redirect) behind an nginx that only logs."""

    name = "plain"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        t = time.monotonic()
        self.size = args.size_mb * c.MiB
        blob = c.make_random_blob(work / "blob.bin", self.size)
        self.registry = c.start_registry(stack, work, "upstream")
        c.push_blob(self.registry.url, c.REPOSITORY, blob)
        blob.path.unlink()
        self.digest, self.path = blob.digest, c.blob_path(c.REPOSITORY, blob.digest)
        self.front = start_log_front(stack, work, self.registry.port)
        self.front_url = f"http://127.0.0.1:{self.front.port}"
        print(f"blob {blob.digest} ({self.size} bytes) pushed to {self.registry.url} in "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr)

    def docxy_args(self, cache_dir: Path) -> list[str]:
        return ["--upstream", self.front_url, "--no-library", "--cache-dir", str(cache_dir)]

    def headers(self, d: c.Docxy, cafile: Path | None = None) -> dict[str, str]:
        return {}

    def start_distproxy(self, stack, work: Path, name: str) -> c.Registry:
        return c.start_registry(stack, work, name, proxy_remote=self.front_url)

    def marks(self):
        return len(front_entries(self.front)), log_size(self.registry.log_path)

    def traffic(self, marks) -> dict:
        entries = front_entries(self.front)[marks[0]:]
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["method"]] = counts.get(e["method"], 0) + 1
        gets = [e for e in entries if e["method"] == "GET" and e["uri"].split("?")[0] == self.path]
        get_bytes = sum(int(e["body_bytes_sent"]) for e in gets)
        return {
            "requests": len(entries), "by_method": counts,
            "blob_gets": len(gets),
            "blob_heads": sum(1 for e in entries if e["method"] == "HEAD"
                              and e["uri"].split("?")[0] == self.path),
            "data_gets": len(gets),
            "data_gets_complete": sum(1 for e in gets if e.get("completion") == "OK"),
            "body_bytes": get_bytes, "bytes_ratio": round(get_bytes / self.size, 4),
            "requests_list": [f"{e['method']} {e['uri']} {e['status']} "
                              f"{e['body_bytes_sent']}B {e.get('completion') or '-'}"
                              for e in entries],
            "registry_log_crosscheck": self._crosscheck(marks[1]),
        }

    def _crosscheck(self, offset: int) -> dict:
        """Blob GET bytes from the registry's own access log (combined format)."""
        try:
            with open(self.registry.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return {"blob_gets": None, "bytes_ratio": None}
        gets = [m for m in _COMBINED.finditer(text) if m.group(1) == "GET"
                and m.group(2) == self.path]
        total = sum(int(m.group(4)) for m in gets if m.group(4) != "-")
        return {"blob_gets": len(gets), "blob_get_bytes": total,
                "bytes_ratio": round(total / self.size, 4)}

    def describe(self) -> str:
        return ("**upstream: plain** — a distribution registry on plain HTTP, no auth, no "
                "redirect, behind an nginx that only logs (`$body_bytes_sent`); the blob is "
                f"{self.size} random bytes")


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


def front_entries(front: c.NginxProcess) -> list[dict]:
    out = []
    for line in front.access_log_lines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- processes ----------------------------------------------------------------------------

def start_static_nginx(stack: contextlib.ExitStack, work: Path, root: Path,
                       cert) -> tuple[c.NginxProcess, int]:
    """nginx serving files from `root` (sendfile on, tcp_nopush on: the harness defaults),
    on a plain port and on a TLS port with `cert` (chain and key). Returns nginx and the TLS
    port. nginx's TLS has no kernel TLS here (not enabled by default), so over TLS it
    copies the file through OpenSSL as docxy does; sendfile applies to the plain port."""
    port, tls_port = free_port(), free_port()
    body = f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}; }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default lacks TLSv1.3, docxy's has it
        ssl_certificate {cert.chain_path};
        ssl_certificate_key {cert.key_path};
        location / {{ root {root}; }}
    }}
"""
    n = c.NginxProcess("nginx-static", work / "nginx-static", port, body)
    stack.callback(n.stop)
    n.start()
    return n, tls_port


def start_accel_front(stack: contextlib.ExitStack, work: Path, docxy_port: int,
                      cache_dir: Path, cert) -> tuple[c.NginxProcess, int]:
    """nginx in front of a docxy started with --accel-redirect, as the README configures it:
    everything proxied to docxy, and the internal location that serves docxy's cache files
    (sendfile on the plain port). Plain and TLS ports; returns nginx and the TLS port."""
    port, tls_port = free_port(), free_port()
    common = accel_front_locations(docxy_port, cache_dir, ACCEL_PREFIX)
    body = f"""
    server {{
        listen 127.0.0.1:{port};{common}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert.chain_path};
        ssl_certificate_key {cert.key_path};{common}
    }}
"""
    n = c.NginxProcess("nginx-accel", work / "nginx-accel", port, body)
    stack.callback(n.stop)
    n.start()
    return n, tls_port


def docxy_health(d: c.Docxy) -> dict:
    with urllib.request.urlopen(f"{d.plain_url}/health", timeout=10) as r:
        return json.loads(r.read())


def downloads_in_flight(d: c.Docxy) -> int:
    return int(docxy_health(d).get("cache", {}).get("downloads_in_flight", 0))


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tls_session(url: str, cafile: Path) -> str:
    """The protocol and cipher curl negotiates with a TLS server (from `curl -v`)."""
    out = subprocess.run(["curl", "-sv", "--http1.1", "--cacert", str(cafile), "-o",
                          "/dev/null", "--max-time", "10", url + "/"],
                         capture_output=True, text=True, timeout=30)
    m = re.search(r"SSL connection using (.+)", out.stderr)
    return m.group(1).strip() if m else "?"


# --- the parts ----------------------------------------------------------------------------

def measure_pair(args, targets: dict, label: str, size: int) -> dict:
    """Warm pulls from two servers: one unmeasured pull each, then --repeat rounds, the
    order alternating. `targets`: name -> (url, headers(), pids(), cacert)."""
    for name, (url, headers, _, cacert) in targets.items():
        r = c.curl_pull(url, args.pull_timeout, headers=headers(), cacert=cacert)
        if r.get("status") != 200 or r.get("bytes") != size:
            raise RuntimeError(f"warm-up pull from {name} ({label}) failed: {r}")
    pulls = []
    names = list(targets)
    for i in range(args.repeat):
        for name in (names if i % 2 == 0 else names[::-1]):
            url, headers, pids, cacert = targets[name]
            h = headers()
            cpu_before = {p: c.cpu_seconds(p) for p in pids()}
            r = c.curl_pull(url, args.pull_timeout, headers=h, cacert=cacert)
            cpu = sum(c.cpu_seconds(p) - v for p, v in cpu_before.items())
            ok = r.get("status") == 200 and r.get("bytes") == size
            rec = {"round": i, "path": name, "transport": label, "ok": ok, **r,
                   "cpu_s": round(cpu, 3),
                   "mb_per_s": round(r["bytes"] / r["seconds"] / c.MB, 1) if ok else None}
            pulls.append(rec)
            shown = f"{rec['mb_per_s']:8.1f} MB/s" if ok else f"FAILED {r}"
            print(f"warm {label:5s}: round {i + 1}/{args.repeat} {name:6s} {shown} "
                  f"(cpu {cpu:.2f}s)", file=sys.stderr)
    summary = {}
    for name in names:
        mine = [p for p in pulls if p["path"] == name]
        good = [p for p in mine if p["ok"]]
        summary[name] = {
            "pulls": len(mine), "failed": len(mine) - len(good),
            "mb_per_s": c.spread([p["mb_per_s"] for p in good]),
            "cpu_s_per_gb": c.spread([p["cpu_s"] / (size / 1e9) for p in good], 3),
        }
    def ratios(name: str) -> tuple[float | None, dict]:
        """`name`'s MB/s over nginx's: of the medians, and per round."""
        rounds = []
        for i in range(args.repeat):
            x = [p["mb_per_s"] for p in pulls if p["round"] == i and p["path"] == name and p["ok"]]
            y = [p["mb_per_s"] for p in pulls if p["round"] == i and p["path"] == "nginx" and p["ok"]]
            if x and y:
                rounds.append(x[0] / y[0])
        mine, ng = summary[name]["mb_per_s"]["median"], summary["nginx"]["mb_per_s"]["median"]
        return (round(mine / ng, 3) if mine and ng else None), c.spread(rounds, 3)

    out = {"pulls": pulls, "summary": summary}
    out["ratio_of_medians"], out["ratio_per_round"] = ratios("docxy")
    out["accel_ratio_of_medians"], out["accel_ratio_per_round"] = ratios("accel")
    return out


def part_warm(stack, work: Path, args, src) -> dict:
    cache_dir = work / "warm-cache"
    ca, cert = hub.tls_pair(work)
    # Fill the cache: one cold pull through a plain-HTTP docxy, hashed by the client.
    with contextlib.ExitStack() as fill:
        d = c.run_docxy(fill, work / "docxy-warm-plain", src.docxy_args(cache_dir))
        t = time.monotonic()
        cold = hashing_get(d.url, src.path, src.headers(d), args.pull_timeout)
        cold_s = time.monotonic() - t
        if not client_ok(cold, src.digest, src.size):
            raise RuntimeError(f"cold pull through docxy failed: {cold}")
        fpath = hub.cache_file(cache_dir, src.digest)
        wait_until(lambda: fpath.exists() and downloads_in_flight(d) == 0, 60,
                   f"{fpath} to appear")
    print(f"warm: cold pull through docxy {src.size / cold_s / c.MB:.0f} MB/s (hashed by the "
          f"client); cache file {fpath}", file=sys.stderr)
    if fpath.stat().st_size != src.size:
        raise RuntimeError(f"{fpath} has {fpath.stat().st_size} bytes, not {src.size}")
    n, nginx_tls_port = start_static_nginx(stack, work, fpath.parent, cert)
    nginx_pids = lambda: c.nginx_worker_pids(n)  # noqa: E731
    # docxy behind nginx with --accel-redirect: nginx sends the cached file itself.
    accel = c.run_docxy(stack, work / "docxy-accel",
                        src.docxy_args(cache_dir) + ["--accel-redirect", ACCEL_PREFIX])
    front, front_tls_port = start_accel_front(stack, work, accel.port, cache_dir, cert)
    accel_pids = lambda: [accel.process.pid, *c.nginx_worker_pids(front)]  # noqa: E731
    marks = src.marks()
    out: dict = {"cache_file": str(fpath),
                 "cold_pull_through_docxy": {**cold, "mb_per_s": round(src.size / cold_s / c.MB, 1)},
                 "transports": {}, "tls_sessions": {}}
    for transport in TRANSPORTS:
        # The same cache directory, one docxy at a time: with --tls, docxy's plain port only
        # redirects, so each transport has its own daemon.
        with contextlib.ExitStack() as phase:
            tls = (cert.chain_path, cert.key_path) if transport == "tls" else None
            d = c.run_docxy(phase, work / f"docxy-warm-{transport}", src.docxy_args(cache_dir),
                            tls=tls)
            cacert = ca.root_path if tls else None
            nginx_url = (f"https://127.0.0.1:{nginx_tls_port}" if tls
                         else f"http://127.0.0.1:{n.port}")
            if tls:
                out["tls_sessions"] = {"docxy": tls_session(d.url, ca.root_path),
                                       "nginx": tls_session(nginx_url, ca.root_path)}
            targets = {
                # a fresh token for every pull, as every `docker pull` gets one
                "docxy": (f"{d.url}{src.path}", lambda d=d, ca=cacert: src.headers(d, ca),
                          lambda d=d: [d.process.pid], cacert),
                "nginx": (f"{nginx_url}/{fpath.name}", dict, nginx_pids, cacert),
                "accel": ((f"https://127.0.0.1:{front_tls_port}" if tls
                           else f"http://127.0.0.1:{front.port}") + src.path,
                          lambda ca=cacert: src.headers(accel, None), accel_pids, cacert),
            }
            out["transports"][transport] = measure_pair(args, targets, transport, src.size)
            out["transports"][transport]["docxy_health_after"] = docxy_health(d)
    hub.wait_for_logs(1.0)
    traffic = src.traffic(marks)
    out["upstream_during_warm_pulls"] = traffic
    out["target_ratio"] = WARM_TARGET
    ratios = [out["transports"][t]["ratio_of_medians"] for t in TRANSPORTS]
    out["met"] = (all(r is not None and r >= WARM_TARGET for r in ratios)
                  and traffic["data_gets"] == 0 and traffic["blob_gets"] == 0)
    n.stop()
    return out


def part_cold(stack, work: Path, args, src) -> dict:
    out: dict = {"clients": args.clients}
    for name in ("docxy", "distproxy"):
        with contextlib.ExitStack() as sub:
            if name == "docxy":
                cache_dir = work / "cold-cache"
                sub.callback(shutil.rmtree, cache_dir, ignore_errors=True)
                d = c.run_docxy(sub, work / "docxy-cold", src.docxy_args(cache_dir))
                base, headers, pid = d.url, src.headers(d), d.process.pid
                done_file = hub.cache_file(cache_dir, src.digest)
                stored_check = lambda: done_file.exists() and downloads_in_flight(d) == 0  # noqa: E731
            else:
                reg = src.start_distproxy(sub, work, "distproxy-cold")
                sub.callback(shutil.rmtree, reg.settings.storage_dir, ignore_errors=True)
                base, headers, pid = reg.url, {}, reg.process.pid
                done_file = hub.distproxy_blob_file(Path(reg.settings.storage_dir), src.digest)
                stored_check = lambda: done_file.exists() and done_file.stat().st_size == src.size  # noqa: E731
            time.sleep(0.5)
            marks = src.marks()
            cpu0 = c.cpu_seconds(pid)
            with c.RssSampler(lambda: [pid], 0.1) as sampler:
                results, wall = concurrent_gets(base, src.path, headers, args.clients,
                                                args.pull_timeout)
            # The proxy may still be filling its store: wait until the blob is stored and
            # nothing is in flight, then give nginx a moment to write its last lines.
            stored = True
            try:
                wait_until(stored_check, 120, f"{name} to store the blob")
            except RuntimeError as e:
                stored = False
                print(f"cold: {name}: {e}", file=sys.stderr)
            cpu = c.cpu_seconds(pid) - cpu0
            hub.wait_for_logs(1.5)
            traffic = src.traffic(marks)
            good = sum(1 for r in results if client_ok(r, src.digest, src.size))
            rec = {
                "clients_ok": good,
                "clients_failed": [r for r in results if not client_ok(r, src.digest, src.size)],
                "wall_s": round(wall, 2),
                "aggregate_mb_per_s": round(good * src.size / wall / c.MB, 1),
                "client_seconds": sorted(r.get("seconds", 0) for r in results),
                "cpu_s": round(cpu, 2),
                "peak_rss_mb": round(sampler.peak / c.MB, 1),
                "stored": stored,
                "upstream": traffic,
            }
            if name == "docxy":
                rec["docxy_health_after"] = docxy_health(d)
            out[name] = rec
            print(f"cold: {name:9s} {good}/{args.clients} clients ok in {wall:.1f}s; upstream "
                  f"sent {traffic['body_bytes']} bytes = {traffic['bytes_ratio']} x blob "
                  f"({traffic['data_gets']} data GETs, {traffic['by_method']})", file=sys.stderr)
    dx = out["docxy"]
    out["met"] = dx["clients_ok"] == args.clients and dx["upstream"]["body_bytes"] == src.size
    out["target_bytes_ratio"] = COLD_TARGET
    return out


def part_docker(stack, work: Path, args) -> dict:
    from harness.clients import DockerDaemon
    from harness.upstream import Upstream

    up = Upstream.start(work / "hub", large_layer_size=args.large_layer_mb << 20,
                        cache_dir=work / "images")
    stack.callback(up.stop)
    d = c.run_docxy(stack, work / "docxy-docker",
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
    results: dict = {"benchmark": "cache", "machine": info, "parts": args.parts,
                     "upstream": args.upstream, "size_mib": args.size_mb,
                     "repeat": args.repeat, "clients": args.clients}
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-cache-"))
        print(f"work directory {work}", file=sys.stderr)
        if "warm" in args.parts or "cold" in args.parts:
            with contextlib.ExitStack() as source_stack:
                src = (HubSource if args.upstream == "hub" else PlainSource)(
                    source_stack, work, args)
                results.update(blob_bytes=src.size, blob_digest=src.digest,
                               upstream_description=src.describe())
                if "warm" in args.parts:
                    results["warm"] = part_warm(stack, work, args, src)
                    shutil.rmtree(work / "warm-cache", ignore_errors=True)
                if "cold" in args.parts:
                    results["cold"] = part_cold(stack, work, args, src)
            shutil.rmtree(work / "upstream", ignore_errors=True)
            shutil.rmtree(work / "upstream-storage", ignore_errors=True)
        if "docker" in args.parts:
            results["docker"] = part_docker(stack, work, args)
    results["run_seconds"] = round(time.monotonic() - t_start, 1)
    return results


def verdict(ok: bool | None) -> str:
    return "met" if ok else "NOT met"


def render_warm(results: dict) -> str:
    w = results["warm"]
    size_mib = results["size_mib"]
    rows = []
    for transport in TRANSPORTS:
        tr = w["transports"][transport]
        for name, s in tr["summary"].items():
            label = {"docxy": "docxy (cache)", "nginx": "nginx static, same file",
                     "accel": "nginx in front of docxy --accel-redirect"}[name]
            rows.append([transport, label, str(s["mb_per_s"]["median"]),
                         f"{s['mb_per_s']['min']}–{s['mb_per_s']['max']}",
                         ", ".join(str(x) for x in s["mb_per_s"]["all"]),
                         c.fmt_spread(s["cpu_s_per_gb"]), f"{s['failed']}/{s['pulls']}"])
    t = c.table(["transport", "server", "MB/s median", "min–max", "every pull (MB/s)",
                 "server CPU s/GB median (min–max)", "failed"], rows)
    r_rows = []
    for label, key in (("docxy/nginx", ""),
                       ("(docxy behind nginx, --accel-redirect)/nginx", "accel_")):
        for transport in TRANSPORTS:
            tr = w["transports"][transport]
            ratio = tr[f"{key}ratio_of_medians"]
            r_rows.append([f"{label}, {transport}", str(ratio),
                           c.fmt_spread(tr[f"{key}ratio_per_round"]), f"≥ {w['target_ratio']}",
                           verdict((ratio or 0) >= w["target_ratio"])])
    r = c.table(["ratio", "of the medians", "per round: median (min–max)", "target", ""], r_rows)
    u = w["upstream_during_warm_pulls"]
    listing = "\n".join(f"  - `{x}`" for x in u["requests_list"]) or "  - none"
    sessions = ", ".join(f"{k} {v}" for k, v in w["tls_sessions"].items())
    return (f"## 1. Warm pull of one {size_mib} MiB blob from the cache, plain HTTP and TLS\n\n"
            f"curl --http1.1 -o /dev/null, one unmeasured pull each, then {results['repeat']} "
            f"pulls each per transport, order alternated; nginx serves docxy's own cache file "
            f"(`root` = its directory, `sendfile on`; over TLS nginx has no kernel TLS, so it "
            f"copies through OpenSSL). TLS: docxy `--tls --cert --key`, nginx `listen ssl` with "
            f"the same certificate and key (harness pki, EC P-256; nginx with `ssl_protocols "
            f"TLSv1.2 TLSv1.3`, as nginx 1.22 offers no TLSv1.3 by default); negotiated with "
            f"curl: {sessions}. "
            f"docxy's clients get a fresh token from docxy's /auth/token for every pull. The "
            f"cold pull that filled the cache: "
            f"{w['cold_pull_through_docxy']['mb_per_s']} MB/s (the client hashed it).\n\n"
            f"{t}\n{r}\n"
            f"Upstream during the warm pulls (both transports, warm-ups included): blob GETs "
            f"{u['blob_gets']}, blob data GETs {u['data_gets']} (must be 0), all requests "
            f"{u['by_method'] or 'none'}:\n{listing}\n\n")


def render_cold(results: dict) -> str:
    cd = results["cold"]
    rows = []
    for name in ("docxy", "distproxy"):
        r = cd[name]
        u = r["upstream"]
        cross = u.get("registry_log_crosscheck", {}).get("bytes_ratio", "–")
        rows.append([name if name == "docxy" else "distribution proxy",
                     f"{r['clients_ok']}/{cd['clients']}", f"{u['body_bytes']}",
                     f"**{u['bytes_ratio']}**", str(u["blob_gets"]), str(u["data_gets"]),
                     str(u["blob_heads"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(u["by_method"].items())),
                     str(cross), str(r["wall_s"]), str(r["aggregate_mb_per_s"]),
                     str(r["cpu_s"]), str(r["peak_rss_mb"])])
    data = "CDN GETs" if results["upstream"] == "hub" else "data GETs"
    t = c.table(["path", "clients ok", "upstream bytes", "bytes / blob", "registry blob GETs",
                 data, "blob HEADs", "all registry requests", "cross-check ratio", "wall s",
                 "aggregate MB/s", "CPU s", "peak RSS MB"], rows)
    return (f"## 2. {cd['clients']} concurrent cold pulls of one {results['size_mib']} MiB blob"
            f"\n\nEach client reads the whole body and checks its sha256 (docxy's clients with "
            f"one token from docxy's /auth/token). A fresh docxy with an empty cache, then a "
            f"fresh distribution proxy with empty storage.\n\n{t}\n"
            f"docxy: upstream bytes / blob size = {cd['docxy']['upstream']['bytes_ratio']} "
            f"(target exactly {cd['target_bytes_ratio']}: {verdict(cd['met'])})\n\n")


def render_docker(results: dict) -> str:
    dk = results["docker"]
    rows = []
    for p in dk["pulls"]:
        m = p["registry_by_method"]
        rows.append([p["pull"], str(m.get("HEAD", 0)), str(m.get("GET", 0)),
                     str(p["registry_requests"] - m.get("HEAD", 0) - m.get("GET", 0)),
                     str(p["token_requests"]), str(p["cdn_requests"]), str(p["seconds"])])
    out = [f"## 3. Upstream requests of one `docker pull` of a multi-arch image\n\n"
           f"{dk['image']} through docxy (`--library`), a Hub-like upstream (TLS front, "
           f"token auth, CDN redirects, large layer {dk['large_layer_bytes'] // c.MiB} "
           f"MiB); each pull by a fresh dockerd.\n\n",
           c.table(["pull", "registry HEADs", "registry GETs", "other",
                    "token requests", "CDN requests", "seconds"], rows)]
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


def render(results: dict) -> str:
    command = (f"python bench/cache.py --parts {','.join(results['parts'])} --upstream "
               f"{results['upstream']} --size-mb {results['size_mib']} --repeat "
               f"{results['repeat']} --clients {results['clients']}"
               + c.extra_flags(results))
    out = ["# docxy's pull-through cache\n\n", f"Command: `{command}`\n\n",
           c.machine_markdown(results["machine"]),
           f"- run time {results['run_seconds']} s; MB = 10^6 bytes\n"]
    if "upstream_description" in results:
        out.append(f"- warm and cold parts: {results['upstream_description']}\n")
    out.append("\n")
    if "warm" in results:
        out.append(render_warm(results))
    if "cold" in results:
        out.append(render_cold(results))
    if "docker" in results:
        out.append(render_docker(results))
    return "".join(out)


def all_met(results: dict) -> bool:
    return all(results[p]["met"] for p in ALL_PARTS if p in results)


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render, all_met)


if __name__ == "__main__":
    sys.exit(main())
