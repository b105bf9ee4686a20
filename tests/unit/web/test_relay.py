"""The streaming relay on a real HTTPChannel over a StringTransport: backpressure,
disconnects, cut bodies and stalls."""
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from docxy.stream.download import RELAY_WINDOW

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site

DIGEST = "sha256:" + "cd" * 32
SIZE = 1000


def _blob_site(**config_args):
    response = FakeResponse(200, {b"content-type": b"application/octet-stream"}, length=SIZE, auto=False)
    upstream = FakeUpstream(lambda m, u, h, b: response)
    config = hub_config(idle_timeout=30, **config_args)
    site, _, clock = make_site(config, upstream)
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    return ex, response, clock


def test_full_client_pauses_upstream():
    """When the client's socket is full the relay buffers at most its window, then pauses
    the upstream body; it resumes once the client has taken the bytes."""
    size = 4 * RELAY_WINDOW
    response = FakeResponse(200, {b"content-type": b"application/octet-stream"}, length=size,
                            auto=False)
    site, _, _ = make_site(hub_config(idle_timeout=30), FakeUpstream(lambda m, u, h, b: response))
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    ex.http.pauseProducing()  # what a full client socket does to the request's producer
    response.protocol.dataReceived(b"a" * (RELAY_WINDOW // 2))
    assert not response.transport.paused, "the window is not full yet"
    response.protocol.dataReceived(b"a" * RELAY_WINDOW)
    assert response.transport.paused
    ex.http.resumeProducing()
    assert not response.transport.paused


def test_body_streams_with_content_length():
    """The body arrives as it flows, under the upstream's Content-Length (no chunking)."""
    ex, response, clock = _blob_site()
    response.protocol.dataReceived(b"a" * 400)
    clock.advance(0)  # the reactor's turn ends: what arrived in it is sent
    assert ex.transport.value().endswith(b"a" * 400)
    response.protocol.dataReceived(b"b" * 600)
    response.end()
    status, hdrs, body = ex.response()
    assert status == 200 and hdrs[b"content-length"] == [b"1000"]
    assert body == b"a" * 400 + b"b" * 600
    assert not ex.transport.disconnecting


def test_client_disconnect_stops_upstream():
    """A client that goes away stops its upstream transfer."""
    ex, response, _ = _blob_site()
    response.protocol.dataReceived(b"a" * 100)
    ex.channel.connectionLost(Failure(ConnectionDone()))
    assert response.transport.stopped


def test_upstream_cut_aborts_client_when_resuming_is_off():
    """An upstream that breaks mid-body, with --resume-attempts 0, aborts the client: a
    short body never looks whole."""
    ex, response, _ = _blob_site(resume_attempts=0)
    response.protocol.dataReceived(b"a" * 100)
    response.cut()
    assert ex.transport.disconnecting and ex.transport.disconnected


def test_short_but_clean_end_aborts_client():
    """Fewer bytes than Content-Length is a failure even if the upstream closed cleanly."""
    ex, response, _ = _blob_site(resume_attempts=0)
    response.protocol.dataReceived(b"a" * 10)
    response.end()
    assert ex.transport.disconnected


def test_stalled_body_is_cut_after_idle_timeout():
    """An upstream that sends nothing for idle-timeout seconds is cut (and the client with it)."""
    ex, response, clock = _blob_site()
    response.protocol.dataReceived(b"a" * 10)
    clock.advance(29)
    assert not response.transport.stopped
    response.protocol.dataReceived(b"a" * 10)
    clock.advance(29)
    assert not response.transport.stopped
    clock.advance(2)
    assert response.transport.stopped


def test_paused_body_is_not_idle():
    """A body held back by a slow client is not the upstream's stall: no cut while paused."""
    response = FakeResponse(200, {b"content-type": b"application/octet-stream"},
                            length=4 * RELAY_WINDOW, auto=False)
    site, _, clock = make_site(hub_config(idle_timeout=30), FakeUpstream(lambda m, u, h, b: response))
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    ex.http.pauseProducing()
    response.protocol.dataReceived(b"a" * (RELAY_WINDOW + 1))
    assert response.transport.paused
    clock.advance(300)
    assert not response.transport.stopped
    ex.http.resumeProducing()
    clock.advance(31)
    assert response.transport.stopped


def test_client_gone_before_headers_cancels_upstream_request():
    """A client that leaves while the upstream is still thinking cancels that request."""
    from twisted.internet import defer

    pending = defer.Deferred()
    cancelled = []
    pending.addErrback(lambda f: cancelled.append(f.check(defer.CancelledError)))

    class Slow(FakeUpstream):
        async def request(self, *a, **kw):
            return await pending

    site, _, _ = make_site(upstream=Slow())
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    ex.channel.connectionLost(Failure(ConnectionDone()))
    assert cancelled == [defer.CancelledError]
