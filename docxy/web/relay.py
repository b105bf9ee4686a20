"""An upstream body streamed to a client request with backpressure (no cache).

`BodyRelay` is the protocol `docxy.upstream.bodies.deliver` feeds.  It registers itself as
the request's push producer, so a full client socket pauses the upstream socket and memory
stays flat.  Stalls and cuts are the body's business (timed, and for blobs resumed, in
bodies.py); a body that still ends early aborts the client connection: a short body must
never look complete.  A client that goes away stops the upstream transfer.
"""
from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from docxy.upstream.bodies import Resumer, cut_reason, deliver

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

    def __init__(self, request, expected_length: int | None):
        self._request = request
        self._expected = expected_length
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

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not request_gone(self._request):
            self._request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        request = self._request
        if request_gone(request):
            self.outcome = self.outcome or "client-gone"
            return
        if self._registered:
            request.unregisterProducer()
            self._registered = False
        why = cut_reason(reason, self._expected, self.received)
        if why is None:
            self.outcome = "complete"
            request.finish()
        else:
            self.outcome = "cut"
            log.warn("upstream body not whole ({why}); aborting the client", why=why)
            abort_client(request)

    # --- IPushProducer: the client's socket tells us to slow down ------------------------
    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _client_gone(self, _failure: Failure) -> None:
        self.outcome = "client-gone"
        log.info(
            "client went away after {received} bytes of {expected}; upstream transfer stopped",
            received=self.received,
            expected=self._expected if self._expected is not None else "?",
        )
        if self.transport is not None:
            self.transport.stopProducing()


def stream(request, response: IResponse, reactor, idle_timeout: float,
           resumer: Resumer | None = None) -> BodyRelay:
    """Send `response`'s body to `request` (headers must already be set); with `resumer`
    a cut body is resumed from the byte the client has."""
    length = response.length if isinstance(response.length, int) else None
    request.docxy_source = "upstream"  # for the request log and docxy_sent_bytes
    relay = BodyRelay(request, length)
    deliver(response, relay, reactor, idle_timeout, resumer)
    return relay
