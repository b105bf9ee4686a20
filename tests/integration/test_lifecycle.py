"""The daemon's lifecycle against the real process: certificates reloaded on SIGHUP and on
a file change while a download continues, a bad renewal refused, a graceful stop on
SIGTERM (running downloads finish, new connections are refused, the deadline holds), and
systemd socket activation through `systemd-socket-activate`."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from harness.daemon import Docxy, mirror_args, twistd_path
from harness.procs import ManagedProcess, free_port, poll_until, port_open

pytestmark = pytest.mark.integration

SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"  # Debian package systemd (tests/run)
CHUNK = 64 * 1024


# --- helpers ------------------------------------------------------------------------------

def _mirror_args(upstream, cache: Path, *extra: str) -> list[str]:
    """docxy in mirror mode (it fetches upstream tokens itself: no client token needed)."""
    return mirror_args(upstream, "--mirror-mode", *extra, cache=cache)


def _large_layer(upstream):
    return max(upstream.images.large.manifest.layers, key=lambda b: b.size)


def _client_context(upstream) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(upstream.ca_path))


def _connection(host: str, port: int, context: ssl.SSLContext | None, timeout: float = 60):
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


def _served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The leaf certificate a new TLS connection to 127.0.0.1:port is shown."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


class Download(threading.Thread):
    """GETs a blob through docxy, reading CHUNK bytes every `pause` seconds until `fast` is
    set; while `hold` is set it reads nothing at all.  Records status, bytes read, the
    digest, the certificate the connection was made with, or the error."""

    def __init__(self, port: int, path: str, context: ssl.SSLContext | None = None,
                 pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.context, self.pause = port, path, context, pause
        self.fast = threading.Event()
        self.hold = threading.Event()
        self.read = 0
        self.status: int | None = None
        self.digest: str | None = None
        self.certificate: x509.Certificate | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        h = hashlib.sha256()
        conn = _connection("127.0.0.1", self.port, self.context)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            self.status = response.status
            length = int(response.headers.get("content-length", -1))
            if self.context is not None:
                der = conn.sock.getpeercert(binary_form=True)
                self.certificate = x509.load_der_x509_certificate(der)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if self.hold.is_set():
                    time.sleep(0.05)
                    continue
                data = response.read(CHUNK)
                if not data:
                    break
                h.update(data)
                self.read += len(data)
                if self.pause and not self.fast.is_set():
                    time.sleep(self.pause)
            self.digest = "sha256:" + h.hexdigest()
            if self.read != length:
                # http.client's read(n) returns b"" at a premature end instead of raising
                raise http.client.IncompleteRead(b"", length - self.read)
        except Exception as e:  # asserted by the tests
            self.error = e
        finally:
            conn.close()

    def started_reading(self, at_least: int = 1 << 20, timeout: float = 30) -> None:
        poll_until(lambda: self.read >= at_least or self.error or not self.is_alive(), timeout)
        assert self.error is None and self.status == 200, (self.status, self.error)
        assert self.is_alive(), "the download ended before the test could act during it"


@pytest.fixture(scope="module")
def warm_cache(upstream, tmp_path_factory) -> Path:
    """A cache directory holding the large layer already, so every daemon of this module
    serves it locally (each daemon in turn; never two at once)."""
    cache = tmp_path_factory.mktemp("lifecycle-cache")
    layer = _large_layer(upstream)
    with Docxy(tmp_path_factory.mktemp("warm"), _mirror_args(upstream, cache)) as docxy:
        download = Download(docxy.port, f"/v2/large/blobs/{layer.digest}", pause=0)
        download.start()
        download.join(300)
    assert download.error is None and download.digest == layer.digest, download.error
    return cache


class TLSFiles:
    """The certificate and key files a TLS docxy is given, and new ones to put there."""

    def __init__(self, upstream, directory: Path) -> None:
        self.ca = upstream.intermediate_ca
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "fullchain.cer"
        self.key = directory / "mirror.key"

    def issue(self):
        return self.ca.issue_server(f"lifecycle-{uuid.uuid4().hex[:12]}", ["127.0.0.1", "localhost"])

    def rewrite(self, server) -> None:
        """In place, as acme.sh's --install-cert does (same inode, new content)."""
        self.key.write_bytes(server.key_path.read_bytes())
        self.cert.write_bytes(server.chain_path.read_bytes())

    def replace(self, server) -> None:
        """By rename, as certbot-style tools do (a new inode at the same path)."""
        for source, target in ((server.key_path, self.key), (server.chain_path, self.cert)):
            tmp = target.with_suffix(".new")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def _tls_docxy(upstream, cache: Path, workdir: Path, *extra: str) -> tuple[Docxy, TLSFiles, object]:
    files = TLSFiles(upstream, workdir / "tls")
    first = files.issue()
    files.rewrite(first)
    docxy = Docxy(workdir, _mirror_args(upstream, cache, *extra), tls=(files.cert, files.key))
    return docxy, files, first


