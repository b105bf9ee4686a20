"""Backpressure, disconnects and upstream deaths on real sockets, seen from both ends.

The upstream here is harness.blobserver, which logs how each transfer ended; docxy is the
installed daemon run by twistd, without its cache: these tests are about the relay that
streams what is not cached (tests/integration/test_cache.py covers the cache)."""
from __future__ import annotations

import http.client
import socket
import sys
import time
from pathlib import Path

import pytest
from harness.daemon import Docxy
from harness.procs import ManagedProcess, free_port, wait_for_port

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "e" * 64
HARNESS_DIR = str(Path(__file__).resolve().parents[1])


class BlobServer:
    def __init__(self, workdir: Path, size: int, die_after: int | None = None) -> None:
        self.port = free_port()
        self.log_path = workdir / "blobserver.events"
        argv = [sys.executable, "-m", "harness.blobserver", "--port", str(self.port),
                "--size", str(size), "--log", str(self.log_path)]
        if die_after is not None:
            argv += ["--die-after", str(die_after)]
        self.process = ManagedProcess("blobserver", argv, workdir / "blobserver.log",
                                      env={"PYTHONPATH": HARNESS_DIR}, cwd=workdir)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "BlobServer":
        self.process.start()
        wait_for_port("127.0.0.1", self.port, 20)
        return self

    def events(self) -> list[str]:
        try:
            return self.log_path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_for_event(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.events():
                if line.startswith(prefix):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no {prefix!r} event in {self.events()}")


@pytest.fixture
def make_upstream(tmp_path):
    started = []

    def make(size: int, die_after: int | None = None) -> BlobServer:
        server = BlobServer(tmp_path, size, die_after).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.process.stop()


@pytest.fixture
def make_docxy(tmp_path):
    started = []

    def make(upstream_url: str, *extra: str) -> Docxy:
        daemon = Docxy(tmp_path / f"docxy{len(started)}", ["--upstream", upstream_url, "--no-library", "--no-cache", *extra])
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


def _open_blob(docxy: Docxy, rcvbuf: int = 64 * 1024) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", docxy.port))
    sock.sendall(f"GET /v2/big/blob/blobs/{DIGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def test_slow_client_keeps_docxy_memory_flat(make_upstream, make_docxy):
    """A client reading at ~2 MB/s while the upstream could send GBs: docxy's RSS stays
    within a few MB of its idle level, because the upstream socket is paused."""
    upstream = make_upstream(size=4 * 1024**3)
    docxy = make_docxy(upstream.url)
    baseline = docxy.rss_bytes()
    sock = _open_blob(docxy)
    received = 0
    peak = baseline
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        chunk = sock.recv(64 * 1024)
        assert chunk, "docxy closed the connection early"
        received += len(chunk)
        time.sleep(0.03)  # ~2 MB/s
        peak = max(peak, docxy.rss_bytes())
    sock.close()
    assert received > 1024 * 1024, "the slow client got almost nothing"
    growth = peak - baseline
    assert growth < 40 * 1024**2, f"docxy grew by {growth / 2**20:.1f} MB for a slow client"


def test_client_disconnect_closes_upstream_connection(make_upstream, make_docxy):
    """When the client goes away mid-blob, docxy closes its upstream connection too."""
    upstream = make_upstream(size=4 * 1024**3)
    docxy = make_docxy(upstream.url)
    sock = _open_blob(docxy)
    got = 0
    while got < 8 * 1024 * 1024:
        got += len(sock.recv(1024 * 1024))
    upstream.wait_for_event("open 1", 10)
    sock.close()
    line = upstream.wait_for_event("closed-early 1", 20)
    sent = int(line.split("sent=")[1])
    assert sent < 1024**3, "the upstream kept sending long after the client left"


def test_upstream_death_mid_blob_fails_the_client(make_upstream, make_docxy):
    """An upstream killed mid-body gives the client a failed transfer, never a short
    body that looks complete, and docxy keeps serving."""
    size = 64 * 1024 * 1024
    upstream = make_upstream(size=size, die_after=8 * 1024 * 1024)
    docxy = make_docxy(upstream.url)
    conn = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=30)
    conn.request("GET", f"/v2/big/blob/blobs/{DIGEST}")
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) == size
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()
    upstream.wait_for_event("dying", 5)
    health = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=10)
    health.request("GET", "/health")
    assert health.getresponse().status == 200


def test_unreachable_upstream_is_502_json(make_docxy):
    """Nothing listening upstream: a 502 with a registry JSON error; docxy keeps serving."""
    docxy = make_docxy(f"http://127.0.0.1:{free_port()}")
    conn = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=30)
    conn.request("GET", "/v2/x/manifests/latest")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 502 and b'"UNAVAILABLE"' in body
    assert response.getheader("Content-Type") == "application/json"


def _established_to(pid: int, remote_port: int) -> int:
    """ESTABLISHED TCP connections of process `pid` to 127.0.0.1:`remote_port` (its socket
    inodes matched against /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == remote_port and f[9] in inodes:
            count += 1
    return count


def test_upstream_connections_are_bounded_and_the_rest_queued(make_upstream, make_docxy):
    """Nine clients at once with --upstream-connections 3: docxy never holds more than
    three connections to the upstream, the others wait (none is refused), and every
    client is served in turn."""
    import threading

    upstream = make_upstream(size=256 * 1024 * 1024)
    docxy = make_docxy(upstream.url, "--upstream-connections", "3")
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=60)
        conn.request("GET", f"/v2/big/blob/blobs/sha256:{i:064x}")
        response = conn.getresponse()
        got = len(response.read(1024 * 1024))
        time.sleep(1.0)  # hold the transfer (and its upstream connection) a while
        conn.close()
        with lock:
            results.append((response.status, got))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    most = 0
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        most = max(most, _established_to(docxy.process.pid, upstream.port))
        time.sleep(0.02)
    for t in threads:
        t.join(5)
    assert sorted(results) == [(200, 1024 * 1024)] * 9
    assert most == 3, f"docxy held {most} upstream connections at once"
    opened = [e for e in upstream.events() if e.startswith("open ")]
    assert len(opened) == 9
