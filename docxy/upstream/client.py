"""The one HTTP client docxy uses to talk to registries, token services and CDNs.

It owns the connection pool, upstream TLS trust, the connect and header timeouts, and
redirect following (a blob GET on Hub answers 307 to a CDN): `Authorization` is dropped on
every hop to another origin, and the redirect target is never shown to the client.  A
signed CDN URL that is refused (expired) makes docxy ask the registry once more for a fresh
one.
Bodies are not read here: see `docxy.upstream.bodies`.  At most `connections` requests
run at once per upstream host (`docxy.upstream.slots`); more wait for a free slot.
The requests themselves go through an `IAgent`: Twisted's pooled `Agent` by default, an
in-memory one (treq's `RequestTraversalAgent`) in tests.
"""
from __future__ import annotations

from io import BytesIO
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from docxy.ops.tls import ReusedContextPolicy, SystemTrustPlus
from docxy.registry.headers import without_authorization
from docxy.upstream.bodies import discard
from docxy.upstream.endpoints import UpstreamEndpoints
from docxy.upstream.errors import UpstreamError
from docxy.upstream.interfaces import IUpstreamClient
from docxy.upstream.slots import HostSlots, hold_until_body_ends

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# What a CDN answers to a signed URL that expired (S3 and CloudFront 403, GCS 400, some 410).
EXPIRED_CODES = frozenset({400, 401, 403, 410})

log = Logger()


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`, the default port filled in: what a redirect compares
    to decide whether `Authorization` goes along, and what connection slots are held per."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), port


@implementer(IUpstreamClient)
class UpstreamClient:
    """`trust_root` (None: the platform's), `connect_timeout` and `pool_size` build the
    default agent, a pooled `Agent` verifying upstreams against `trust_root`.  Given an
    `agent`, they are unused and its connections are its owner's to close."""

    def __init__(
        self,
        reactor: IReactorTime,
        trust_root: SystemTrustPlus | None,
        *,
        connect_timeout: float,
        header_timeout: float,
        max_redirects: int,
        pool_size: int,
        connections: int = 32,
        agent: IAgent | None = None,
    ) -> None:
        self._reactor = reactor
        self.slots = HostSlots(connections)
        self._header_timeout = header_timeout
        self._max_redirects = max_redirects
        self.pool: HTTPConnectionPool | None = None
        if agent is None:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = pool_size
            self.pool.cachedConnectionTimeout = 90
            endpoints = UpstreamEndpoints(reactor, ReusedContextPolicy(trust_root),
                                          connect_timeout)
            agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self._agent = agent

    async def request(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> IResponse:
        """Send a request and answer with the final response (headers only; the body is
        the caller's to read).  Raises UpstreamError when no response can be had."""
        response, where = await self._follow(method, url, headers, body, follow_redirects)
        if not _expired_elsewhere(response, where, url) or method not in (b"GET", b"HEAD"):
            return response
        # A signed URL from the registry, refused by another host: it expired before it
        # was used (or the clocks disagree).  The registry signs a fresh one; ask once more.
        discard(response)
        log.info("{host} refused a redirected download with {status}; asking the registry again",
                 host=origin(where)[1], status=response.code)
        response, where = await self._follow(method, url, headers, body, follow_redirects)
        if _expired_elsewhere(response, where, url):
            discard(response)
            log.warn("{host} refused a fresh redirect too ({status})",
                     host=origin(where)[1], status=response.code)
            raise UpstreamError(
                502, "UNAVAILABLE", "the registry's storage refused the download twice"
            )
        return response

    async def _follow(
        self, method: bytes, url: str, headers: Headers, body: bytes | None,
        follow_redirects: bool,
    ) -> tuple[IResponse, str]:
        """The final response of `url` after redirects, and the URL that gave it."""
        current = url
        for _ in range(self._max_redirects + 1):
            response = await self._once(method, current, headers, body)
            location = response.headers.getRawHeaders(b"location", [None])[0]
            if not follow_redirects or response.code not in REDIRECT_CODES or not location:
                return response, current
            discard(response)
            target = urljoin(current, location.decode("latin-1"))
            if urlsplit(target).scheme not in ("http", "https"):
                raise UpstreamError(502, "UNKNOWN", "upstream redirected to an unsupported URL")
            if origin(target) != origin(current):
                # Never hand the registry credential to a CDN (S3 even refuses it).
                headers = without_authorization(headers)
            if response.code == 303 and method not in (b"GET", b"HEAD"):
                method, body = b"GET", None
            current = target
        raise UpstreamError(502, "UNKNOWN", "upstream redirected too many times")

    async def _once(
        self, method: bytes, url: str, headers: Headers, body: bytes | None
    ) -> IResponse:
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        try:
            uri = url.encode("ascii")
        except UnicodeEncodeError:
            raise UpstreamError(502, "UNKNOWN", "upstream sent an invalid URL") from None
        release = await self.slots.acquire(origin(url))
        d = self._agent.request(method, uri, headers, producer)
        d.addTimeout(self._header_timeout, self._reactor)
        try:
            return hold_until_body_ends(await self._answer(d, url), release)
        except BaseException:
            release()
            raise

    async def _answer(self, d: defer.Deferred, url: str) -> IResponse:
        try:
            return await d
        except defer.TimeoutError:
            raise UpstreamError(504, "UNAVAILABLE", "upstream did not answer in time") from None
        except error.TimeoutError:
            raise UpstreamError(504, "UNAVAILABLE", "upstream connection timed out") from None
        except (error.ConnectError, error.DNSLookupError) as e:
            log.warn("upstream {host} unreachable: {err}", host=origin(url)[1], err=str(e))
            raise UpstreamError(502, "UNAVAILABLE", "upstream unreachable") from None
        except (ResponseFailed, RequestTransmissionFailed, RequestNotSent) as e:
            reasons = "; ".join(str(r.value) for r in getattr(e, "reasons", []))
            log.warn("upstream {host} failed: {err}", host=origin(url)[1], err=reasons)
            raise UpstreamError(502, "UNAVAILABLE", "upstream connection failed") from None
        except error.ConnectionLost:
            raise UpstreamError(502, "UNAVAILABLE", "upstream connection lost") from None

    def close(self) -> defer.Deferred[None]:
        if self.pool is None:
            return defer.succeed(None)
        return self.pool.closeCachedConnections()


def _expired_elsewhere(response: IResponse, where: str, asked: str) -> bool:
    """Another origin than the one asked refused a redirected request the way an expired
    signed URL is refused (a challenge is not that: it is for the client to answer)."""
    return (
        response.code in EXPIRED_CODES
        and origin(where) != origin(asked)
        and not response.headers.hasHeader(b"www-authenticate")
    )
