"""Blob answers through the cache: a hit is served from disk, a blob already downloading
is followed as its bytes arrive, and a miss starts the one upstream download that every
later client follows.  A blob that does not fit on the disk (or in `--cache-max-size`) is
relayed uncached, and so is every new one for a while after a write found the disk full.

The store is shared by every upstream: a blob is kept once by its digest, whichever
registry it came from.  Cached content of a repository is served only to a client that
repository's upstream would serve it to: its `docxy.upstream.access.AccessGate` asks (see there).
"""
from __future__ import annotations

import errno

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from docxy.cache.fill import Fill
from docxy.cache.interfaces import IBlobStore
from docxy.cache.sources import BlobSources, Source
from docxy.cluster.peers import NOT_YET
from docxy.flight import SingleFlight
from docxy.registry.ranges import UNSATISFIABLE, parse_range
from docxy.stream.clients import request_gone
from docxy.stream.download import State
from docxy.stream.follower import Follower
from docxy.upstream.bodies import Resumer, deliver, discard
from docxy.web.answers import refuse, relay, send_error
from docxy.web.pull import Pull

log = Logger()

MAX_UNSHARED = 10_000  # blobs remembered for upload while the bucket is unreachable
DISK_RESERVE = 64 * 1024 * 1024  # free space a new blob must leave to the file system
FULL_BACKOFF = 60.0  # seconds nothing new is cached after a write found the disk full
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    joined: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    digest_mismatches: int = 0
    failed_fills: int = 0
    uncached: int = 0  # relayed without caching: no room on the disk or under the bound
    bytes_from_bucket: int = 0  # downloaded into this node's disk from the shared store
    bytes_from_peers: int = 0  # streamed from another node's download


@attrs.frozen
class _Started:
    """What asking the upstream for a blob gave: the client that asked (None: it must ask
    again too), answered already unless a download started; the download, and the file
    handle opened for that client before its first byte."""

    leader: object | None
    fill: Fill | None = None
    handle: object | None = None


