"""An `IUpstreamClient` seen through the metrics: each registry's `RegistryProxy` gets one,
so the time to response headers and the last `ratelimit-remaining` are recorded under the
registry's name.  It only times and reads headers; the client does the work."""
from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.python.components import proxyForInterface
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.ops.metrics import Metrics
from docxy.upstream.errors import UpstreamError
from docxy.upstream.interfaces import IUpstreamClient


class MeasuredClient(proxyForInterface(IUpstreamClient, "_client")):  # type: ignore[misc]
    """`client` with its requests timed under `registry`; everything else the interface
    names (`close`) is the client's own, forwarded by `proxyForInterface`."""

    def __init__(
        self, client: IUpstreamClient, metrics: Metrics, registry: str, reactor: IReactorTime
    ) -> None:
        super().__init__(client)
        self._metrics = metrics
        self._registry = registry
        self._reactor = reactor

    async def request(
        self,
        method: bytes,
        url: str,
        headers: Headers,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> IResponse:
        started = self._reactor.seconds()
        try:
            response = await self._client.request(method, url, headers, body, follow_redirects)
        except UpstreamError:
            self._metrics.upstream_failed(self._registry)
            raise
        self._metrics.upstream_answered(
            self._registry, self._reactor.seconds() - started, response.headers
        )
        return response
