"""The cutting harness itself, checked without docxy: harness.cutter cuts and stalls where it
is told to, and the Hub-like upstream with `cdn_cutter` and `signed_urls` behaves as
tests/integration/test_resume.py assumes (a cut CDN transfer resumes with Range; "norange"
ignores Range; "single-use" refuses a used URL and a fresh redirect works). If these fail,
the resume tests mean nothing."""
from __future__ import annotations

import hashlib
import http.client
import socket
import ssl
import threading
import time
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from harness.cutter import Cutter
from harness.procs import poll_until
from harness.upstream import Upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20


# --- a plain TCP source: sends `size` bytes to every connection that says something -------

class Source:
    def __init__(self, size: int) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.payload = bytes(range(256)) * 4096
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(16)
                left = self.size
                while left:
                    n = min(left, len(self.payload))
                    conn.sendall(self.payload[:n])
                    left -= n
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def fetch(port: int, timeout: float = 20) -> tuple[int, BaseException | None]:
    """Connect, say hello, read to the end: (bytes read, the error that ended it if any)."""
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"go")
        buf = bytearray(MiB)
        try:
            while n := s.recv_into(buf):
                got += n
        except OSError as e:
            return got, e
    return got, None


@pytest.fixture
def source() -> Iterator[Source]:
    src = Source(16 * MiB)
    yield src
    src.close()


def test_cutter_forwards_everything_without_a_budget(source):
    """No budget: every byte arrives, and the counters say so."""
    with Cutter(source.port) as cutter:
        assert fetch(cutter.port) == (source.size, None)
        poll_until(lambda: cutter.open_connections == 0, 5)
        counts = cutter.counters()
        assert counts == {"connections": 1, "cuts": 0, "stalls": 0,
                          "bytes_down": source.size, "bytes_up": 2}


def test_cutter_resets_at_the_budget(source):
    """cut_style "reset": the client gets at most the budget, then a connection reset."""
    with Cutter(source.port) as cutter:
        cutter.budget = 3 * MiB
        got, error = fetch(cutter.port)
        assert isinstance(error, ConnectionResetError), (got, error)
        assert 0 < got <= 3 * MiB
        assert cutter.cuts == 1 and cutter.bytes_down == 3 * MiB


def test_cutter_close_delivers_exactly_the_budget(source):
    """cut_style "close": the client gets exactly the budget, then end of stream."""
    with Cutter(source.port) as cutter:
        cutter.budget, cutter.cut_style = 3 * MiB + 7, "close"
        assert fetch(cutter.port) == (3 * MiB + 7, None)
        assert cutter.cuts == 1


def test_cutter_plan_comes_before_the_budget(source):
    """`plan` budgets apply to the next connections in order, then `budget` again."""
    with Cutter(source.port) as cutter:
        cutter.cut_style = "close"
        cutter.plan = [MiB, 2 * MiB]
        cutter.budget = 0
        assert [fetch(cutter.port)[0] for _ in range(3)] == [MiB, 2 * MiB, 0]
        cutter.budget = None
        assert fetch(cutter.port)[0] == source.size


def test_cutter_stall_holds_the_connection_open(source):
    """stall_after: no byte flows past it, the connection stays open; when the client hangs
    up the cutter lets go of it."""
    with Cutter(source.port) as cutter:
        cutter.stall_after = 2 * MiB
        s = socket.create_connection(("127.0.0.1", cutter.port), timeout=10)
        s.sendall(b"go")
        got = 0
        s.settimeout(1.5)
        with pytest.raises(socket.timeout):
            while True:
                data = s.recv(MiB)
                assert data, "the stalled connection was closed"
                got += len(data)
        assert got == 2 * MiB and cutter.stalls == 1
        assert cutter.open_connections == 1
        s.close()
        poll_until(lambda: cutter.open_connections == 0, 5)
        # stall_seconds: the transfer goes on afterwards
        cutter.stall_seconds = 0.5
        started = time.monotonic()
        assert fetch(cutter.port) == (source.size, None)
        assert time.monotonic() - started >= 0.5


def test_cutter_stop_ends_open_connections(source):
    """stop() closes the listener and every connection, also a stalled one."""
    cutter = Cutter(source.port).start()
    cutter.stall_after = MiB
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(r=fetch(cutter.port, 30)))
    reader.start()
    poll_until(lambda: cutter.stalls == 1, 10)
    cutter.stop()
    reader.join(10)
    assert not reader.is_alive()
    assert result["r"][0] == MiB
    assert cutter.open_connections == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cutter.port), timeout=2)


def test_cutter_bounds_concurrent_connections(source):
    """Beyond max_connections a connection waits (in the backlog) until one ends."""
    with Cutter(source.port, max_connections=2) as cutter:
        cutter.stall_after = 0
        held = [socket.create_connection(("127.0.0.1", cutter.port)) for _ in range(2)]
        for s in held:
            s.sendall(b"go")
        poll_until(lambda: cutter.stalls == 2, 5)
        cutter.stall_after = None
        result: dict = {}
        third = threading.Thread(target=lambda: result.update(r=fetch(cutter.port)))
        third.start()
        time.sleep(0.5)
        assert cutter.connections == 2 and "r" not in result
        held[0].close()
        third.join(20)
        assert result["r"] == (source.size, None)
        held[1].close()


# --- the Hub-like upstream with the cutter and signed URLs ----------------------------------