def _log_has(docxy: Docxy, text: str, timeout: float = 10) -> None:
    poll_until(lambda: text in docxy.log(), timeout)


# --- certificate reload ---------------------------------------------------------------------

def test_sighup_reload_serves_new_connections_while_a_download_continues(upstream, warm_cache, tmp_path):
    """After SIGHUP new connections get the new certificate; a download begun before completes."""
    layer = _large_layer(upstream)
    ctx = _client_context(upstream)
    docxy, files, first = _tls_docxy(upstream, warm_cache, tmp_path / "docxy",
                                     "--cert-check-interval", "0")
    with docxy:
        download = Download(docxy.tls_port, f"/v2/large/blobs/{layer.digest}", ctx)
        download.start()
        try:
            download.started_reading()
            assert download.certificate == first.certificate
            second = files.issue()
            files.rewrite(second)
            time.sleep(0.5)
            assert _served_certificate(docxy.tls_port, ctx) == first.certificate, \
                "the new certificate was served before SIGHUP (polling is off)"
            docxy.process.send_signal(signal.SIGHUP)
            poll_until(lambda: _served_certificate(docxy.tls_port, ctx) == second.certificate, 10)
            _log_has(docxy, "certificate reloaded (SIGHUP)")
            assert download.is_alive() and download.read < layer.size, \
                "the download finished before the reload: nothing was tested"
        finally:
            download.fast.set()
            download.join(120)
        assert not download.is_alive()
        assert download.error is None, download.error
        assert download.read == layer.size and download.digest == layer.digest
        assert download.certificate == first.certificate
        assert docxy.process.running()


def test_changed_files_are_picked_up_without_sighup(upstream, warm_cache, tmp_path):
    """With --cert-check-interval 1, files replaced by rename are served within seconds, unsignalled."""
    ctx = _client_context(upstream)
    docxy, files, first = _tls_docxy(upstream, warm_cache, tmp_path / "docxy",
                                     "--cert-check-interval", "1")
    with docxy:
        assert _served_certificate(docxy.tls_port, ctx) == first.certificate
        second = files.issue()
        files.replace(second)
        poll_until(lambda: _served_certificate(docxy.tls_port, ctx) == second.certificate, 15)
        _log_has(docxy, "certificate reloaded (file change)")


@pytest.mark.parametrize("damage, message", [
    ("garbage certificate", "holds no PEM certificate"),
    ("key of another certificate", "does not match the first certificate"),
])
def test_bad_renewal_keeps_the_old_certificate(upstream, warm_cache, tmp_path, damage, message):
    """A renewal that does not load is logged with its reason and the old certificate stays."""
    ctx = _client_context(upstream)
    docxy, files, first = _tls_docxy(upstream, warm_cache, tmp_path / "docxy",
                                     "--cert-check-interval", "1")
    with docxy:
        if damage == "garbage certificate":
            files.cert.write_text("-----BEGIN CERTIFICATE-----\nhalf-written\n")
        else:
            files.key.write_bytes(files.issue().key_path.read_bytes())
        _log_has(docxy, "certificate reload (file change) failed", 15)
        docxy.process.send_signal(signal.SIGHUP)
        _log_has(docxy, "certificate reload (SIGHUP) failed")
        log = docxy.log()
        assert message in log and "still serving the old certificate" in log
        assert _served_certificate(docxy.tls_port, ctx) == first.certificate
        conn = _connection("127.0.0.1", docxy.tls_port, ctx, timeout=10)
        try:
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        assert docxy.process.running()


# --- graceful stop --------------------------------------------------------------------------

def test_sigterm_lets_a_running_download_finish_and_refuses_new_connections(upstream, warm_cache, tmp_path):
    """SIGTERM: new connections refused at once, a running download completes, then the exit."""
    layer = _large_layer(upstream)
    with Docxy(tmp_path / "docxy", _mirror_args(upstream, warm_cache, "--stop-timeout", "60")) as docxy:
        download = Download(docxy.port, f"/v2/large/blobs/{layer.digest}")
        download.start()
        try:
            download.started_reading()
            stopped_at = time.monotonic()
            docxy.process.send_signal(signal.SIGTERM)
            poll_until(lambda: not port_open("127.0.0.1", docxy.port), 10)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", docxy.port), timeout=5).close()
            time.sleep(1.0)
            assert docxy.process.running(), "docxy did not wait for the running download"
            assert download.is_alive() and download.read < layer.size, \
                "the download finished before the stop: nothing was tested"
        finally:
            download.fast.set()
            download.join(120)
        assert download.error is None, f"{download.error!r}\n{docxy.log()[-3000:]}"
        assert download.read == layer.size and download.digest == layer.digest
        poll_until(lambda: not docxy.process.running(), 20)
        assert time.monotonic() - stopped_at < 60
        # twistd ends a stop by SIGTERM with that signal (systemd counts it as clean)
        assert docxy.process.returncode in (0, -signal.SIGTERM)
        log = docxy.log()
        assert "waiting up to 60s for 1 request(s) in progress" in log
        assert "every request finished" in log


