"""`GET /health`: liveness, answered locally without asking the upstream, with the
registries mirrored and the cache's size, free disk and counters when the cache is on (the metrics endpoint will read the same
counters)."""
from __future__ import annotations

import json
import shutil

from twisted.web.resource import Resource


def cache_report(blobs, manifests) -> dict:
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
        "evictions": store.stats.evictions,
        "manifest_hits": manifests.hits if manifests else 0,
        "manifest_misses": manifests.misses if manifests else 0,
        "stale_serves": manifests.stale if manifests else 0,
    }


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, context=None) -> None:
        super().__init__()
        self._context = context

    def render_GET(self, request) -> bytes:
        report: dict = {"status": "ok"}
        ctx = self._context
        if ctx is not None:
            report["registries"] = [u.name for u in ctx.config.upstreams]
            report["default_registry"] = ctx.config.default_upstream
        if ctx is not None and ctx.blobs is not None:
            report["cache"] = cache_report(ctx.blobs, ctx.manifests)
        body = json.dumps(report).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def render_HEAD(self, request) -> bytes:
        self.render_GET(request)
        return b""
