"""Lifecycle in memory: certificate reload (on a file change, on SIGHUP, refusing bad
files), the graceful stop's wait for running requests, the port of a socket inherited
from systemd, and their options and wiring."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile

import pytest
from harness.pki import CertificateAuthority
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python import usage

from docxy.ops import certreload, lifecycle
from docxy.ops.activation import adopted_port
from docxy.ops.certreload import CertificateReloader, CurrentCertificate
from docxy.ops.lifecycle import GracefulStop
from docxy.ops.tls import ServerTLS
from docxy.tap import Options, makeService

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site

INTERVAL = 60.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.create_root(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def events(monkeypatch):
    """Every event docxy.ops.certreload and docxy.ops.lifecycle log."""
    seen: list[dict] = []
    monkeypatch.setattr(certreload, "log", Logger(namespace="docxy.tls", observer=seen.append))
    monkeypatch.setattr(lifecycle, "log", Logger(namespace="docxy.lifecycle", observer=seen.append))
    return seen


def _errors(events) -> list[dict]:
    return [e for e in events if e["log_level"].name in ("error", "critical")]


def _logged(events, text: str) -> bool:
    return any(text in formatEvent(e) for e in events)


class Files:
    """The certificate and key paths docxy is given, and a way to install new ones there."""

    def __init__(self, directory, ca) -> None:
        self.dir = directory
        self.ca = ca
        self.cert = str(directory / "fullchain.cer")
        self.key = str(directory / "mirror.key")
        self.count = 0

    def issue(self, name: str | None = None):
        self.count += 1
        return self.ca.issue_server(name or f"leaf{self.count}", [f"v{self.count}.example.com"])

    def install(self, server) -> None:
        """Replace both files the way acme.sh does: rewritten in place."""
        shutil.copyfile(server.chain_path, self.cert)
        shutil.copyfile(server.key_path, self.key)


@pytest.fixture
def files(tmp_path, ca) -> Files:
    f = Files(tmp_path, ca)
    f.install(f.issue())
    return f


class SignalClock(Clock):
    """A Clock whose callFromThread runs on the next advance, as the reactor's would."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.callLater(0, f, *args, **kwargs)


def _reloader(files: Files, interval: float = INTERVAL, **kwargs):
    clock = SignalClock()
    current = CurrentCertificate(ServerTLS(files.cert, files.key))
    reloader = CertificateReloader(current, files.cert, files.key, clock, interval,
                                   install_signal=kwargs.pop("install_signal", False), **kwargs)
    reloader.startService()
    return reloader, current, clock


def _served(current: CurrentCertificate):
    """The leaf certificate a new connection would be shown."""
    return SSL.Connection(current.getContext(), None).get_certificate().to_cryptography()


def test_changed_files_are_picked_up_at_the_next_check(files, events):
    """Replaced certificate and key files are loaded at the next poll; new connections get them."""
    reloader, current, clock = _reloader(files)
    old_context = current.getContext()
    new = files.issue()
    files.install(new)
    clock.advance(INTERVAL - 1)
    assert _served(current) != new.certificate, "reloaded before the check was due"
    clock.advance(1)
    assert _served(current) == new.certificate
    assert current.getContext() is not old_context
    assert _logged(events, "certificate reloaded (file change): v2.example.com")
    reloader.stopService()


def test_unchanged_files_are_not_reloaded(files, events):
    """A poll that finds the same files keeps the loaded certificate object."""
    reloader, current, clock = _reloader(files)
    before = current.tls
    clock.advance(INTERVAL * 3)
    assert current.tls is before
    reloader.stopService()


