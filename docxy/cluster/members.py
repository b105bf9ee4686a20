"""Which nodes are alive: each node scores its URL in a Redis sorted set with Redis's
clock every `interval`, and those seen within three intervals are members.  Only the
bookkeeping lives here; what the cluster does with the list is its users' business."""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from docxy.cluster.link import ClusterUnavailable, RedisLink

log = Logger()

# KEYS[1] the set; ARGV node URL, seconds after which an entry is dropped.
_BEAT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.6f', now - tonumber(ARGV[2])))
return 1
"""
# KEYS[1] the set; ARGV seconds: the members seen within that long.
_SEEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.6f', now - tonumber(ARGV[1])), '+inf')
"""


class Membership:
    def __init__(self, link: RedisLink, node_url: str, reactor, interval: float = 2.0,
                 prefix: str = "docxy:") -> None:
        self._link = link
        self.node_url = node_url
        self._reactor = reactor
        self.interval = interval
        self.key = f"{prefix}members"
        self._beater: task.LoopingCall | None = None
        self._beating: defer.Deferred | None = None
        self._complained = False

    def start(self) -> None:
        """Announce this node now and every `interval` (in the background)."""
        if self._beater is not None:
            return
        self._beater = task.LoopingCall(self._beat)
        self._beater.clock = self._reactor
        self._beater.start(self.interval, now=True).addErrback(
            lambda f: log.failure("membership heartbeat", f))

    async def stop(self) -> None:
        """Stop announcing and leave the set (best effort: without Redis the entry ages out)."""
        if self._beater is not None and self._beater.running:
            self._beater.stop()
        self._beater = None
        if self._beating is not None and not self._beating.called:
            await self._beating
        try:
            await self._link.call("ZREM", self.key, self.node_url)
        except ClusterUnavailable:
            pass

    async def members(self) -> list[str]:
        """The node URLs seen within three intervals, sorted; just this node's own while
        Redis is unavailable."""
        try:
            seen = await self._link.eval(_SEEN, [self.key], [repr(3 * self.interval)])
        except ClusterUnavailable as e:
            self._unavailable(e)
            return [self.node_url]
        return sorted(str(node) for node in seen or [])

    def _beat(self) -> None:
        if self._beating is None or self._beating.called:
            self._beating = defer.ensureDeferred(self._beat_once())

    async def _beat_once(self) -> None:
        try:
            # Entries older than many intervals are dropped (a node that died long ago).
            await self._link.eval(_BEAT, [self.key], [self.node_url, repr(30 * self.interval)])
        except ClusterUnavailable as e:
            self._unavailable(e)
        except Exception:  # noqa: BLE001 - the heartbeat must keep going
            log.failure("membership heartbeat")
        else:
            if self._complained:
                log.info("membership announced again")
            self._complained = False

    def _unavailable(self, e: Exception) -> None:
        if not self._complained:
            self._complained = True
            log.info("membership not announced: {err} (retrying every {secs}s)",
                     err=str(e), secs=self.interval)
