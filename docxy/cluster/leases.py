"""One download per blob across the nodes: a lease is a Redis key `<prefix>lease:<digest>`
holding the leader's node URL with a TTL, renewed while held and let go with a
compare-and-delete.  Deciding what to do without Redis is the caller's (docxy.cache.sources)."""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from docxy.cluster.link import ClusterUnavailable, RedisLink

log = Logger()

# Take it if free (1), else say who holds it, in one step (no gap between SET and GET).
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return redis.call('GET', KEYS[1])
"""
# Still ours: extend it (1); someone else's or gone: 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Delete it only if still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """A lease this node holds on one digest, renewed until `release()` (or until found lost)."""

    def __init__(self, leases: "Leases", digest: str) -> None:
        self.digest = digest
        self.lost = False  # renewal found the key someone else's, or gone
        self.released = False
        self._leases = leases
        self._renewing: defer.Deferred | None = None

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self.released else "held"
        return f"<Lease {self.digest} {state}>"

    async def release(self) -> None:
        """Stop renewing and delete the key if it is still ours (never another node's).
        ClusterUnavailable propagates (the key then expires by itself)."""
        if self.released:
            return
        self.released = True
        self._leases._forget(self)
        await self._leases._link.eval(_RELEASE, [self._leases.key(self.digest)],
                                      [self._leases.node_url])

    async def _renew(self) -> None:
        leases = self._leases
        try:
            renewed = await leases._link.eval(_RENEW, [leases.key(self.digest)],
                                              [leases.node_url, leases._ttl_ms])
        except ClusterUnavailable as e:
            # Kept: if Redis comes back before the TTL runs out, the key is still ours.
            log.debug("could not renew the lease of {digest} ({err}); retrying",
                      digest=self.digest, err=str(e))
            return
        if not renewed and not self.released:
            self.lost = True
            leases._forget(self)
            log.warn("lost the lease of {digest} (another node holds it, or it expired)",
                     digest=self.digest)


class Leases:
    def __init__(self, link: RedisLink, node_url: str, reactor, ttl: float = 5.0,
                 prefix: str = "docxy:") -> None:
        self._link = link
        self.node_url = node_url
        self._reactor = reactor
        self.ttl = ttl
        self._ttl_ms = max(1, int(ttl * 1000))
        self.prefix = prefix
        self._held: dict[str, Lease] = {}  # digest -> our lease being renewed
        self._renewer: task.LoopingCall | None = None

    def key(self, digest: str) -> str:
        return f"{self.prefix}lease:{digest}"

    async def take(self, digest: str) -> Lease | str:
        """A Lease if this node now leads the download of `digest`, else the node URL of
        the holder (this node's own URL for a lease taken by something else here).
        Raises ClusterUnavailable."""
        answer = await self._link.eval(_TAKE, [self.key(digest)], [self.node_url, self._ttl_ms])
        if answer == 1:
            lease = Lease(self, digest)
            previous = self._held.get(digest)
            if previous is not None:
                # Its key expired while Redis was away: the new lease is what counts, and
                # releasing the old one must not delete it.
                previous.lost = previous.released = True
            self._held[digest] = lease
            self._renew_all_soon()
            return lease
        return str(answer)

    async def holder(self, digest: str) -> str | None:
        """The node URL holding `digest`'s lease, None when nobody does.  Raises
        ClusterUnavailable."""
        answer = await self._link.call("GET", self.key(digest))
        return None if answer is None else str(answer)

    def held(self) -> list[Lease]:
        """Our leases being renewed."""
        return list(self._held.values())

    def stop(self) -> None:
        """Stop renewing without releasing, as a node that died would: the keys expire
        within the TTL.  Taking a lease starts renewing again."""
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        self._renewer = None
        self._held.clear()

    # --- renewal ---------------------------------------------------------------------------
    def _renew_all_soon(self) -> None:
        if self._renewer is None:
            self._renewer = task.LoopingCall(self._renew_all)
            self._renewer.clock = self._reactor
            d = self._renewer.start(self.ttl / 3, now=False)
            d.addErrback(lambda f: log.failure("renewing leases", f))

    def _renew_all(self) -> None:
        for lease in list(self._held.values()):
            if lease._renewing is None or lease._renewing.called:
                lease._renewing = defer.ensureDeferred(lease._renew())
                lease._renewing.addErrback(
                    lambda f, digest=lease.digest: log.failure(
                        "renewing the lease of {digest}", f, digest=digest))
        if not self._held:
            self.stop()

    def _forget(self, lease: Lease) -> None:
        if self._held.get(lease.digest) is lease:
            del self._held[lease.digest]