@pytest.fixture(scope="module")
def cut_upstream(tmp_path_factory) -> Iterator[Upstream]:
    up = Upstream.start(tmp_path_factory.mktemp("cut-upstream"), large_layer_size=4 * MiB,
                        cdn_cutter=True, signed_urls=True)
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def healthy(cut_upstream):
    """The module's upstream as a fresh test finds it: no cuts, CDN in mode "ok"."""
    yield cut_upstream
    cutter = cut_upstream.cutter
    cutter.budget, cutter.plan, cutter.stall_after, cutter.cut_style = None, [], None, "reset"
    if cut_upstream.cdn.mode != "ok" or not cut_upstream.cdn.running():
        cut_upstream.restart_cdn("ok")


def _layer(up: Upstream):
    return max(up.images.large.manifest.layers, key=lambda b: b.size)


def _redirect(up: Upstream, digest: str) -> str:
    """The CDN URL the registry hands out for the large layer (a token as clients get)."""
    token = up.fetch_token([up.pull_scope("library/large")])
    status, headers, _, _ = _get(up.ssl_context(),
                                 f"{up.registry_url}/v2/library/large/blobs/{digest}",
                                 {"Authorization": f"Bearer {token}"})
    assert status == 307
    return headers["Location"]


def _get(ctx: ssl.SSLContext, url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body so far, the error that cut it or None)."""
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers or {})
        response = conn.getresponse()
        body, error = bytearray(), None
        try:
            while chunk := response.read1(MiB):
                body += chunk
        except (OSError, http.client.HTTPException) as e:
            error = e
        if error is None and response.length:
            error = http.client.IncompleteRead(bytes(body), response.length)
        return response.status, response.headers, bytes(body), error
    finally:
        conn.close()


def test_redirects_name_the_cutter_and_carry_a_fresh_signature(healthy):
    """With cdn_cutter and signed_urls, every blob redirect names https://localhost:<cutter>
    and carries a `sig` of its own."""
    layer = _layer(healthy)
    first, second = _redirect(healthy, layer.digest), _redirect(healthy, layer.digest)
    assert first.startswith(f"https://localhost:{healthy.cutter.port}/docker/registry/v2/")
    sigs = [parse_qs(urlsplit(u).query)["sig"] for u in (first, second)]
    assert sigs[0] != sigs[1] and all(len(s) == 1 and s[0] for s in sigs)


def test_a_cut_cdn_transfer_resumes_with_range(healthy):
    """The cutter cuts a TLS download at its budget (the client sees an error, not an end),
    and a Range request from the byte reached (If-Range: the ETag) gets 206 and the rest:
    the blob adds up, and the CDN's log shows the Range and If-Range."""
    up, layer = healthy, _layer(healthy)
    ctx = up.ssl_context()
    up.cutter.budget = MiB
    before = up.cutter.counters()
    status, headers, head, error = _get(ctx, _redirect(up, layer.digest))
    assert status == 200 and error is not None, "the cut was not seen as one"
    etag = headers["ETag"]
    counts = up.cutter.counters()
    assert counts["cuts"] - before["cuts"] == 1
    assert counts["bytes_down"] - before["bytes_down"] == MiB
    # TLS handshake, headers and the record the cut split: well under 64 KiB here
    assert MiB - 64 * 1024 < len(head) < MiB
    up.cutter.budget = None
    status, headers, tail, error = _get(ctx, _redirect(up, layer.digest),
                                        {"Range": f"bytes={len(head)}-", "If-Range": etag})
    assert (status, error) == (206, None)
    assert headers["Content-Range"] == f"bytes {len(head)}-{layer.size - 1}/{layer.size}"
    assert "sha256:" + hashlib.sha256(head + tail).hexdigest() == layer.digest
    ranged = poll_until(lambda: [e for e in up.cdn_log_entries()
                                 if e["range"] == f"bytes={len(head)}-"], 10)
    assert ranged[-1]["status"] == 206 and ranged[-1]["if_range"] == etag


def test_norange_cdn_answers_200_with_the_whole_blob(healthy):
    """CDN mode "norange": a Range request gets 200 and every byte."""
    up, layer = healthy, _layer(healthy)
    up.restart_cdn("norange")
    status, headers, body, error = _get(up.ssl_context(), _redirect(up, layer.digest),
                                        {"Range": "bytes=1000-"})
    assert (status, error, len(body)) == (200, None, layer.size)
    assert "Content-Range" not in headers
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest


def test_single_use_cdn_refuses_a_used_url_and_serves_a_fresh_one(healthy):
    """CDN mode "single-use": a HEAD does not use the URL up, its first GET is served, a
    second GET of it is refused 403; a fresh redirect from the registry works."""
    up, layer = healthy, _layer(healthy)
    ctx = up.ssl_context()
    up.restart_cdn("single-use")
    url = _redirect(up, layer.digest)
    assert _get(ctx, url, method="HEAD")[0] == 200
    assert _get(ctx, url, {"Range": "bytes=0-9"})[0] == 206
    assert _get(ctx, url, {"Range": "bytes=10-"})[0] == 403
    assert _get(ctx, url, method="HEAD")[0] == 403
    status, _, tail, error = _get(ctx, _redirect(up, layer.digest), {"Range": "bytes=10-"})
    assert (status, error, len(tail)) == (206, None, layer.size - 10)


def test_the_cutter_stall_is_seen_by_a_tls_client(healthy):
    """stall_after on the CDN path: the TLS client gets no more bytes and no end (only its
    own timeout ends the wait)."""
    up, layer = healthy, _layer(healthy)
    up.cutter.stall_after = MiB
    url = _redirect(up, layer.digest)
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=up.ssl_context(), timeout=2)
    try:
        conn.request("GET", f"{u.path}?{u.query}")
        response = conn.getresponse()
        got = 0
        with pytest.raises((socket.timeout, TimeoutError)):
            while chunk := response.read1(MiB):
                got += len(chunk)
        assert 0 < got < MiB
    finally:
        conn.close()
    poll_until(lambda: up.cutter.open_connections == 0, 5)