def test_stalled_download_does_not_hold_the_stop_past_the_deadline(upstream, warm_cache, tmp_path):
    """A stalled download is cut at --stop-timeout: the process exits, the client sees a short body."""
    layer = _large_layer(upstream)
    with Docxy(tmp_path / "docxy", _mirror_args(upstream, warm_cache, "--stop-timeout", "3")) as docxy:
        download = Download(docxy.port, f"/v2/large/blobs/{layer.digest}")
        download.start()
        try:
            download.started_reading()
            download.hold.set()
            stopped_at = time.monotonic()
            docxy.process.send_signal(signal.SIGTERM)
            poll_until(lambda: not docxy.process.running(), 20)
            elapsed = time.monotonic() - stopped_at
        finally:
            download.fast.set()
            download.hold.clear()
            download.join(120)
        assert 2.5 <= elapsed < 10, f"exited {elapsed:.1f}s after SIGTERM with --stop-timeout 3"
        assert "1 request(s) still in progress and 1 connection(s) open after 3s" in docxy.log()
        assert download.read < layer.size
        assert isinstance(download.error, (http.client.IncompleteRead, ConnectionError)), \
            f"a cut download must fail, got {download.error!r} after {download.read} bytes"


# --- systemd socket activation ------------------------------------------------------------

def _activated(workdir: Path, listen: list[int], names: str, args: list[str]) -> ManagedProcess:
    """`systemd-socket-activate` holding the listening sockets and starting docxy on the
    first connection, as systemd does with etc/docxy.socket."""
    argv = [SOCKET_ACTIVATE]
    for port in listen:
        argv += ["-l", f"127.0.0.1:{port}"]
    # systemd always sets LISTEN_FDNAMES, and Twisted ignores the descriptors without it.
    argv += [f"--fdname={names}", "-E", "DOCXY_ALLOW_ANONYMOUS=1"]
    if os.environ.get("DOCXY_TEST_CHECKOUT"):
        argv += ["-E", f"PYTHONPATH={Path(__file__).resolve().parents[2]}"]
    argv += [twistd_path(), "-n", "--pidfile=", "docxy", *args]
    workdir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess("docxy-activated", argv, workdir / "docxy.log", cwd=workdir)
    process.start()
    listening = f"Listening on 127.0.0.1:{listen[-1]}"
    poll_until(lambda: listening in process.log_path.read_text(errors="replace")
               or not process.running(), 10)
    assert process.running(), process.log_tail()
    return process


def test_socket_activation_serves_tls_and_redirects_to_the_inherited_port(upstream, warm_cache, tmp_path):
    """Inherited sockets: HTTPS serves on the first, the second redirects to the first's port."""
    layer = _large_layer(upstream)
    ctx = _client_context(upstream)
    files = TLSFiles(upstream, tmp_path / "tls")
    cert = files.issue()
    files.rewrite(cert)
    https_port, http_port = free_port(), free_port()
    process = _activated(tmp_path / "docxy", [https_port, http_port], "https:http", [
        "--tls", "systemd:domain=INET:index=0", "--listen", "systemd:domain=INET:index=1",
        "--cert", str(files.cert), "--key", str(files.key),
        *_mirror_args(upstream, warm_cache)])
    try:
        # The first connection is what starts docxy; it waits in the socket's backlog.
        conn = _connection("127.0.0.1", https_port, ctx, timeout=60)
        try:
            conn.request("HEAD", f"/v2/large/blobs/{layer.digest}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert int(response.headers["content-length"]) == layer.size
            served = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
            assert served == cert.certificate
        finally:
            conn.close()
        conn = _connection("127.0.0.1", http_port, None, timeout=30)
        try:
            conn.request("GET", "/v2/")
            response = conn.getresponse()
            response.read()
            assert response.status == 301
            assert response.headers["location"] == f"https://127.0.0.1:{https_port}/v2/"
        finally:
            conn.close()
        log = process.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log
    finally:
        process.stop()


def test_socket_activation_serves_plain_http(upstream, warm_cache, tmp_path):
    """With one inherited socket as --listen, docxy serves the registry API on it."""
    layer = _large_layer(upstream)
    port = free_port()
    process = _activated(tmp_path / "docxy", [port], "http", [
        "--listen", "systemd:domain=INET:index=0", *_mirror_args(upstream, warm_cache)])
    try:
        conn = _connection("127.0.0.1", port, None, timeout=60)
        try:
            conn.request("HEAD", f"/v2/large/blobs/{layer.digest}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert int(response.headers["content-length"]) == layer.size
        finally:
            conn.close()
    finally:
        process.stop()
