"""docxy's HTTP/1.1 channel in memory: the absolute request deadline (slowloris), and JSON
answers to oversized or malformed requests; and the option that sets the deadline."""
import json

import pytest
from twisted.python import usage

from docxy.tap import Options

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site


def _site(request_timeout=30.0):
    site, upstream, clock = make_site(
        hub_config(), FakeUpstream(lambda m, u, h, b: FakeResponse(200, body=b"{}"))
    )
    site.request_timeout = request_timeout
    return site, clock


def _answer(ex):
    head, _, body = ex.transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, head.lower(), body


def test_trickled_headers_are_cut_at_the_deadline_however_steady():
    """A byte a second keeps the idle timeout happy, but not the request deadline: 408 at 30 s."""
    site, clock = _site()
    ex = Exchange(site)
    ex.channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    for _ in range(29):
        clock.advance(1)
        ex.channel.dataReceived(b"a")
    assert ex.transport.value() == b""
    clock.advance(1.5)
    status, head, body = _answer(ex)
    assert status == 408 and b"content-type: application/json" in head
    assert json.loads(body)["errors"][0]["code"] == "TIMEOUT"
    ex.channel.dataReceived(b"more\r\n\r\n")  # dropped while lingering
    assert ex.transport.value().count(b"HTTP/1.1") == 1
    clock.advance(5)
    assert ex.transport.disconnecting


def test_a_trickled_body_is_cut_too():
    site, clock = _site(request_timeout=5)
    ex = Exchange(site)
    ex.channel.dataReceived(b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(6):
        clock.advance(1)
        ex.channel.dataReceived(b"a")
    assert _answer(ex)[0] == 408


def test_the_deadline_ends_with_the_request_and_restarts_with_the_next():
    """A whole request is answered however long that takes; the next request on the
    connection gets a deadline of its own."""
    site, clock = _site(request_timeout=5)
    ex = Exchange(site)
    ex.send("GET", "/health")
    clock.advance(4)
    ex.send("GET", "/health")
    clock.advance(4)
    assert ex.transport.value().count(b"HTTP/1.1 200") == 2
    ex.channel.dataReceived(b"GET /health HTTP/1.1\r\n")
    clock.advance(5.5)
    assert b"HTTP/1.1 408" in ex.transport.value()


def test_no_deadline_with_zero():
    site, clock = _site(request_timeout=0)
    ex = Exchange(site)
    ex.channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    clock.advance(100)
    assert ex.transport.value() == b""


@pytest.mark.parametrize("raw, status", [
    (b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET /v2/ HTTP/1.1\r\n" + b"X-Many: " + b"b" * 1000 + b"\r\n" * 1 + (b"X-M: " + b"c" * 1000 + b"\r\n") * 20 + b"\r\n", 431),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /auth/token HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    (b"POST /auth/token HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"GET /v2/\xff HTTP/1.1\r\n\r\n", 400),
    (b"NONSENSE\r\n\r\n", 400),
], ids=["long-header", "many-headers", "long-line", "digits", "big-body", "not-ascii", "garbage"])
def test_oversized_and_malformed_requests_get_json_errors(raw, status):
    site, clock = _site()
    ex = Exchange(site)
    ex.channel.dataReceived(raw)
    got, head, body = _answer(ex)
    assert got == status
    assert b"connection: close" in head
    assert json.loads(body)["errors"][0]["message"]
    clock.advance(3)
    assert ex.transport.disconnecting
    # never in the site's request log, but counted
    registry = site.metrics.registry
    assert registry.get_sample_value("docxy_refusals_total", {"reason": "bad_request"}) == 1
    assert registry.get_sample_value(
        "docxy_requests_total", {"endpoint": "other", "status": str(status)}) == 1


def test_a_chunked_body_is_capped():
    site, clock = _site()
    ex = Exchange(site)
    ex.channel.dataReceived(b"POST /auth/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(20):
        ex.channel.dataReceived(b"10000\r\n" + b"a" * 0x10000 + b"\r\n")
    assert _answer(ex)[0] == 413


def test_request_timeout_option_and_environment():
    options = Options(environ={"DOCXY_REQUEST_TIMEOUT": "7"})
    options.parseOptions([])
    assert options.config().request_timeout == 7.0
    options = Options(environ={"DOCXY_REQUEST_TIMEOUT": "7"})
    options.parseOptions(["--request-timeout", "12"])
    assert options.config().request_timeout == 12.0
    with pytest.raises(usage.UsageError):
        Options(environ={}).parseOptions(["--request-timeout", "-1"])


def test_request_timeout_reaches_the_site():
    from twisted.internet.task import Clock

    from docxy.service import build_service

    options = Options(environ={})
    options.parseOptions(["--request-timeout", "9", "--no-cache"])
    service = build_service(options.config(), Clock())
    sites = [s.factory for s in service if hasattr(s, "factory")]
    assert sites and all(site.request_timeout == 9.0 for site in sites)


def test_a_tls_handshake_on_the_plain_port_is_closed_at_once():
    """podman and skopeo try TLS first on an `insecure` mirror: a ClientHello on the plain
    port is closed at once (they then fall back to HTTP), not left to the 30 s deadline."""
    site, clock = _site()
    ex = Exchange(site)
    ex.channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    assert ex.transport.disconnecting and ex.transport.value() == b""
    plain = Exchange(site)
    plain.send("GET", "/health")
    assert _answer(plain)[0] == 200


def test_the_site_builds_a_docxy_channel_with_its_deadline():
    """DocxySite's protocol is DocxyChannel itself, no HTTP/2 switch around it, and each
    connection gets the site's request timeout and reactor."""
    from docxy.web.channel import DocxyChannel

    site, clock = _site(request_timeout=7)
    channel = site.buildProtocol(None)
    assert type(channel) is DocxyChannel
    assert channel.request_timeout == 7 and channel.site is site
    assert channel.callLater == clock.callLater


def test_the_twisted_internals_the_channel_relies_on_still_exist():
    """docxy.web.channel names the private parts of HTTPChannel it uses; a Twisted that
    renamed them would quietly answer bare 400s or lose the deadline's pipelining rule."""
    from twisted.web.http import HTTPChannel

    assert callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None))
    assert HTTPChannel()._handlingRequest is False


def test_a_pipelined_request_gets_its_deadline_once_the_one_before_is_answered():
    """Bytes of the next request that arrive while one is being answered wait in
    HTTPChannel's buffer: its deadline starts when they are parsed, not while they wait."""
    from twisted.internet import defer

    answer = defer.Deferred()

    class Slow(FakeUpstream):
        async def request(self, method, url, headers, body=None, follow_redirects=True):
            return await answer

    site, _, clock = make_site(hub_config(), Slow())
    site.request_timeout = 5
    ex = Exchange(site)
    ex.channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    ex.channel.dataReceived(b"GET /health HTTP/1.1\r\n")
    clock.advance(6)
    assert ex.transport.value() == b"", "the waiting request was timed"
    answer.callback(FakeResponse(200, body=b"{}"))
    assert ex.transport.value().count(b"HTTP/1.1 200") == 1
    clock.advance(5.5)
    assert _answer(ex)[0] == 200 and b"HTTP/1.1 408" in ex.transport.value()


def test_the_header_limit_is_per_request():
    """Request headers are capped per request, not per connection: two requests of 9 KiB
    headers each on one connection are both answered."""
    site, _ = _site()
    ex = Exchange(site)
    for _ in range(2):
        ex.send("GET", "/health", {"X-Pad": "a" * 9000})
    assert ex.transport.value().count(b"HTTP/1.1 200") == 2
