"""Blob answers through the cache: a hit is served from disk, a blob already downloading
is followed as its bytes arrive, and a miss starts the one upstream download that every
later client follows.

The store is shared by every upstream: a blob is kept once by its digest, whichever
registry it came from.  Cached content of a repository is served only to a client that
repository's upstream would serve it to: its `docxy.access.AccessGate` asks (see there).
"""
from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from docxy.answers import discard_body, refuse, relay, send_error
from docxy.cache.fill import COMPLETE, FAILED, Fill
from docxy.cache.follow import FileFollower
from docxy.cache.store import BlobStore
from docxy.challenge import Realm
from docxy.names import Route
from docxy.proxy import RegistryProxy
from docxy.ranges import UNSATISFIABLE, parse_range
from docxy.relay import request_gone

log = Logger()


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    joined: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    digest_mismatches: int = 0
    failed_fills: int = 0


class BlobCache:
    def __init__(self, store: BlobStore, reactor, idle_timeout: float,
                 threaded_fills: bool = True):
        self.store = store
        self.stats = CacheStats()
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._threaded = threaded_fills  # hash and write in a thread (off in memory tests)
        self._fills: dict[str, Fill] = {}
        # digest -> clients waiting while one of them asks the upstream for it
        self._starting: dict[str, list[defer.Deferred]] = {}

    def filling(self) -> int:
        return len(self._fills)

    def holds(self, digest: str) -> bool:
        """Stored, or being downloaded right now."""
        return self.store.has(digest) or digest in self._fills

    async def answer(self, request, proxy: RegistryProxy, route: Route, realm: Realm | None) -> None:
        digest = route.reference
        if not self.holds(digest):
            await self._miss(request, proxy, route, realm)
            return
        denied = await proxy.access.check_access(route, request.requestHeaders)
        if denied is not None:
            refuse(request, denied, realm)
            return
        fill = self._fills.get(digest)
        if fill is not None:
            self.stats.joined += 1
            self._serve(request, digest, fill)
        elif self.store.has(digest):
            self.stats.hits += 1
            self._serve(request, digest, None)
        else:  # evicted while we asked the upstream: fetch it again
            await self._miss(request, proxy, route, realm)

    async def _miss(self, request, proxy: RegistryProxy, route: Route, realm: Realm | None) -> None:
        digest = route.reference
        waiting = self._starting.get(digest)
        if waiting is not None:
            # Another client is asking the upstream for this blob right now: wait for its
            # answer, then join its download (or try ourselves if it got none).
            ready: defer.Deferred = defer.Deferred()
            waiting.append(ready)
            await ready
            await self.answer(request, proxy, route, realm)
            return
        self._starting[digest] = []
        try:
            await self._start_fill(request, proxy, route, realm)
        finally:
            for ready in self._starting.pop(digest, []):
                if not ready.called:
                    ready.callback(None)

    async def _start_fill(self, request, proxy: RegistryProxy, route: Route, realm: Realm | None) -> None:
        digest = route.reference
        headers = request.requestHeaders.copy()
        # The cache needs the whole blob; a client's range is served from the file.
        for name in (b"range", b"if-range", b"if-none-match", b"if-modified-since"):
            headers.removeHeader(name)
        response = await proxy.pull(route, b"GET", headers, [])
        if response.code != 200 or not isinstance(response.length, int):
            relay(request, response, self._reactor, self._idle_timeout, realm)
            return
        if self.holds(digest):
            # Someone else started (or finished) the download while we waited.
            discard_body(response)
            await self.answer(request, proxy, route, realm)
            return
        self.stats.misses += 1
        fill = Fill(self.store, digest, response.length, self._reactor, self._idle_timeout,
                    on_end=self._fill_ended, threaded=self._threaded)
        proxy.access.note_allowed(route, request.requestHeaders)
        proxy.access.learn_publicity(route)
        self._fills[digest] = fill
        response.deliverBody(fill)
        if not request_gone(request):
            self._serve(request, digest, fill)

    def _fill_ended(self, fill: Fill) -> None:
        self._fills.pop(fill.digest, None)
        self.stats.bytes_from_upstream += fill.written
        if fill.state != "complete":
            self.stats.failed_fills += 1
            if fill.reason.startswith("digest mismatch"):
                self.stats.digest_mismatches += 1

    def _serve(self, request, digest: str, fill: Fill | None) -> None:
        if request_gone(request):
            return
        if fill is not None and fill.state == FAILED:
            # It ended (in this very call stack, for a small body) and was not whole.
            send_error(request, 502, "BLOB_UNKNOWN", "the upstream blob failed verification")
            return
        if fill is not None and fill.state == COMPLETE:
            fill = None  # already in the store
        if fill is None:
            size = self.store.size_of(digest)
            handle = self.store.acquire(digest)
            if handle is None or size is None:
                send_error(request, 404, "BLOB_UNKNOWN", "blob unknown to the cache")
                return
            release = lambda: self.store.release(digest)  # noqa: E731
        else:
            size = fill.length or 0
            handle = fill.open_for_reading()
            release = lambda: None  # noqa: E731
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", digest.encode("ascii"))
        request.setHeader(b"etag", b'"' + digest.encode("ascii") + b'"')
        request.setHeader(b"accept-ranges", b"bytes")
        wanted = parse_range((request.getHeader(b"range") or b"").decode("latin-1"), size)
        if wanted == UNSATISFIABLE:
            handle.close()
            release()
            request.setResponseCode(416)
            request.setHeader(b"content-range", b"bytes */%d" % size)
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        start, end = wanted if wanted is not None else (0, size)
        if wanted is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size))
        request.setHeader(b"content-length", b"%d" % (end - start))
        if request.method == b"HEAD":
            handle.close()
            release()
            request.finish()
            return

        def closed() -> None:
            release()
            if fill is None:
                self.stats.bytes_from_cache += follower.sent

        follower = FileFollower(request, handle, start, end, fill, on_close=closed)
        follower.start()
