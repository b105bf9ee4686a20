"""In-memory stand-ins for the upstream and for a client connection, so resources and the
relay can be driven byte by byte with a Clock instead of the reactor."""
from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet import address, defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from docxy.config import Config
from docxy.ops.metrics import Metrics
from docxy.registry.presets import PRESETS, Upstream
from docxy.registry.selection import UpstreamTable
from docxy.service import build_cache
from docxy.upstream.auth import UpstreamAuth
from docxy.upstream.interfaces import IUpstreamClient
from docxy.upstream.proxy import RegistryProxy
from docxy.web.resources._base import Context
from docxy.web.site import DocxySite, api_resource


class BodyTransport:
    """The producer an upstream body's protocol sees; records what the relay asked."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """An upstream response; with `auto` the whole body is delivered at once, otherwise the
    test drives `protocol` by hand."""

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, code=200, headers=None, body=b"", length=None, auto=True):
        self.code = code
        self.headers = Headers()
        for k, v in (headers or {}).items():
            self.headers.setRawHeaders(k, v if isinstance(v, list) else [v])
        self.body = body
        self.length = len(body) if length is None else length
        self.auto = auto
        self.protocol = None
        self.transport = BodyTransport()

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self.auto:
            if self.body:
                protocol.dataReceived(self.body)
            protocol.connectionLost(Failure(ResponseDone()))

    def cut(self) -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("reset"))])))

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response


@implementer(IUpstreamClient)
class FakeUpstream:
    """Records every upstream request and answers with `responder(method, url, headers,
    body)`: a response, or an exception to raise."""

    def __init__(self, responder: Callable | None = None) -> None:
        self.calls: list[tuple[bytes, str, Headers, bytes | None]] = []
        self.responder = responder or (lambda m, u, h, b: FakeResponse(404))

    async def request(self, method, url, headers, body=None, follow_redirects=True):
        self.calls.append((method, url, headers, body))
        answer = self.responder(method, url, headers, body)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def urls(self) -> list[str]:
        return [u for _, u, _, _ in self.calls]


def blob_upstream(data: bytes, auto: bool = True) -> tuple[FakeUpstream, list[FakeResponse]]:
    """An upstream that answers every blob GET with `data` (with an ETag; a `Range: bytes=N-`
    with a 206 of the rest), a HEAD with its length and `/v2/` with 200; the GET responses
    it handed out are in the list, for a test to drive by hand when `auto` is off."""
    responses: list[FakeResponse] = []

    def respond(method, url, headers, body):
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if method == b"HEAD":
            return FakeResponse(200, {b"content-length": str(len(data)).encode()}, length=0)
        wanted = headers.getRawHeaders(b"range", [None])[0]
        if wanted:
            start = int(wanted.split(b"=")[1].split(b"-")[0])
            span = f"bytes {start}-{len(data) - 1}/{len(data)}".encode()
            response = FakeResponse(206, {b"content-range": span}, body=data[start:],
                                    length=len(data) - start, auto=auto)
        else:
            response = FakeResponse(200, {b"etag": b'"e1"'}, body=data, length=len(data),
                                    auto=auto)
        responses.append(response)
        return response

    return FakeUpstream(respond), responses


def get(site, path: str, headers=()) -> "Exchange":
    """A GET on a new connection; the Exchange holds the answer."""
    ex = Exchange(site)
    ex.send("GET", path, headers)
    return ex


def hub(url: str = "https://registry.test", **settings) -> Upstream:
    """The docker.io upstream (library/ on) at `url`, with `settings` on top."""
    return attrs.evolve(PRESETS["docker.io"], url=url, **settings)


def hub_config(url: str = "https://registry.test", upstream: dict | None = None, **config) -> Config:
    """A Config mirroring docker.io from `url` (with the upstream `settings`) only."""
    return Config(upstreams=(hub(url, **(upstream or {})),), **config)


def make_site(config: Config | None = None, upstream: FakeUpstream | None = None, names=(),
              with_cache: bool = False, own_hosts=(), policy=None):
    """A site over `config` whose every upstream is answered by the one FakeUpstream;
    `policy(metrics, clock)` builds the ClientPolicy (default: everyone, no limits)."""
    config = config or hub_config()
    upstream = upstream or FakeUpstream()
    clock = Clock()
    proxies = {}
    for spec in config.upstreams:
        auth = UpstreamAuth(spec, upstream, clock)
        proxies[spec.name] = RegistryProxy(spec, upstream, auth, clock,
                                           resume_attempts=config.resume_attempts)
    blobs = manifests = None
    if with_cache:
        blobs, manifests = build_cache(config, clock, proxies, threaded_fills=False)
    metrics = Metrics()
    context = Context(
        config=config,
        table=UpstreamTable(config.upstreams, config.default_upstream, own_hosts),
        proxies=proxies,
        reactor=clock,
        server_names=names,
        blobs=blobs,
        manifests=manifests,
        **({"policy": policy(metrics, clock), "metrics": metrics} if policy else {}),
    )
    return DocxySite(api_resource(context), clock, context.metrics), upstream, clock


class Exchange:
    """One client connection to a site over a StringTransport."""

    def __init__(self, site, secure=False, port=5000) -> None:
        self.transport = StringTransport(
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", port),
            peerAddress=address.IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.channel = site.buildProtocol(None)
        if secure:
            self.channel.isSecure = lambda: True
        self.channel.makeConnection(self.transport)

    @property
    def http(self):
        """The HTTPChannel (DocxySite builds DocxyChannel itself, unwrapped)."""
        return self.channel

    def send(self, method: str, path: str, headers: dict | list = (), body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1:5000"]
        items = headers.items() if isinstance(headers, dict) else headers
        lines += [f"{k}: {v}" for k, v in items]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        self.channel.dataReceived(raw)

    def response(self):
        """(status, headers dict of lower-case name -> list, body) of what was written."""
        data = self.transport.value()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            body = _dechunk(body)
        return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out
