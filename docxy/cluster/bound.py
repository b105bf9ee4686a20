"""The shared store's size bound (`--store-max-size`), kept across the cluster: every node
records in Redis when it used a blob (a sorted set, least recently used first) and how
big it is; one node at a time (whoever holds the sweeper's lease) removes the least
recently used blobs from the bucket until the bound holds, never one being downloaded.

Each node's local disk keeps its own bound (`--cache-max-size`); this one is the bucket's.
While Redis does not answer nothing is swept, and uses are not recorded.
"""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from docxy.cluster.link import ClusterUnavailable, RedisLink

log = Logger()

SWEEP_EVERY = 60.0  # seconds between sweeps
TOUCH_EVERY = 60.0  # a node records a blob's use at most this often
BATCH = 200  # blobs looked at per round of a sweep
_MAX_TOUCHED = 100_000


class SharedBound:
    def __init__(self, link: RedisLink, bucket, leases, reactor, max_size: int,
                 node_url: str, prefix: str = "docxy:") -> None:
        """`bucket`: docxy.cache.bucket.Bucket; `leases`: docxy.cluster.leases.Leases
        (a blob under a lease is being downloaded: never removed)."""
        self._link = link
        self._bucket = bucket
        self._leases = leases
        self._reactor = reactor
        self.max_size = max_size
        self._node_url = node_url
        self._lru = f"{prefix}store:lru"
        self._sizes = f"{prefix}store:sizes"
        self._sweeper = f"{prefix}store:sweeper"
        self._touched: dict[str, float] = {}
        self._loop: task.LoopingCall | None = None
        self.evictions = 0  # blobs this node removed from the bucket (metrics)
        self.evicted_bytes = 0
        self.total: int | None = None  # bytes in the bucket at the last sweep

    # --- what every node records ----------------------------------------------------------
    def touch(self, digest: str, size: int) -> None:
        """`digest` (of `size` bytes, in the bucket) was used now."""
        now = self._reactor.seconds()
        if now - self._touched.get(digest, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._touched.pop(digest, None)
        if len(self._touched) >= _MAX_TOUCHED:
            self._touched.pop(next(iter(self._touched)))
        self._touched[digest] = now
        d = defer.ensureDeferred(self._record(digest, size, now))
        d.addErrback(lambda f: f.trap(ClusterUnavailable))
        d.addErrback(lambda f: log.failure("recording the use of {digest} failed", f, digest=digest))

    async def _record(self, digest: str, size: int, now: float) -> None:
        await self._link.call("ZADD", self._lru, now, digest)
        await self._link.call("HSET", self._sizes, digest, size)

    # --- one node sweeps ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = task.LoopingCall(self._sweep_once)
        self._loop.clock = self._reactor
        self._loop.start(SWEEP_EVERY, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _sweep_once(self) -> defer.Deferred:
        d = defer.ensureDeferred(self.sweep())
        d.addErrback(lambda f: f.trap(ClusterUnavailable))
        d.addErrback(lambda f: log.failure("sweeping the shared store failed", f))
        return d

    async def sweep(self) -> int:
        """Remove least recently used blobs until the bucket holds at most `max_size`
        bytes; returns how many were removed (0 when another node sweeps now)."""
        taken = await self._link.call("SET", self._sweeper, self._node_url, "NX", "PX",
                                      int(SWEEP_EVERY * 1000))
        if taken is None:
            return 0
        try:
            sizes = await self._link.call("HVALS", self._sizes) or []
            total = sum(int(s) for s in sizes)
            removed = 0
            start = 0
            while total > self.max_size:
                oldest = await self._link.call("ZRANGE", self._lru, start, start + BATCH - 1)
                if not oldest:
                    break
                for digest in oldest:
                    if total <= self.max_size:
                        break
                    if await self._leases.holder(digest) is not None:
                        start += 1  # being downloaded (or just uploaded): kept
                        continue
                    size = int(await self._link.call("HGET", self._sizes, digest) or 0)
                    if not await self._bucket.delete_blob(digest):
                        start += 1  # the bucket said no: try it next sweep
                        continue
                    await self._link.call("ZREM", self._lru, digest)
                    await self._link.call("HDEL", self._sizes, digest)
                    total -= size
                    removed += 1
                    self.evictions += 1
                    self.evicted_bytes += size
                    log.info("removed {digest} ({size} bytes) from the shared store: least "
                             "recently used over the bound", digest=digest, size=size)
            self.total = total
            return removed
        finally:
            await self._link.eval(_RELEASE, [self._sweeper], [self._node_url])


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
