"""Retention: per registry, images not pulled for `max_age` leave the cache, except the
repositories `keep` names (`[upstream."docker.io"] max_age = "30d" keep = ["library/*"]`).

A sweep runs every `retention_interval` (default an hour) and a minute after the start.
It works through docxy.cache.inventory, so a blob shared with a kept image stays, and a
download or a read in progress is never cut.  It runs beside the size bound
(`--cache-max-size`), which evicts least recently used blobs whatever their age.
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from docxy.cache.manifests import cache_key

log = Logger()

FIRST_SWEEP = 60.0


class RetentionService(service.Service):
    def __init__(self, inventory, upstreams, reactor, interval: float) -> None:
        self._inventory = inventory
        self._rules = [(u.name, u.max_age, u.keep) for u in upstreams if u.max_age]
        self._reactor = reactor
        self._interval = interval
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = reactor
        self._first = None
        self._running: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        if not self._rules:
            return
        self._first = self._reactor.callLater(min(FIRST_SWEEP, self._interval), self._begin)

    def _begin(self) -> None:
        self._first = None
        self._loop.start(self._interval, now=True)

    def stopService(self):
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        if self._loop.running:
            self._loop.stop()
        return self._running

    def sweep(self) -> defer.Deferred | None:
        if self._running is not None:
            return None  # the last sweep still runs
        self._running = defer.ensureDeferred(self._sweep())
        self._running.addErrback(lambda f: log.failure("retention sweep failed", f))

        def ended(_):
            self._running = None

        self._running.addBoth(ended)
        return None

    async def _sweep(self) -> None:
        now = self._reactor.seconds()
        for name, max_age, keep in self._rules:
            result = await self._inventory.expire(cache_key(name), max_age, keep, now)
            if result["tags"] or result["blobs"]:
                log.info("retention for {name}: removed {t} tag(s), {m} manifest(s), {b} "
                         "blob(s) not pulled for {age}s", name=name, t=len(result["tags"]),
                         m=len(result["manifests"]), b=len(result["blobs"]), age=max_age)
