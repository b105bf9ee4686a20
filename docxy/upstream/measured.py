"""An `UpstreamClient` seen through the metrics: each registry's `RegistryProxy` gets one,
so the time to response headers and the last `ratelimit-remaining` are recorded under the
registry's name.  It only times and reads headers; the client does the work."""
from __future__ import annotations

from docxy.ops.metrics import Metrics
from docxy.upstream.errors import UpstreamError


class MeasuredClient:
    def __init__(self, client, metrics: Metrics, registry: str, reactor) -> None:
        self._client = client
        self._metrics = metrics
        self._registry = registry
        self._reactor = reactor

    async def request(self, *args, **kwargs):
        started = self._reactor.seconds()
        try:
            response = await self._client.request(*args, **kwargs)
        except UpstreamError:
            self._metrics.upstream_failed(self._registry)
            raise
        self._metrics.upstream_answered(
            self._registry, self._reactor.seconds() - started, response.headers
        )
        return response

    def __getattr__(self, name: str):
        return getattr(self._client, name)
