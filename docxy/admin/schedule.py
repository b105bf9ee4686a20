"""Scheduled warm-ups from the TOML file:

    [[warm]]
    images = ["docker.io/library/alpine:3.20", "ghcr.io/org/app:stable"]
    every = "6h"
    platforms = ["linux/amd64"]      # optional; every platform by default

Each image is warmed when docxy starts (after `START_DELAY`) and then every `every`.  An
image whose tag still names a cached manifest costs one HEAD upstream (free on Hub); a
moved tag brings the new image in.  A failed warm-up is logged and tried at the next turn.
"""
from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from docxy.admin.warmup import Platform, WarmError

log = Logger()

START_DELAY = 5.0


class WarmSchedule(service.Service):
    def __init__(self, schedules, warmup, inventory, reactor) -> None:
        self._schedules = schedules  # docxy.config.WarmSchedule
        self._warmup = warmup
        self._inventory = inventory
        self._reactor = reactor
        self._loops: list[task.LoopingCall] = []
        self._calls = []
        self._running: set[defer.Deferred] = set()

    def startService(self) -> None:
        super().startService()
        for schedule in self._schedules:
            loop = task.LoopingCall(self._turn, schedule)
            loop.clock = self._reactor
            self._loops.append(loop)
            self._calls.append(self._reactor.callLater(START_DELAY, loop.start, schedule.every))

    def stopService(self):
        super().stopService()
        for call in self._calls:
            if call.active():
                call.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for d in list(self._running):
            d.cancel()

    def _turn(self, schedule) -> None:
        d = defer.ensureDeferred(self._warm_all(schedule))
        self._running.add(d)
        d.addBoth(lambda r: (self._running.discard(d), r)[1])
        d.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _warm_all(self, schedule) -> None:
        platforms = tuple(Platform.parse(p) for p in schedule.platforms)
        for text in schedule.images:
            try:
                ref = self._inventory.parse(text)
                registry = self._inventory.registry_name(ref.registry)
                summary = await self._warmup.warm(ref, registry, text, platforms)
                log.info("scheduled warm-up of {ref}: {n} blob(s), {b} bytes downloaded",
                         ref=text, n=summary["blobs"] - summary["already_cached"],
                         b=summary["downloaded"])
            except (WarmError, ValueError) as e:
                log.warn("scheduled warm-up of {ref} failed: {err}", ref=text, err=str(e))
