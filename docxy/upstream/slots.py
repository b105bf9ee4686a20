"""Connection slots per upstream host: at most `limit` requests to one host run at once, the
others wait their turn (queued, never refused).  A slot is held from the request until its
response's body has ended, which is when the HTTP client gives the connection back.

Without this, 500 concurrent misses open 500 connections to the registry or its CDN.
"""
from __future__ import annotations

from typing import Callable, Hashable

from twisted.internet import defer
from twisted.web.iweb import IResponse
from zope.interface import implementer


class HostSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hosts: dict[Hashable, defer.DeferredSemaphore] = {}

    def in_use(self, host: Hashable) -> int:
        sem = self._hosts.get(host)
        return 0 if sem is None else sem.limit - sem.tokens

    def waiting(self, host: Hashable) -> int:
        sem = self._hosts.get(host)
        return 0 if sem is None else len(sem.waiting)

    async def acquire(self, host: Hashable) -> Callable[[], None]:
        """Wait for a slot on `host`; returns the function that gives it back (calling it
        twice gives it back once).  Cancelling the wait leaves the queue."""
        sem = self._hosts.get(host)
        if sem is None:
            sem = self._hosts[host] = defer.DeferredSemaphore(self.limit)
        await sem.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            sem.release()
            if sem.tokens == sem.limit and not sem.waiting and self._hosts.get(host) is sem:
                del self._hosts[host]  # idle hosts take no memory

        return release


def hold_until_body_ends(response: IResponse, release: Callable[[], None]) -> IResponse:
    """`response`, giving its slot back when its body has ended (at once for a response
    without a body)."""
    if response.length == 0 or response.code in (204, 304):
        release()
        return response
    return _Held(response, release)


@implementer(IResponse)
class _Held:
    """An upstream response whose body's end releases a connection slot; everything else
    is the response's own."""

    def __init__(self, response: IResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._release = release

    def __getattr__(self, name: str):
        return getattr(self._response, name)

    def deliverBody(self, protocol) -> None:
        self._response.deliverBody(_Releasing(protocol, self._release))


class _Releasing:
    """Hands every event to `protocol` (bytes without an extra call: dataReceived is the
    protocol's own) and releases the slot when the body ends."""

    def __init__(self, protocol, release: Callable[[], None]) -> None:
        self._protocol = protocol
        self._release = release
        self.dataReceived = protocol.dataReceived

    def makeConnection(self, transport) -> None:
        self._protocol.makeConnection(transport)

    def connectionLost(self, reason) -> None:
        self._release()
        self._protocol.connectionLost(reason)
