#!/usr/bin/env python3
"""docxy's memory while many slow clients pull the same large blob at once.

N clients (--clients, default 20) each read at most R MB/s (--rate-mb, default 5; MB =
10^6 bytes) from docxy, all starting together, for at most --seconds (default 30): then
they hang up even if not done, and each reports the bytes it got. The rate limit is in the
client (one thread per client, a raw socket, recv and sleep), so the kernel's TCP flow
control is what pushes back on docxy, and docxy's producer/consumer backpressure is what
must pause its upstream connections; without it docxy would buffer the difference between
the upstream's speed and the clients' in memory.

docxy's VmRSS (/proc/PID/status) is sampled every 0.2 s: idle (after start and one small
request), peak under load, and after the clients went away. Target: peak < 150 MB. Also
checked: after the clients hung up, docxy holds no upstream connection whose transfer was cut
short (idle keep-alive connections of completed upstream transfers may stay pooled).
With --nginx (default unbuffered) the same load runs through an nginx proxy_pass worker for
comparison. Results go to bench/results/slow_clients.{json,md}.
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

TARGET_PEAK_MB = 150


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    p.add_argument("--rate-mb", type=float, default=5.0,
                   help="per-client read limit in MB/s, 10^6 bytes (default 5)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="clients hang up after this many seconds (default 30)")
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB (default 512)")
    p.add_argument("--interval", type=float, default=0.2,
                   help="RSS sampling interval in seconds (default 0.2)")
    p.add_argument("--nginx", choices=("unbuffered", "buffered", "none"), default="unbuffered",
                   help="also run the same load through nginx proxy_pass: 'unbuffered' "
                        "(proxy_buffering off, a streaming proxy like docxy), 'buffered' "
                        "(nginx defaults: spools to temp files on disk, several GB with the "
                        "defaults here) or 'none' (default unbuffered)")
    p.add_argument("--results-dir", type=Path, default=c.RESULTS_DIR,
                   help="where slow_clients.json/.md go (default bench/results)")
    p.add_argument("--results-name", default="slow_clients",
                   help="base name of the results files (default slow_clients)")
    p.add_argument("--no-results", action="store_true", help="print only, write no files")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (logs, configs, storage) afterwards")
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
                 start_barrier: threading.Barrier, stop: threading.Event) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.port, self.path, self.rate, self.deadline = port, path, rate, deadline
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
                         f"User-Agent: docxy-bench-slow-client\r\nConnection: close\r\n\r\n"
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


def run_load(port: int, path: str, args, pids_fn, label: str) -> dict:
    """Start the clients, sample RSS of pids_fn() until they are done; return the figures."""
    n = args.clients
    rate = args.rate_mb * c.MB
    barrier = threading.Barrier(n + 1)
    stop = threading.Event()
    clients: list[SlowClient] = []
    # The clients wait at the barrier; their common deadline is set just before it opens.
    for i in range(n):
        clients.append(SlowClient(i, port, path, rate, float("inf"), barrier, stop))
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


def upstream_transfers(upstream, offset: int, path: str, size: int) -> tuple[int, int]:
    """(complete, cut) blob GETs in the upstream registry's access log after `offset`. A
    small blob can reach docxy whole before the client hangs up (kernel socket buffers on
    loopback hold megabytes): such an upstream connection goes back to the keep-alive pool."""
    with open(upstream.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    done = cut = 0
    for line in text.splitlines():
        marker = f'"GET {path} HTTP/1.1" '
        if marker not in line:
            continue
        fields = line.split(marker, 1)[1].split()
        if len(fields) >= 2 and fields[1].isdigit():
            if int(fields[1]) == size:
                done += 1
            else:
                cut += 1
    return done, cut


def settle_rss(pids_fn, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return sum(c.rss_bytes(p) for p in pids_fn())


def run(args) -> dict:
    info = c.machine_info()
    size = args.size_mb * c.MiB
    results: dict = {"benchmark": "slow_clients", "machine": info, "blob_bytes": size,
                     "clients": args.clients, "rate_mb_per_s": args.rate_mb,
                     "seconds": args.seconds, "interval": args.interval,
                     "target_peak_mb": TARGET_PEAK_MB, "runs": {}}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-slow-"))
        print(f"work directory {work}", file=sys.stderr)
        blob = c.make_random_blob(work / "blob.bin", size)
        upstream = c.start_registry(stack, work, "upstream")
        c.push_blob(upstream.url, c.REPOSITORY, blob)
        blob.path.unlink()
        path = c.blob_path(c.REPOSITORY, blob.digest)
        print(f"blob {blob.digest} ({size} bytes) in {upstream.url}", file=sys.stderr)

        # --- docxy ---------------------------------------------------------------------
        d = c.start_docxy(stack, work, upstream.url)
        pid = d.process.pid
        docxy_pids = lambda: [pid]  # noqa: E731
        rss_start = c.rss_bytes(pid)
        req = urllib.request.Request(d.url + path, method="HEAD")
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200 or int(r.headers["Content-Length"]) != size:
                raise RuntimeError(f"HEAD through docxy: {r.status} {dict(r.headers)}")
        idle = settle_rss(docxy_pids, 1.0)
        print(f"docxy pid {pid}: RSS {rss_start / c.MB:.1f} MB at start, "
              f"{idle / c.MB:.1f} MB idle; {args.clients} clients x {args.rate_mb} MB/s for "
              f"{args.seconds:g}s ...", file=sys.stderr)
        log_offset = upstream.log_path.stat().st_size
        load = run_load(d.port, path, args, docxy_pids, "docxy")
        after = settle_rss(docxy_pids, 3.0)
        upstream_conns = c.established_to(pid, upstream.port)
        upstream_done, upstream_cut = upstream_transfers(upstream, log_offset, path, size)
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
            n = c.start_nginx(stack, work, upstream.port, buffering=buffered,
                              name=f"nginx-{args.nginx}")
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
            load_n.update({"idle_rss": idle_n, "rss_after": settle_rss(workers, 1.0),
                           "disk_used_peak_delta": disk_peak[0],
                           "note": c.NGINX_DEFAULTS_NOTE if buffered
                           else "nginx proxy_pass with proxy_buffering off"})
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
    size_mib = results["blob_bytes"] // c.MiB
    return (f"# Slow clients: docxy memory under load\n\n"
            f"{c.machine_markdown(results['machine'])}"
            f"- load: {results['clients']} clients, each reading at most "
            f"{results['rate_mb_per_s']:g} MB/s, all at once, the same {size_mib} MiB blob, "
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