class BlobCache:
    def __init__(self, store: IBlobStore, reactor, idle_timeout: float,
                 threaded_fills: bool = True, accel_redirect: str | None = None,
                 sources: BlobSources | None = None):
        self.store = store
        self.stats = CacheStats()
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._threaded = threaded_fills  # hash and write in a thread (off in memory tests)
        self._accel = accel_redirect  # nginx sends stored blobs: the X-Accel-Redirect prefix
        self._fills: dict[str, Fill] = {}
        self._full_until = 0.0  # a write found the disk full: relay uncached until then
        self._starting = SingleFlight()  # by digest: the upstream asked for it right now
        self._sources = sources  # the bucket and the cluster (docxy.cache.sources), or None
        self._leases: dict = {}  # digest -> docxy.cluster.leases.Lease of a download led here
        # verified blobs led here whose upload failed: put in the bucket when it is back
        self._unshared: dict[str, int] = {}
        if sources is not None and sources.bucket is not None:
            sources.bucket.on_up.append(self._share_pending)

    @property
    def sources(self) -> BlobSources | None:
        return self._sources

    def filling(self) -> int:
        return len(self._fills)

    def downloads(self) -> list[Fill]:
        """The downloads running now (the status page shows their progress)."""
        return list(self._fills.values())

    def holds(self, digest: str) -> bool:
        """Stored, or being downloaded right now."""
        return self.store.has(digest) or digest in self._fills

    async def answer(self, pull: Pull) -> None:
        request, proxy, route, realm = pull
        digest = route.reference
        if not self.holds(digest):
            await self._miss(pull)
            return
        denied = await proxy.access.check_access(route, request.requestHeaders)
        if denied is not None:
            refuse(request, denied, realm)
            return
        fill = self._fills.get(digest)
        if fill is not None:
            self.stats.joined += 1
            self._serve(request, digest, fill)
        elif self._serve(request, digest, None):
            self.stats.hits += 1
        else:  # evicted (or its file removed) while we asked the upstream: fetch it again
            await self._miss(pull)

    async def _miss(self, pull: Pull) -> None:
        """One upstream GET for a blob however many clients miss it at once.  The first
        client's request starts it, but the download is nobody's own: a client that
        leaves cancels only its own wait (docxy.flight)."""
        request, _, route, _ = pull
        digest = route.reference
        started = await self._starting.run(
            digest, lambda: self._start(pull))
        if started.leader is not request:
            # Another client asked the upstream: join its download (after the upstream's
            # yes for this client), or, if it got none, ask ourselves.
            await self.answer(pull)
        elif started.fill is not None:
            self._serve(request, digest, started.fill, started.handle)

    async def _start(self, pull: Pull) -> "_Started":
        request, proxy, route, realm = pull
        digest = route.reference
        headers = request.requestHeaders.copy()
        # The cache needs the whole blob; a client's range is served from the file.
        for name in (b"range", b"if-range", b"if-none-match", b"if-modified-since"):
            headers.removeHeader(name)
        upstream_resumer = proxy.resumer(route, headers)
        sources = self._sources
        source, lease = Source.UPSTREAM, None
        if sources is None:
            response = await proxy.pull(route, b"GET", headers, [])
        else:
            # The bucket or a peer may answer: the upstream must say yes to this client first.
            denied = await proxy.access.check_access(route, request.requestHeaders)
            if denied is not None:
                refuse(request, denied, realm)
                return _Started(request)

            async def upstream(start: int):
                return await proxy.pull(route, b"GET", headers, [])

            response, source, lease = await sources.open(digest, 0, upstream)
        if response.code != 200 or not isinstance(response.length, int):
            self._release(lease)
            resumer = upstream_resumer if response.code == 200 else None
            relay(request, response, self._reactor, self._idle_timeout, realm, resumer)
            return _Started(request)
        if self.holds(digest):
            # Stored (or started) another way while we waited: everyone asks again.
            self._release(lease)
            discard(response)
            return _Started(None)
        why_not = self._no_room(response.length)
        if why_not is None:
            try:
                fill = Fill(self.store, digest, response.length, self._reactor,
                            on_end=self._fill_ended, threaded=self._threaded)
            except OSError as e:
                self._note_write_error(e)
                why_not = f"cannot write to the cache: {e.strerror or e}"
        if why_not is not None:
            self._release(lease)
            self._relay_uncached(request, response, digest, why_not, upstream_resumer,
                                 proxy.cap if source is Source.UPSTREAM else None)
            return _Started(request)
        self.stats.misses += 1
        if source is Source.UPSTREAM:
            proxy.access.note_allowed(route, request.requestHeaders)
        proxy.access.learn_publicity(route)
        self._fills[digest] = fill
        fill.source = source
        if sources is None:
            resumer = upstream_resumer
        else:
            if lease is not None:
                self._leases[digest] = lease
            resumer = sources.resumer(
                digest, upstream_resumer, proxy.resume_attempts,
                leading=lambda: self._leads(digest),
                took_lease=lambda taken: self._took_over(digest, fill, taken))
        # Opened before the body flows: a small body may end (and, if it cannot be stored,
        # vanish) within deliver.
        handle = None if request_gone(request) else fill.open_for_reading()
        cap = proxy.cap if source is Source.UPSTREAM else None  # a peer or the bucket: free
        deliver(response, fill, self._reactor, self._idle_timeout, resumer, cap)
        return _Started(request, fill, handle)

    # --- the cluster's part --------------------------------------------------------------
    def _leads(self, digest: str) -> bool:
        lease = self._leases.get(digest)
        return lease is not None and not lease.lost

    def _took_over(self, digest: str, fill: Fill, lease) -> None:
        """A follower took the lease of a leader that went away: it now leads (and
        uploads), unless its download ended meanwhile."""
        if self._fills.get(digest) is fill:
            self._leases[digest] = lease
            fill.source = Source.UPSTREAM
        else:
            self._release(lease)

    def _release(self, lease) -> None:
        if lease is not None:
            d = defer.ensureDeferred(lease.release())
            d.addErrback(lambda f: log.info("could not release a lease: {err}",
                                            err=f.getErrorMessage()))

    def _share(self, fill: Fill) -> None:
        """A download this node led ended: a verified blob goes to the bucket, then the
        lease is let go (until then peers stream it from this node's disk)."""
        lease = self._leases.pop(fill.digest, None)
        bucket = self._sources.bucket if self._sources is not None else None
        if not (fill.committed and bucket is not None and fill.source is Source.UPSTREAM):
            self._release(lease)
            return
        self._upload(fill.digest, fill.received).addBoth(lambda _: self._release(lease))

    def _upload(self, digest: str, size: int) -> defer.Deferred:
        """Put a stored blob in the bucket (kept from eviction meanwhile); one that fails is
        tried again when the bucket answers again."""
        bucket = self._sources.bucket
        handle = self.store.acquire(digest)
        path = self.store.local_path(digest)
        if handle is None or path is None:
            return defer.succeed(False)
        handle.close()

        def uploaded(stored):
            self.store.release(digest)
            if stored is True:
                self._used(digest, size)
            else:
                self._unshared.pop(digest, None)
                if len(self._unshared) >= MAX_UNSHARED:
                    self._unshared.pop(next(iter(self._unshared)))
                self._unshared[digest] = size
            return stored

        d = defer.ensureDeferred(bucket.upload_blob(digest, str(path), size))
        d.addErrback(lambda f: log.failure("uploading {digest} failed", f, digest=digest))
        return d.addBoth(uploaded)

    def _share_pending(self) -> None:
        """The bucket answers again: upload, one after the other, what it missed."""
        pending, self._unshared = self._unshared, {}
        if pending:
            log.info("the bucket is back: uploading {n} blobs it missed", n=len(pending))

        async def upload_all() -> None:
            waiting = list(pending.items())
            while waiting:
                digest, size = waiting.pop(0)
                if self.store.has(digest) and not await self._upload(digest, size):
                    for rest in waiting:  # down again: the rest waits for the next time
                        self._unshared.setdefault(*rest)
                    return

        defer.ensureDeferred(upload_all()).addErrback(
            lambda f: log.failure("uploading the blobs the bucket missed failed", f))

    def _used(self, digest: str, size: int) -> None:
        """A stored blob was used: the cluster's least-recently-used order hears of it."""
        bound = self._sources.bound if self._sources is not None else None
        if bound is not None:
            bound.touch(digest, size)

    def serve_peer(self, request, digest: str) -> int:
        """A peer node asks for a blob: streamed from the download running here or from
        the disk (200/206).  Else 503 while this node's download is about to start (the
        peer asks again), 404 when this node has nothing."""
        fill = self._fills.get(digest)
        if fill is not None or self.store.has(digest):
            if self._serve(request, digest, fill, accel=False):
                return 200
        return NOT_YET if digest in self._leases or self._starting.running(digest) else 404

    def _hand_to_nginx(self, request, local, size: int) -> None:
        """Behind nginx (--accel-redirect): nginx sends the file, Range included, with
        sendfile; docxy answers with the headers and where the file is."""
        relative = local.relative_to(self.store.root / "blobs").as_posix()
        request.setHeader(b"x-accel-redirect", f"{self._accel}/{relative}".encode("ascii"))
        request.docxy_source = "cache"
        self.stats.bytes_from_cache += size
        request.finish()

    def _no_room(self, length: int) -> str | None:
        """Why a blob of `length` bytes cannot be cached now, or None if it can."""
        if self._reactor.seconds() < self._full_until:
            return "the cache's disk was full a moment ago"
        if self.store.max_size is not None and length > self.store.max_size:
            return "larger than --cache-max-size"
        free = self.store.free_bytes()
        if free is None:
            return None  # cannot tell: try, and fail cleanly if the disk says no
        pending = sum(max((f.length or 0) - f.durable, 0) for f in self._fills.values())
        if free - pending < length + DISK_RESERVE:
            return f"not enough free disk space ({free} bytes free, {pending} promised)"
        return None

    def _relay_uncached(self, request, response, digest: str, why: str,
                        resumer: Resumer | None, cap=None) -> None:
        self.stats.uncached += 1
        log.warn("relaying {digest} uncached: {why}", digest=digest, why=why)
        relay(request, response, self._reactor, self._idle_timeout, None, resumer, cap)

    def _note_write_error(self, error: OSError | None) -> None:
        if error is not None and error.errno in _DISK_FULL:
            self._full_until = self._reactor.seconds() + FULL_BACKOFF
            log.warn("the cache's disk is full; new blobs are relayed uncached for {secs}s",
                     secs=FULL_BACKOFF)

    def _fill_ended(self, fill: Fill) -> None:
        self._fills.pop(fill.digest, None)
        if fill.source is Source.UPSTREAM:
            self.stats.bytes_from_upstream += fill.durable
        elif fill.source is Source.PEER:
            self.stats.bytes_from_peers += fill.durable
        else:
            self.stats.bytes_from_bucket += fill.durable
        if self._sources is not None:
            self._share(fill)
        self._note_write_error(fill.write_error)
        if fill.state is not State.COMPLETE:
            self.stats.failed_fills += 1
            if fill.reason.startswith("digest mismatch"):
                self.stats.digest_mismatches += 1

    def _serve(self, request, digest: str, fill: Fill | None, handle=None,
               accel: bool = True) -> bool:
        """Answer from the store (fill None) or from a download; False, with nothing
        answered, when the stored file is gone.  `handle`: the download's file, opened."""
        if request_gone(request) or (fill is not None and fill.state is State.FAILED):
            if handle is not None:
                handle.close()
            if not request_gone(request):
                # It ended (in this very call stack, for a small body) and was not whole.
                send_error(request, 502, "BLOB_UNKNOWN", "the upstream blob failed verification")
            return True
        if fill is not None and fill.state is State.COMPLETE and handle is None:
            fill = None  # already in the store (or, if it could not be stored, a miss)
        if fill is None:
            size = self.store.size_of(digest)
            handle = self.store.acquire(digest)
            if handle is None or size is None:
                if handle is not None:
                    handle.close()
                    self.store.release(digest)
                return False
            release = lambda: self.store.release(digest)  # noqa: E731
        else:
            size = fill.length or 0
            handle = handle or fill.open_for_reading()
            release = lambda: None  # noqa: E731
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", digest.encode("ascii"))
        request.setHeader(b"etag", b'"' + digest.encode("ascii") + b'"')
        request.setHeader(b"accept-ranges", b"bytes")
        if fill is None and accel and self._accel is not None and request.method == b"GET":
            local = self.store.local_path(digest)
            if local is not None:
                handle.close()
                release()
                self._hand_to_nginx(request, local, size)
                return True
        wanted = parse_range((request.getHeader(b"range") or b"").decode("latin-1"), size)
        if wanted is UNSATISFIABLE:
            handle.close()
            release()
            request.setResponseCode(416)
            request.setHeader(b"content-range", b"bytes */%d" % size)
            request.setHeader(b"content-length", b"0")
            request.finish()
            return True
        start, end = wanted if wanted is not None else (0, size)
        if wanted is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size))
        request.setHeader(b"content-length", b"%d" % (end - start))
        if request.method == b"HEAD":
            handle.close()
            release()
            request.finish()
            return True

        if fill is None:
            self._used(digest, size)

        def closed(follower: Follower) -> None:
            release()
            if fill is None:
                self.stats.bytes_from_cache += follower.sent

        Follower(request, start, end, fill, handle, on_close=closed).start()
        return True
