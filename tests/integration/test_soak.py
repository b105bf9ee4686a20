"""Soak: 20 000 requests of mixed kinds through one docxy; its memory and open files at
the end stay within 10 % of their level after warm-up (no leak per request).

Warm-up is 20 000 requests too: docxy's RSS rises in one step of about 7 MB somewhere in
its first 16 000 requests (measured: 71 -> 79 MB) and then stays flat (79.8 MB after
48 000), which is the allocator settling, not a leak; a shorter warm-up would measure that
step instead."""
from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path

import pytest
from harness.daemon import Docxy, mirror_args
from harness.upstream import Upstream

pytestmark = pytest.mark.integration

ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
WARM_UP = 20_000
SOAK = 20_000
THREADS = 8


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _mix(upstream: Upstream) -> list[tuple[str, str, int]]:
    """(method, path, expected status): cached and upstream-bound, good and bad."""
    alpine = upstream.images.alpine
    layer = alpine.blobs[-1].digest
    return [
        ("HEAD", "/v2/library/alpine/manifests/latest", 200),        # a HEAD upstream
        ("GET", f"/v2/library/alpine/manifests/{alpine.digest}", 200),  # from the cache
        ("GET", f"/v2/library/alpine/blobs/{layer}", 200),             # from the cache
        ("GET", "/v2/library/manytags/tags/list?n=20", 200),           # relayed upstream
        ("GET", "/v2/", 200),                                          # answered locally
        ("GET", "/v2/library/alpine/manifests/..%2F..%2Fetc", 404),    # cannot exist
        ("GET", "/v2/" + "a" * 256 + "/manifests/latest", 400),         # name too long
        ("GET", "/nowhere", 404),
        ("GET", "/v2/library/nothere/manifests/latest", 404),          # upstream says no
    ]


def _run(port: int, mix, count: int) -> list[str]:
    """`count` requests spread over THREADS keep-alive connections; the failures."""
    failures: list[str] = []
    lock = threading.Lock()

    def worker(n: int, offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(n):
                method, path, expected = mix[(offset + i) % len(mix)]
                conn.request(method, path, headers={"Accept": ACCEPT})
                response = conn.getresponse()
                response.read()
                if response.status != expected:
                    with lock:
                        failures.append(f"{method} {path}: {response.status}")
        finally:
            conn.close()

    per_thread = count // THREADS
    threads = [threading.Thread(target=worker, args=(per_thread, t)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return failures


def test_twenty_thousand_requests_leak_neither_memory_nor_files(upstream: Upstream, tmp_path: Path) -> None:
    """After 20 000 requests of warm-up, 20 000 more leave docxy's RSS and open file
    descriptors within 10 % of their warmed-up level (and one descriptor for a pooled
    upstream connection), with every answer the expected one."""
    args = mirror_args(upstream, "--mirror-mode")
    with Docxy(tmp_path / "docxy", args) as docxy:
        mix = _mix(upstream)
        pid = docxy.process.pid
        assert _run(docxy.port, mix, WARM_UP) == []
        time.sleep(1)  # the clients' connections are closed; let docxy see it
        warm_rss, warm_files = docxy.rss_bytes(), _open_files(pid)
        started = time.monotonic()
        failures = _run(docxy.port, mix, SOAK)
        elapsed = time.monotonic() - started
        time.sleep(1)
        end_rss, end_files = docxy.rss_bytes(), _open_files(pid)
    print(f"soak: {SOAK} requests in {elapsed:.1f}s; RSS {warm_rss / 1e6:.1f} -> "
          f"{end_rss / 1e6:.1f} MB; open files {warm_files} -> {end_files}")
    assert failures == [], failures[:10]
    assert end_rss <= warm_rss * 1.10, (warm_rss, end_rss)
    assert end_files <= warm_files * 1.10 + 1, (warm_files, end_files)
