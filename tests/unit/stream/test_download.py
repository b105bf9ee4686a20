"""The one streaming path (docxy.stream): a Download and its Followers on real HTTPChannels
over StringTransports, with and without a file: a follower that keeps up, one that lags,
one that leaves, an upstream cut and a digest mismatch."""
from __future__ import annotations

import hashlib
import os

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from docxy.stream import follower as follower_module
from docxy.stream.download import Download, State
from docxy.stream.follower import Follower
from docxy.stream.sink import FileSink

WINDOW = 64 * 1024
CHUNK = 16 * 1024


class UpstreamBody:
    """The producer a Download gets from docxy.upstream.bodies.deliver."""

    def __init__(self) -> None:
        self.paused = self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Body(Resource):
    isLeaf = True

    def __init__(self, download: Download, path: str | None) -> None:
        super().__init__()
        self.download, self.path = download, path

    def render_GET(self, request):
        request.setHeader(b"content-length", b"%d" % self.download.length)
        file = open(self.path, "rb") if self.path else None
        Follower(request, 0, self.download.length, self.download, file).start()
        return NOT_DONE_YET


class Client:
    def __init__(self, site: Site) -> None:
        self.transport = StringTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(b"GET /blob HTTP/1.1\r\nHost: mirror\r\n\r\n")

    def body(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def aborted(self) -> bool:
        return self.transport.disconnecting

    def full(self) -> None:
        """What a socket whose buffer is full does: pause its producer (the HTTPChannel,
        which pauses the request's)."""
        self.transport.producer.pauseProducing()

    def drained(self) -> None:
        self.transport.producer.resumeProducing()


def _setup(tmp_path, data: bytes, with_file: bool = True, digest_of: bytes | None = None):
    path = out = None
    sink = None
    if with_file:
        path = str(tmp_path / "partial")
        out = open(path, "wb")
        sink = FileSink(out.fileno(), hashlib.sha256(), lambda n: download.stored(n),
                        lambda e: download.sink_failed(e), reactor=None, threaded=False)
    expected = hashlib.sha256(digest_of if digest_of is not None else data).hexdigest()
    clock = Clock()
    download = Download(len(data), reactor=clock, sink=sink,
                        expected_hex=expected if with_file else None, window=WINDOW)
    download.partial = out if with_file else None  # keeps the file open
    download.clock = clock
    upstream = UpstreamBody()
    download.makeConnection(upstream)
    return download, upstream, Site(Body(download, path))


def _feed(download: Download, data: bytes, start: int = 0, end: int | None = None) -> None:
    """Bytes [start, end) as the upstream would send them, one chunk per reactor turn."""
    end = len(data) if end is None else end
    for i in range(start, end, CHUNK):
        download.dataReceived(data[i:min(i + CHUNK, end)])
        download.clock.advance(0)  # the turn ends: what arrived in it is handed on


@pytest.fixture
def preads(monkeypatch):
    calls = []
    real = os.pread

    def pread(fd, n, offset):
        calls.append(offset)
        return real(fd, n, offset)

    monkeypatch.setattr(follower_module.os, "pread", pread)
    return calls


def test_follower_that_keeps_up_gets_bytes_from_memory_as_they_arrive(tmp_path, preads):
    """A client that keeps up receives each chunk as it arrives, from the window (no read of
    the file), all but the final byte until the download is whole and verified."""
    data = os.urandom(10 * CHUNK)
    download, _, site = _setup(tmp_path, data)
    client = Client(site)
    _feed(download, data, end=3 * CHUNK)
    assert client.body() == data[:3 * CHUNK]
    _feed(download, data, start=3 * CHUNK)
    assert client.body() == data[:-1], "the final byte went out before the digest was checked"
    download.connectionLost(Failure(ResponseDone()))
    assert download.state is State.COMPLETE
    assert client.body() == data and not client.aborted()
    assert preads == [], "a client that kept up read the file"


def test_follower_that_lags_reads_the_file_and_never_holds_the_download(tmp_path, preads):
    """A client whose socket is full does not slow a cache download: the upstream is never
    paused for it, the window moves on, and the client later reads what it missed from the
    file, every byte in order."""
    data = os.urandom(16 * WINDOW)
    download, upstream, site = _setup(tmp_path, data)
    slow, fast = Client(site), Client(site)
    slow.full()
    _feed(download, data)
    download.connectionLost(Failure(ResponseDone()))
    assert not upstream.paused, "a slow client paused a cache download"
    assert fast.body() == data
    assert download.state is State.COMPLETE
    slow.drained()
    assert slow.body() == data and not slow.aborted()
    assert preads, "the lagging client should have read the file"


def test_relay_follower_that_lags_holds_the_upstream_within_the_window(tmp_path):
    """Without a file, a full client socket pauses the upstream once the window is full, and
    the relay buffers no more than that."""
    data = os.urandom(8 * WINDOW)
    download, upstream, site = _setup(tmp_path, data, with_file=False)
    client = Client(site)
    client.full()
    fed = 0
    while not upstream.paused and fed < len(data):  # a paused upstream sends no more
        _feed(download, data, start=fed, end=fed + CHUNK)
        fed += CHUNK
    assert upstream.paused and fed <= WINDOW + CHUNK, "the relay buffered past its window"
    client.drained()
    assert not upstream.paused
    _feed(download, data, start=fed)
    download.connectionLost(Failure(ResponseDone()))
    assert client.body() == data and not client.aborted()


def test_relay_follower_still_behind_at_the_end_gets_every_byte(tmp_path):
    """A relay whose body has ended keeps the bytes its slow client has not taken yet."""
    data = os.urandom(WINDOW // 2)
    download, _, site = _setup(tmp_path, data, with_file=False)
    client = Client(site)
    client.full()
    _feed(download, data)
    download.connectionLost(Failure(ResponseDone()))
    client.drained()
    assert client.body() == data and not client.aborted()


def test_follower_that_leaves_stops_a_relay_but_not_a_cache_download(tmp_path):
    """A client that goes away stops the upstream transfer of a relay; a cache download it
    was following goes on for the next client."""
    data = os.urandom(4 * CHUNK)
    for with_file in (False, True):
        download, upstream, site = _setup(tmp_path, data, with_file=with_file)
        client = Client(site)
        _feed(download, data, end=CHUNK)
        client.channel.connectionLost(Failure(ConnectionDone()))
        assert upstream.stopped is (not with_file)
        if with_file:
            _feed(download, data, start=CHUNK)
            download.connectionLost(Failure(ResponseDone()))
            assert download.state is State.COMPLETE


def test_upstream_cut_aborts_every_follower(tmp_path):
    """An upstream body that breaks mid-way aborts every client's connection: none gets a
    short body that looks complete."""
    data = os.urandom(4 * CHUNK)
    download, _, site = _setup(tmp_path, data)
    clients = [Client(site), Client(site)]
    _feed(download, data, end=2 * CHUNK)
    download.connectionLost(Failure(ConnectionLost()))
    assert download.state is State.FAILED and "not whole" in download.reason
    assert all(c.aborted() for c in clients)
    assert all(len(c.body()) < len(data) for c in clients)


def test_digest_mismatch_withholds_the_final_byte_and_aborts(tmp_path):
    """Bytes that do not hash to the digest: the client gets every byte but the last, then
    its connection is aborted."""
    data = os.urandom(4 * CHUNK)
    download, _, site = _setup(tmp_path, data, digest_of=b"other bytes")
    client = Client(site)
    _feed(download, data)
    download.connectionLost(Failure(ResponseDone()))
    assert download.state is State.FAILED and "digest mismatch" in download.reason
    assert client.body() == data[:-1] and client.aborted()


def test_records_of_one_reactor_turn_are_handed_on_as_one_chunk(tmp_path, preads):
    """TLS records that arrive in one turn of the reactor reach the window, the file and the
    followers together, as one chunk, when the turn ends."""
    data = os.urandom(4 * CHUNK)
    download, _, site = _setup(tmp_path, data)
    client = Client(site)
    for i in range(0, 3 * CHUNK, CHUNK):
        download.dataReceived(data[i:i + CHUNK])
    assert client.body() == b"" and download.received == 0
    download.clock.advance(0)
    assert client.body() == data[:3 * CHUNK] and len(download._chunks) == 1
    download.dataReceived(data[3 * CHUNK:])
    download.connectionLost(Failure(ResponseDone()))  # the end hands on what is pending
    assert client.body() == data and download.state is State.COMPLETE
