#!/usr/bin/env python3
"""docxy's memory while many slow clients pull the same large blob at once, on the path
users have.

N clients (--clients, default 20) each read at most R MB/s (--rate-mb, default 5; MB =
10^6 bytes) from docxy, all starting together, for at most --seconds (default 30): then
they hang up even if not done, and each reports the bytes it got. The rate limit is in the
client (one thread per client, a raw socket, recv and sleep), so the kernel's TCP flow
control is what pushes back on docxy, and docxy's producer/consumer backpressure is what
must pause its upstream connections; without it docxy would buffer the difference between
the upstream's speed and the clients' in memory.

docxy's VmRSS (/proc/PID/status) is sampled every 0.2 s: idle (after start and one small
request), peak under load, and after the clients went away. Target: peak < 100 MB. Also
checked: after the clients hung up, docxy holds no upstream connection whose transfer was cut
short (idle keep-alive connections of completed upstream transfers may stay pooled).
With --nginx (default unbuffered) the same load runs through an nginx worker for comparison.

--upstream hub (default): the suite's Hub-like upstream (TLS front, token auth, 307 to a TLS
CDN), the blob being the large layer of library/large; docxy (cache on, as installed) mirrors
it with --upstream-ca and --library, its clients send a token from docxy's /auth/token; nginx
follows the redirect itself with an upstream token (as in throughput.py). Upstream transfers
are the CDN's. --upstream plain: a plain-HTTP registry without auth, nginx proxy_pass to it.
Results go to bench/results/<--results-name>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import _common as c
import _hub as hub

TARGET_PEAK_MB = 100


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", choices=("hub", "plain"), default="hub",
                   help="hub: TLS registry, token auth, 307 to a TLS CDN (default); plain: a "
                        "plain-HTTP registry without auth or redirect")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    p.add_argument("--rate-mb", type=float, default=5.0,
                   help="per-client read limit in MB/s, 10^6 bytes (default 5)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="clients hang up after this many seconds (default 30)")
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB (default 512; hub: random bytes in the large "
                        "layer, a gzip'd tar a little larger)")
    p.add_argument("--layer-cache", type=Path, default=None,
                   help="hub: build the large layer here and keep it for the next run "
                        "(default: in the scratch directory, removed afterwards)")
    p.add_argument("--interval", type=float, default=0.2,
                   help="RSS sampling interval in seconds (default 0.2)")
    p.add_argument("--nginx", choices=("unbuffered", "buffered", "none"), default="unbuffered",
                   help="also run the same load through nginx proxy_pass: 'unbuffered' "
                        "(proxy_buffering off, a streaming proxy like docxy), 'buffered' "
                        "(nginx defaults: spools to temp files on disk, several GB with the "
                        "defaults here) or 'none' (default unbuffered)")
    c.add_common_options(p, "slow_clients")
    args = p.parse_args(argv)
    if args.clients < 1 or args.clients > 500:
        p.error("--clients must be 1..500")
    if args.rate_mb <= 0 or args.seconds <= 0 or args.seconds > 600:
        p.error("--rate-mb must be > 0 and --seconds in (0, 600]")
    return args


class SlowClient(threading.Thread):
    """GET `path` from 127.0.0.1:`port` and read the body at most `rate` bytes/s until
    `deadline` (time.monotonic()) or the end of the body."""

    CHUNK = 64 * 1024

    def __init__(self, index: int, port: int, path: str, rate: float, deadline: float,
                 start_barrier: threading.Barrier, stop: threading.Event,
                 headers: dict[str, str]) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.port, self.path, self.rate, self.deadline = port, path, rate, deadline
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.start_barrier, self.stop_event = start_barrier, stop
        self.status: int | None = None
        self.content_length: int | None = None
        self.body_bytes = 0
        self.complete = False
        self.error: str | None = None
        self.ttfb: float | None = None

    def run(self) -> None:
        sock = None
        try:
            self.start_barrier.wait(30)
            t0 = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                         f"User-Agent: docxy-bench-slow-client\r\n{self.headers}Connection: close\r\n\r\n"
                         .encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("closed before the response headers")
                head += data
                if len(head) > 65536:
                    raise ConnectionError("response headers too long")
            self.ttfb = time.monotonic() - t0
            head, rest = head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    self.content_length = int(v.strip())
            self.body_bytes = len(rest)
            t_body = time.monotonic()
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= self.deadline:
                    break
                if self.content_length is not None and self.body_bytes >= self.content_length:
                    break
                allowed = self.rate * (now - t_body) - self.body_bytes
                if allowed < self.CHUNK / 4:
                    # Sleep until a reasonable chunk is allowed (or the deadline).
                    wait = (self.CHUNK / 4 - allowed) / self.rate
                    time.sleep(max(0.001, min(wait, self.deadline - now)))
                    continue
                sock.settimeout(max(0.1, min(10.0, self.deadline - now)))
                try:
                    data = sock.recv(int(min(allowed, self.CHUNK)))
                except socket.timeout:
                    continue
                if not data:
                    break
                self.body_bytes += len(data)
            self.complete = (self.content_length is not None
                             and self.body_bytes == self.content_length)
        except Exception as e:  # noqa: BLE001 - report every failure per client
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


def run_load(port: int, path: str, args, pids_fn, label: str,
             headers: dict[str, str] | None = None) -> dict:
    """Start the clients, sample RSS of pids_fn() until they are done; return the figures."""
    n = args.clients
    rate = args.rate_mb * c.MB
    barrier = threading.Barrier(n + 1)
    stop = threading.Event()
    clients: list[SlowClient] = []
    # The clients wait at the barrier; their common deadline is set just before it opens.
    for i in range(n):
        clients.append(SlowClient(i, port, path, rate, float("inf"), barrier, stop,
                                  headers or {}))
    for cl in clients:
        cl.start()
    cpu0 = {p: c.cpu_seconds(p) for p in pids_fn()}
    sampler = c.RssSampler(pids_fn, args.interval)
    try:
        with sampler:
            start = time.monotonic()
            deadline = start + args.seconds
            for cl in clients:
                cl.deadline = deadline
            barrier.wait(30)
            for cl in clients:
                cl.join(max(0.0, deadline + 15 - time.monotonic()))
            load_seconds = time.monotonic() - start
    finally:
        stop.set()
        for cl in clients:
            cl.join(5)
    cpu1 = {p: c.cpu_seconds(p) for p in cpu0}
    got = [cl.body_bytes for cl in clients]
    per_client = [{"status": cl.status, "bytes": cl.body_bytes, "complete": cl.complete,
                   "ttfb_s": round(cl.ttfb, 3) if cl.ttfb is not None else None,
                   "error": cl.error} for cl in clients]
    total = sum(got)
    return {
        "label": label,
        "peak_rss": sampler.peak,
        "rss_series": [(round(t, 2), v) for t, v in sampler.samples],
        "load_seconds": round(load_seconds, 2),
        "cpu_seconds": round(sum(cpu1[p] - cpu0[p] for p in cpu0), 2),
        "clients": per_client,
        "bytes_total": total,
        "bytes_min": min(got), "bytes_max": max(got),
        "aggregate_mb_per_s": round(total / min(load_seconds, args.seconds) / c.MB, 1),
        "status_counts": {str(s): sum(1 for cl in clients if cl.status == s)
                          for s in {cl.status for cl in clients}},
        "errors": [cl.error for cl in clients if cl.error],
        "completed": sum(1 for cl in clients if cl.complete),
    }


class HubSource:
    """The Hub-like upstream; docxy's upstream transfers are the CDN's GETs of the blob."""

    name = "hub"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        self.blob = hub.start_hub(stack, work, args.size_mb * c.MiB, args.layer_cache)
        self.up = self.blob.up
        self.size, self.path = self.blob.size, self.blob.path

    def start_docxy(self, stack, work: Path) -> c.Docxy:
        return hub.start_docxy(stack, work / "docxy", self.up)

    def headers(self, d: c.Docxy) -> dict[str, str]:
        return hub.bearer(hub.docxy_token(d, self.up))

    def start_nginx(self, stack, work: Path, buffered: bool, name: str) -> c.NginxProcess:
        return hub.start_nginx_follow(stack, work, self.up, buffering=buffered, name=name)

    @property
    def transfer_port(self) -> int:
        """The port docxy's blob transfers come from (the CDN's)."""
        return self.up.cdn.port

    def transfer_mark(self) -> int:
        return len(self.up.cdn_log_lines())

    def transfers(self, mark: int) -> tuple[int, int]:
        """(complete, cut) CDN GETs of the blob after `mark`."""
        done = cut = 0
        for e in self.up.cdn_log_entries()[mark:]:
            if e["method"] == "GET" and e["uri"].split("?")[0] == self.blob.cdn_path:
                if int(e["body_bytes_sent"]) == self.size and e.get("completion") == "OK":
                    done += 1
                else:
                    cut += 1
        return done, cut

    def describe(self) -> str:
        return ("**path: hub** — the suite's Hub-like upstream (distribution behind an nginx TLS "
                "front, token auth, blob GETs answered 307 to an nginx TLS CDN); the blob is "
                f"the large layer of `{hub.REPOSITORY}`; docxy mirrors it (cache on), its "
                "clients send a token from docxy's /auth/token; nginx follows the redirect "
                "with an upstream token of its own")


class PlainSource:
    """A plain-HTTP registry without auth or redirect (the old path)."""

    name = "plain"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        self.size = args.size_mb * c.MiB
        blob = c.make_random_blob(work / "blob.bin", self.size)
        self.registry = c.start_registry(stack, work, "upstream")
        c.push_blob(self.registry.url, c.REPOSITORY, blob)
        blob.path.unlink()
        self.path = c.blob_path(c.REPOSITORY, blob.digest)
        print(f"blob {blob.digest} ({self.size} bytes) in {self.registry.url}", file=sys.stderr)

    def start_docxy(self, stack, work: Path) -> c.Docxy:
        return c.start_docxy(stack, work, self.registry.url)

    def headers(self, d: c.Docxy) -> dict[str, str]:
        return {}

    def start_nginx(self, stack, work: Path, buffered: bool, name: str) -> c.NginxProcess:
        return c.start_nginx(stack, work, self.registry.port, buffering=buffered, name=name)

    @property
    def transfer_port(self) -> int:
        return self.registry.port

    def transfer_mark(self) -> int:
        return self.registry.log_path.stat().st_size

    def transfers(self, offset: int) -> tuple[int, int]:
        """(complete, cut) blob GETs in the upstream registry's access log after `offset`. A
        small blob can reach docxy whole before the client hangs up (kernel socket buffers on
        loopback hold megabytes): such an upstream connection goes back to the keep-alive
        pool."""
        with open(self.registry.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        done = cut = 0
        marker = f'"GET {self.path} HTTP/1.1" '
        for line in text.splitlines():
            if marker not in line:
                continue
            fields = line.split(marker, 1)[1].split()
            if len(fields) >= 2 and fields[1].isdigit():
                if int(fields[1]) == self.size:
                    done += 1
                else:
                    cut += 1
        return done, cut

    def describe(self) -> str:
        return ("**path: plain** — a distribution registry on plain HTTP, no auth, no redirect; "
                "the blob is random bytes; nginx = proxy_pass to it")


def settle_rss(pids_fn, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return sum(c.rss_bytes(p) for p in pids_fn())


def run(args) -> dict:
    info = c.machine_info()
    results: dict = {"benchmark": "slow_clients", "machine": info, "upstream": args.upstream,
                     "size_mib": args.size_mb,
                     "clients": args.clients, "rate_mb_per_s": args.rate_mb,
                     "seconds": args.seconds, "interval": args.interval,
                     "target_peak_mb": TARGET_PEAK_MB, "runs": {}}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-slow-"))
        print(f"work directory {work}", file=sys.stderr)
        src = (HubSource if args.upstream == "hub" else PlainSource)(stack, work, args)
        size, path = src.size, src.path
        results["blob_bytes"], results["path_description"] = size, src.describe()

        # --- docxy ---------------------------------------------------------------------
        d = src.start_docxy(stack, work)
        pid = d.process.pid
        docxy_pids = lambda: [pid]  # noqa: E731
        rss_start = c.rss_bytes(pid)
        headers = src.headers(d)
        req = urllib.request.Request(d.url + path, method="HEAD", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200 or int(r.headers["Content-Length"]) != size:
                raise RuntimeError(f"HEAD through docxy: {r.status} {dict(r.headers)}")
        idle = settle_rss(docxy_pids, 1.0)
        print(f"docxy pid {pid}: RSS {rss_start / c.MB:.1f} MB at start, "
              f"{idle / c.MB:.1f} MB idle; {args.clients} clients x {args.rate_mb} MB/s for "
              f"{args.seconds:g}s ...", file=sys.stderr)
        mark = src.transfer_mark()
        load = run_load(d.port, path, args, docxy_pids, "docxy", headers)
        after = settle_rss(docxy_pids, 3.0)
        upstream_conns = c.established_to(pid, src.transfer_port)
        upstream_done, upstream_cut = src.transfers(mark)
        with urllib.request.urlopen(d.url + "/health", timeout=10) as r:
            healthy = r.status == 200
        load.update({"rss_at_start": rss_start, "idle_rss": idle, "rss_after": after,
                     "upstream_connections_after": upstream_conns,
                     "upstream_transfers_complete": upstream_done,
                     "upstream_transfers_cut": upstream_cut,
                     "healthy_after": healthy, "alive_after": d.process.running()})
        results["runs"]["docxy"] = load
        report_line(load, args)
        d.stop()

        # --- nginx (comparison) --------------------------------------------------------
        if args.nginx != "none":
            buffered = args.nginx == "buffered"
            n = src.start_nginx(stack, work, buffered, f"nginx-{args.nginx}")
            workers = lambda: c.nginx_worker_pids(n)  # noqa: E731
            idle_n = settle_rss(workers, 0.5)
            disk0 = shutil.disk_usage(work).used
            disk_peak = [0]
            stop_disk = threading.Event()

            def watch_disk():
                while not stop_disk.is_set():
                    disk_peak[0] = max(disk_peak[0], shutil.disk_usage(work).used - disk0)
                    stop_disk.wait(0.5)
            watcher = threading.Thread(target=watch_disk, daemon=True)
            watcher.start()
            try:
                print(f"nginx ({args.nginx}) worker(s) {workers()}: same load ...",
                      file=sys.stderr)
                load_n = run_load(n.port, path, args, workers, f"nginx-{args.nginx}")
            finally:
                stop_disk.set()
                watcher.join(2)
            note = (hub.NGINX_FOLLOW_NOTE if args.upstream == "hub" else c.NGINX_DEFAULTS_NOTE)
            note += ("; nginx's default buffering" if buffered else "; proxy_buffering off")
            load_n.update({"idle_rss": idle_n, "rss_after": settle_rss(workers, 1.0),
                           "disk_used_peak_delta": disk_peak[0], "note": note})
            results["runs"][f"nginx-{args.nginx}"] = load_n
            report_line(load_n, args)
    return results


def report_line(load: dict, args) -> None:
    print(f"  {load['label']}: peak RSS {load['peak_rss'] / c.MB:.1f} MB, "
          f"{load['aggregate_mb_per_s']} MB/s aggregate, per client "
          f"{load['bytes_min'] / c.MB:.1f}–{load['bytes_max'] / c.MB:.1f} MB, "
          f"{load['completed']} complete, {len(load['errors'])} errors", file=sys.stderr)


def passed(dx: dict) -> bool:
    """docxy's verdict: peak under the target, no client errors, no upstream connection left
    behind by a cut transfer, still healthy."""
    return (dx["peak_rss"] < TARGET_PEAK_MB * c.MB and not dx["errors"]
            and dx["upstream_connections_after"] <= dx["upstream_transfers_complete"]
            and dx["healthy_after"] and dx["alive_after"])


def render(results: dict) -> str:
    rows = []
    for name, r in results["runs"].items():
        rows.append([
            name,
            f"{r['idle_rss'] / c.MB:.1f}",
            f"{r['peak_rss'] / c.MB:.1f}",
            f"{r['rss_after'] / c.MB:.1f}",
            f"{r['aggregate_mb_per_s']}",
            f"{r['bytes_min'] / c.MB:.1f}–{r['bytes_max'] / c.MB:.1f}",
            f"{r['completed']}/{len(r['clients'])}",
            str(len(r["errors"])),
            f"{r['cpu_seconds']}",
        ])
    t = c.table(["process", "idle RSS MB", "peak RSS MB", "RSS after MB", "aggregate MB/s",
                 "MB per client (min–max)", "complete", "errors", "CPU s"], rows)
    dx = results["runs"]["docxy"]
    verdict = "PASS" if passed(dx) else "FAIL"
    extra = ""
    for name, r in results["runs"].items():
        if "disk_used_peak_delta" in r:
            extra += (f"- {name}: {r['note']}; peak extra disk use in the work directory's "
                      f"file system during the load: {r['disk_used_peak_delta'] / c.MB:.0f} MB\n")
    size_mib = results["size_mib"]
    command = (f"python bench/slow_clients.py --upstream {results['upstream']} --clients "
               f"{results['clients']} --rate-mb {results['rate_mb_per_s']:g} --seconds "
               f"{results['seconds']:g} --size-mb {size_mib} --nginx "
               f"{next((k[6:] for k in results['runs'] if k.startswith('nginx-')), 'none')}"
               + c.extra_flags(results))
    return (f"# Slow clients: docxy memory under load ({results['upstream']} path)\n\n"
            f"Command: `{command}`\n\n"
            f"- {results['path_description']}\n"
            f"{c.machine_markdown(results['machine'])}"
            f"- load: {results['clients']} clients, each reading at most "
            f"{results['rate_mb_per_s']:g} MB/s, all at once, the same blob "
            f"({results['blob_bytes']} bytes), "
            f"hanging up after {results['seconds']:g} s (ideal aggregate "
            f"{results['clients'] * results['rate_mb_per_s']:g} MB/s); MB = 10^6 bytes\n"
            f"- RSS = VmRSS sampled every {results['interval']} s (nginx: its worker)\n"
            f"{extra}\n{t}\n"
            f"docxy: RSS at start {dx['rss_at_start'] / c.MB:.1f} MB, idle "
            f"{dx['idle_rss'] / c.MB:.1f} MB, peak {dx['peak_rss'] / c.MB:.1f} MB "
            f"(target < {TARGET_PEAK_MB} MB), after the clients left "
            f"{dx['rss_after'] / c.MB:.1f} MB; upstream connections still open after the "
            f"clients hung up: {dx['upstream_connections_after']} (the upstream logged "
            f"{dx['upstream_transfers_cut']} transfers cut short, whose connections must be "
            f"closed, and {dx['upstream_transfers_complete']} complete, whose connections may "
            f"stay in the keep-alive pool); /health afterwards: "
            f"{'200' if dx['healthy_after'] else 'FAILED'}. Verdict: **{verdict}**\n")


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render,
                           lambda results: passed(results["runs"]["docxy"]))


if __name__ == "__main__":
    sys.exit(main())
