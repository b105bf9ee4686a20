"""`GET /health`: liveness, answered locally without asking the upstream, with the
registries mirrored and the cache's size, free disk and counters when the cache is on.
`/health?deep=1` and `/ready` add the readiness check (docxy.ops.readiness): 503 when not ready."""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from docxy.ops.readiness import Readiness
from docxy.web.answers import send_json
from docxy.web.resources._base import Context

if TYPE_CHECKING:
    # Annotations only, as in _base: docxy.cache imports docxy.web.
    from docxy.cache.blobs import BlobCache
    from docxy.cache.manifests import ManifestCache


def cache_report(blobs: BlobCache, manifests: ManifestCache | None) -> dict:
    store = blobs.store
    stats = blobs.stats
    try:
        free = shutil.disk_usage(store.root).free
    except OSError:
        free = None
    return {
        "dir": str(store.root),
        "size_bytes": store.total,
        "max_size_bytes": store.max_size,
        "entries": len(store),
        "free_disk_bytes": free,
        "blob_hits": stats.hits,
        "blob_misses": stats.misses,
        "blob_joined_downloads": stats.joined,
        "downloads_in_flight": blobs.filling(),
        "bytes_from_cache": stats.bytes_from_cache,
        "bytes_from_upstream": stats.bytes_from_upstream,
        "digest_mismatches": stats.digest_mismatches,
        "failed_downloads": stats.failed_fills,
        "uncached_relays": stats.uncached,
        "evictions": store.stats.evictions,
        "manifest_hits": manifests.hits if manifests else 0,
        "manifest_misses": manifests.misses if manifests else 0,
        "stale_serves": manifests.stale if manifests else 0,
    }


def deep(request: Request) -> bool:
    """`?deep=1` (or true, yes): the probe wants the readiness check."""
    value = (request.args or {}).get(b"deep", [b""])[-1].strip().lower()
    return value in (b"1", b"true", b"yes", b"on")


def answer_ready(request: Request, readiness: Readiness, local: dict | None = None) -> int:
    """Answer once the readiness check is done: 200 with its report, or 503 with the same
    report; `local` (the liveness report) is answered with it under "ready"."""

    def done(report: dict) -> None:
        status = 200 if report["ready"] else 503
        if local is None:
            send_json(request, status, report)
        else:
            send_json(request, status, {**local, "status": report["status"], "ready": report})

    readiness.check().addCallback(done)
    return NOT_DONE_YET


class HealthResource(Resource):
    """`GET /health`; built without a context (`redirect_resource` may be), the status only."""

    isLeaf = True

    def __init__(self, context: Context | None = None) -> None:
        super().__init__()
        self._context = context

    def render_GET(self, request: Request) -> int:
        report: dict = {"status": "ok"}
        ctx = self._context
        if ctx is not None:
            report["registries"] = [u.name for u in ctx.config.upstreams]
            report["default_registry"] = ctx.config.default_upstream
        if ctx is not None and ctx.blobs is not None:
            report["cache"] = cache_report(ctx.blobs, ctx.manifests)
        if ctx is not None and deep(request):
            return answer_ready(request, ctx.readiness, report)
        send_json(request, 200, report)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> int:
        return self.render_GET(request)


class ReadyResource(Resource):
    """`GET /ready`: the readiness check alone."""

    isLeaf = True

    def __init__(self, context: Context) -> None:
        super().__init__()
        self._context = context

    def render_GET(self, request: Request) -> int:
        return answer_ready(request, self._context.readiness)

    def render_HEAD(self, request: Request) -> int:
        return self.render_GET(request)
