"""Graceful stop: the requests in progress and the connections they came on (kept by
`DocxySite`), and the service that holds the daemon's stop until the requests have finished
and their last bytes have left, or a deadline has passed.  The listeners themselves stop
accepting at once; that is twistd's ordinary stop."""
from __future__ import annotations

import weakref
from typing import Iterable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="docxy.lifecycle")

# How often the stop looks whether the connections it closed are gone.
CLOSE_POLL = 0.1


def _is_open(channel) -> bool:
    """Whether the socket under `channel` (plain, or under TLS) is still connected."""
    transport = getattr(channel, "transport", None)
    for _ in range(4):  # HTTP channel -> TLS wrapper -> TCP connection
        if transport is None or getattr(transport, "disconnected", False):
            return False
        inner = getattr(transport, "transport", None)
        if inner is None:
            return bool(getattr(transport, "connected", False))
        transport = inner
    return False


class ActiveRequests:
    """The requests of one site being answered, the connections that carried any, and who
    waits for no request to be left."""

    def __init__(self) -> None:
        self.draining = False
        self._running: set = set()
        self._channels: weakref.WeakSet = weakref.WeakSet()
        self._waiting: list[defer.Deferred] = []

    @property
    def count(self) -> int:
        return len(self._running)

    def track(self, request) -> None:
        """Count `request` until it finishes, fails or its client goes away."""
        self._running.add(request)
        try:
            self._channels.add(request.channel)
        except TypeError:  # a channel that cannot be weakly referenced: not waited for
            pass
        if self.draining:
            self._close_after(request)
        request.notifyFinish().addBoth(lambda _: self._done(request))

    @staticmethod
    def _close_after(request) -> None:
        # No further request on this connection: it closes once this answer has been sent
        # (the client reconnects, to the next daemon).
        request.setHeader(b"connection", b"close")
        if hasattr(request.channel, "persistent"):
            request.channel.persistent = False

    def _done(self, request) -> None:
        self._running.discard(request)
        if not self._running:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> None:
        """From now on every connection closes after the answer it is waiting for."""
        self.draining = True
        for request in self._running:
            if hasattr(request.channel, "persistent"):
                request.channel.persistent = False

    def when_idle(self) -> defer.Deferred:
        """A Deferred that fires as soon as no request is in progress (now, if none is)."""
        if not self._running:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def open_connections(self) -> list:
        return [c for c in list(self._channels) if _is_open(c)]

    def close_connections(self) -> int:
        """Close every open connection once its buffered bytes are written; how many."""
        channels = self.open_connections()
        for channel in channels:
            channel.transport.loseConnection()
        return len(channels)


class GracefulStop(service.Service):
    """On stop: waits for the requests of its sites to finish, then closes their
    connections once the last bytes are written (a finished answer can still sit in a send
    buffer), all within `timeout` seconds.  What still runs then is cut when the reactor
    shuts down; a client never mistakes a cut body for a whole one (every body has its
    length)."""

    def __init__(self, requests: Iterable[ActiveRequests], reactor, timeout: float) -> None:
        self.requests = tuple(requests)
        self.reactor = reactor
        self.timeout = timeout

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return _Drain(self.requests, self.reactor, self.timeout).run()


class _Drain:
    """One graceful stop, from the signal to the last connection closed or the deadline."""

    def __init__(self, requests: tuple[ActiveRequests, ...], reactor, timeout: float) -> None:
        self.requests = requests
        self.reactor = reactor
        self.timeout = timeout
        self.done: defer.Deferred = defer.Deferred()
        self._poll = LoopingCall(self._check_closed)
        self._poll.clock = reactor
        self._timer = None
        self._started = 0.0
        self._running = 0

    def _count(self) -> int:
        return sum(r.count for r in self.requests)

    def _open(self) -> int:
        return sum(len(r.open_connections()) for r in self.requests)

    def run(self) -> defer.Deferred:
        for r in self.requests:
            r.drain()
        self._running = self._count()
        if self._running:
            log.info(
                "docxy: stopping; no new connections, waiting up to {timeout:g}s for "
                "{running} request(s) in progress",
                timeout=self.timeout, running=self._running,
            )
        self._started = self.reactor.seconds()
        self._timer = self.reactor.callLater(self.timeout, self._deadline)
        defer.gatherResults([r.when_idle() for r in self.requests]).addCallback(self._idle)
        return self.done

    def _idle(self, _) -> None:
        if self.done.called:
            return
        for r in self.requests:
            r.close_connections()
        self._poll.start(CLOSE_POLL, now=True)

    def _check_closed(self) -> None:
        if self._open():
            return
        if self._running:
            log.info("docxy: every request finished after {elapsed:.1f}s; stopping",
                     elapsed=self.reactor.seconds() - self._started)
        else:
            log.info("docxy: stopping; no request in progress")
        self._finish()

    def _deadline(self) -> None:
        log.warn(
            "docxy: {running} request(s) still in progress and {open} connection(s) open "
            "after {timeout:g}s (--stop-timeout); cutting them",
            running=self._count(), open=self._open(), timeout=self.timeout,
        )
        self._finish()

    def _finish(self) -> None:
        if self._poll.running:
            self._poll.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.done.called:
            self.done.callback(None)
