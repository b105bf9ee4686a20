"""The named interfaces of the upstream side, so that the real client, the client seen
through the metrics and the tests' fakes are one kind of object and can be checked as such
(`zope.interface.verify.verifyObject`).  The implementations live elsewhere: client.py,
measured.py, tests/unit/fakes.py."""
from __future__ import annotations

from typing import Awaitable

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import Interface


class IUpstreamClient(Interface):
    """What docxy asks of the HTTP client that talks to registries, token services and
    CDNs: `RegistryProxy` and `UpstreamAuth` send requests, the daemon closes it on stop."""

    def request(
        method: bytes,
        url: str,
        headers: Headers,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> Awaitable[IResponse]:
        """Send a request and answer with the final response, its headers only: the body
        is the caller's to read, to its end or `docxy.upstream.bodies.discard`ed, since it
        holds a connection until then.  Redirects are followed unless `follow_redirects`
        is false.  Fails with `docxy.upstream.errors.UpstreamError` when no response can
        be had."""

    def close() -> Deferred[None]:
        """Give back every idle connection; fires once they are closed.  Called once, by
        the owner of the client, when the daemon stops."""
