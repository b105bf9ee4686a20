"""The one streaming path: an upstream body flows to a client request with backpressure.

`BodyRelay` is the protocol given to `response.deliverBody()`.  It registers itself as the
request's push producer, so a full client socket pauses the upstream socket and memory
stays flat.  A body that stalls for `idle_timeout` seconds (while the client is reading)
is cut.  A body that ends early aborts the client connection: a short body must never look
complete.  A client that goes away stops the upstream transfer.
"""
from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from docxy.idle import IdleTimer

log = Logger()


def request_gone(request) -> bool:
    return bool(getattr(request, "_disconnected", False)) or bool(request.finished)


def abort_client(request) -> None:
    """Cut the client's connection so that it sees a failed transfer, not a short one."""
    transport = getattr(request.channel, "transport", None) if request.channel else None
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """Streams one upstream response body into one client request."""

    def __init__(self, request, reactor, idle_timeout: float, expected_length: int | None):
        self._request = request
        self._expected = expected_length
        self._timer = IdleTimer(reactor, idle_timeout, self._idle)
        self._paused = False
        self._registered = False
        self.received = 0
        self.outcome: str | None = None  # "complete", "cut" or "client-gone"

    # --- Protocol: bytes from upstream -------------------------------------------------
    def connectionMade(self) -> None:
        if request_gone(self._request):
            self.transport.stopProducing()
            return
        self._request.registerProducer(self, True)
        self._registered = True
        self._request.notifyFinish().addErrback(self._client_gone)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._arm()
        if not request_gone(self._request):
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._timer.disarm()
        request = self._request
        if request_gone(request):
            self.outcome = self.outcome or "client-gone"
            return
        if self._registered:
            request.unregisterProducer()
            self._registered = False
        complete = reason.check(ResponseDone) is not None or (
            reason.check(PotentialDataLoss) is not None and self._expected is None
        )
        if self._expected is not None and self.received != self._expected:
            complete = False
        if complete:
            self.outcome = "complete"
            request.finish()
        else:
            self.outcome = "cut"
            log.warn(
                "upstream body cut after {received} of {expected} bytes: {why}",
                received=self.received,
                expected=self._expected if self._expected is not None else "?",
                why=reason.getErrorMessage(),
            )
            abort_client(request)

    # --- IPushProducer: the client's socket tells us to slow down ------------------------
    def pauseProducing(self) -> None:
        # A paused body is the client's slowness, not the upstream's: no idle timer then.
        self._paused = True
        self._timer.disarm()
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self._timer.disarm()
        if self.transport is not None:
            self.transport.stopProducing()

    def _idle(self) -> None:
        log.warn("upstream body stalled for {secs}s; cutting it", secs=self._timer.seconds)
        if self.transport is not None:
            self.transport.stopProducing()

    def _arm(self) -> None:
        if not self._paused:
            self._timer.arm()

    def _client_gone(self, _failure: Failure) -> None:
        self.outcome = "client-gone"
        log.info(
            "client went away after {received} bytes of {expected}; upstream transfer stopped",
            received=self.received,
            expected=self._expected if self._expected is not None else "?",
        )
        self._timer.disarm()
        if self.transport is not None:
            self.transport.stopProducing()


def stream(request, response: IResponse, reactor, idle_timeout: float) -> BodyRelay:
    """Send `response`'s body to `request` (headers must already be set)."""
    length = response.length if isinstance(response.length, int) else None
    request.docxy_source = "upstream"  # for the request log and docxy_sent_bytes
    relay = BodyRelay(request, reactor, idle_timeout, length)
    response.deliverBody(relay)
    return relay