@pytest.mark.parametrize("damage, message", [
    ("garbage", "holds no PEM certificate"),
    ("missing", "cannot read certificate file"),
    ("half", "holds no PEM certificate"),
    ("wrong-key", "does not match"),
])
def test_bad_new_file_keeps_the_old_certificate(files, events, damage, message):
    """A renewal that does not load is logged once, clearly, and the old certificate stays."""
    reloader, current, clock = _reloader(files)
    old = _served(current)
    if damage == "garbage":
        with open(files.cert, "w") as f:
            f.write("not a certificate\n")
    elif damage == "missing":
        os.unlink(files.cert)
    elif damage == "half":
        pem = files.issue().chain_path.read_bytes()
        with open(files.cert, "wb") as f:
            f.write(pem[: len(pem) // 2])
    elif damage == "wrong-key":
        shutil.copyfile(files.issue().key_path, files.key)
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert _served(current) == old
    errors = _errors(events)
    assert len(errors) == 1, "a bad file must be reported once, not at every check"
    text = formatEvent(errors[0])
    assert message in text and "still serving the old certificate" in text
    reloader.stopService()


def test_renewal_completed_after_a_bad_read_is_loaded(files, events):
    """A half-written renewal is refused, and loaded as soon as the writing has finished."""
    reloader, current, clock = _reloader(files)
    new = files.issue()
    shutil.copyfile(new.key_path, files.key)  # acme.sh writes the key before the chain
    clock.advance(INTERVAL)
    assert _served(current) != new.certificate and len(_errors(events)) == 1
    shutil.copyfile(new.chain_path, files.cert)
    clock.advance(INTERVAL)
    assert _served(current) == new.certificate
    reloader.stopService()


def test_sighup_reloads_through_the_reactor(files, events):
    """SIGHUP reloads on the reactor's next turn, even with polling off, not in the handler."""
    before = signal.getsignal(signal.SIGHUP)
    reloader, current, clock = _reloader(files, interval=0, install_signal=True)
    try:
        new = files.issue()
        files.install(new)
        os.kill(os.getpid(), signal.SIGHUP)
        assert _served(current) != new.certificate, "the signal handler did the work itself"
        clock.advance(0)
        assert _served(current) == new.certificate
        assert _logged(events, "certificate reloaded (SIGHUP)")
    finally:
        reloader.stopService()
    assert signal.getsignal(signal.SIGHUP) == before, "the previous SIGHUP handler was not restored"


def test_no_polling_with_interval_zero(files, events):
    """--cert-check-interval 0 leaves the files alone until SIGHUP."""
    reloader, current, clock = _reloader(files, interval=0)
    files.install(files.issue())
    before = current.tls
    clock.advance(INTERVAL * 10)
    assert current.tls is before
    assert clock.getDelayedCalls() == []
    reloader.stopService()


# --- graceful stop --------------------------------------------------------------------------

DIGEST = "sha256:" + "cd" * 32
SIZE = 1000


def _open_download():
    """A site with one blob download in progress (the upstream body still flowing)."""
    response = FakeResponse(200, {b"content-type": b"application/octet-stream"},
                            length=SIZE, auto=False)
    site, _, clock = make_site(hub_config(idle_timeout=3600), FakeUpstream(lambda *a: response))
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    assert site.active.count == 1
    return site, ex, response, clock


def test_stop_waits_for_a_running_download_and_its_last_bytes(events):
    """The stop waits for the running request and then for its connection to flush and close."""
    site, ex, response, clock = _open_download()
    stop = GracefulStop([site.active], clock, 30)
    fired = []
    stop.stopService().addCallback(fired.append)
    response.protocol.dataReceived(b"a" * 500)
    clock.advance(10)
    assert not fired
    response.protocol.dataReceived(b"a" * 500)
    response.end()
    assert site.active.count == 0
    status, _, body = ex.response()
    assert status == 200 and len(body) == SIZE
    assert ex.transport.disconnecting, "the connection was not closed after its answer"
    clock.advance(1)
    assert not fired, "the stop did not wait for the connection to flush and close"
    ex.transport.disconnected = True  # what a TCP transport says once it has flushed
    clock.advance(0.1)
    assert fired
    clock.advance(60)
    assert not _logged(events, "still in progress")


def test_idle_kept_alive_connection_is_closed_on_stop(events):
    """A kept-alive connection with nothing in progress is closed (gracefully) at the stop."""
    site, _, clock = make_site()
    ex = Exchange(site)
    ex.send("GET", "/health")
    assert ex.response()[0] == 200 and not ex.transport.disconnecting
    fired = []
    GracefulStop([site.active], clock, 30).stopService().addCallback(fired.append)
    assert ex.transport.disconnecting and not fired
    ex.transport.disconnected = True
    clock.advance(0.1)
    assert fired


def test_stop_gives_up_at_the_deadline(events):
    """A download still running at --stop-timeout no longer holds the stop, and it is logged."""
    site, ex, response, clock = _open_download()
    fired = []
    GracefulStop([site.active], clock, 30).stopService().addCallback(fired.append)
    clock.advance(29.9)
    assert not fired
    clock.advance(0.2)
    assert fired
    assert _logged(events, "1 request(s) still in progress and 1 connection(s) open after 30s")


def test_stop_with_nothing_running_is_immediate(events):
    """With no request in progress the stop does not wait at all."""
    site, _, _ = make_site()
    d = GracefulStop([site.active], Clock(), 30).stopService()
    assert d.called


def test_request_during_the_stop_closes_its_connection(events):
    """A request on a kept-alive connection during the stop is answered with Connection: close."""
    site, ex, response, clock = _open_download()
    GracefulStop([site.active], clock, 30).stopService()
    late = Exchange(site)
    late.send("GET", "/health")
    status, headers, _ = late.response()
    assert status == 200 and headers[b"connection"] == [b"close"]
    assert late.transport.disconnecting


def test_count_drops_when_the_client_goes_away(events):
    """A client that disconnects mid-download no longer counts as running."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    site, ex, response, clock = _open_download()
    ex.channel.connectionLost(Failure(ConnectionDone()))
    assert site.active.count == 0


# --- systemd socket activation --------------------------------------------------------------


def test_adopted_port_is_the_port_of_the_inherited_socket():
    """The redirect port of a systemd: endpoint is the port its inherited socket listens on."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        endpoint = AdoptedStreamServerEndpoint(Clock(), listener.fileno(), socket.AF_INET)
        assert adopted_port(endpoint) == listener.getsockname()[1]
        listener.getsockname()  # the descriptor is still open and ours
        assert adopted_port(TCP4ServerEndpoint(Clock(), 443)) is None
    finally:
        listener.close()


# --- options and wiring ---------------------------------------------------------------------

_SCRATCH = tempfile.mkdtemp(prefix="docxy-lifecycle-")


def _parse(argv, environ=None) -> Options:
    options = Options(environ={"XDG_CACHE_HOME": _SCRATCH, **(environ or {})})
    options.parseOptions(argv)
    return options


def test_lifecycle_options_and_environment():
    """--cert-check-interval and --stop-timeout: defaults 60 and 30, env read, command line wins."""
    config = _parse([]).config()
    assert (config.cert_check_interval, config.stop_timeout) == (60.0, 30.0)
    env = {"DOCXY_CERT_CHECK_INTERVAL": "5", "DOCXY_STOP_TIMEOUT": "7.5"}
    config = _parse([], env).config()
    assert (config.cert_check_interval, config.stop_timeout) == (5.0, 7.5)
    config = _parse(["--stop-timeout", "1"], env).config()
    assert config.stop_timeout == 1.0


@pytest.mark.parametrize("argv, env", [
    (["--stop-timeout", "-1"], {}),
    ([], {"DOCXY_CERT_CHECK_INTERVAL": "-5"}),
    ([], {"DOCXY_STOP_TIMEOUT": "soon"}),
])
def test_bad_lifecycle_options_are_usage_errors(argv, env):
    """Negative or non-numeric seconds stop start-up with a usage error."""
    with pytest.raises(usage.UsageError):
        _parse(argv, env)


def _tls_connection(factory):
    """A new connection accepted by an HTTPS listener's factory: its OpenSSL Connection."""
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    transport.setTcpNoDelay = lambda enabled: None  # HTTPChannel asks for it
    protocol.makeConnection(transport)
    return protocol._tlsConnection


def test_reload_reaches_new_connections_of_the_listeners_only(files, events):
    """After a reload the listener gives new connections the new certificate; older ones keep theirs."""
    options = _parse(["--tls", "tcp:5443:interface=127.0.0.1",
                      "--listen", "tcp:5080:interface=127.0.0.1",
                      "--cert", files.cert, "--key", files.key, "--cert-check-interval", "5"])
    services = list(makeService(options, reactor=Clock()))
    tls = services[0]
    (reloader,) = [s for s in services if isinstance(s, CertificateReloader)]
    assert reloader.interval == 5
    before = _tls_connection(tls.factory)
    old = before.get_certificate().to_cryptography()
    new = files.issue()
    files.install(new)
    assert reloader.reload("test")
    assert _tls_connection(tls.factory).get_certificate().to_cryptography() == new.certificate
    assert before.get_certificate().to_cryptography() == old != new.certificate
    (stop,) = [s for s in services if isinstance(s, GracefulStop)]
    assert len(stop.requests) == 2 and stop.timeout == 30


def test_plain_service_has_a_graceful_stop_and_no_reloader():
    """Without --tls there is nothing to reload, but the stop still waits for requests."""
    services = list(makeService(_parse(["--listen", "tcp:5000:interface=127.0.0.1"]),
                                reactor=Clock()))
    assert not [s for s in services if isinstance(s, CertificateReloader)]
    assert len([s for s in services if isinstance(s, GracefulStop)]) == 1
