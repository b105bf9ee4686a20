"""Upstream response bodies: the one rule for whether a body arrived whole, and the three
ways docxy reads one.

- `read_small` (manifests, tokens, pings): the whole body or an UpstreamError, never a cut
  one, as `twisted.web.client.readBody` does it.
- `discard`: a body nobody wants (a redirect's, a refusal's): a little is read so the
  connection can be reused, the rest is cut.
- `deliver`: a streamed body (a client relay, a cache download) handed to one protocol,
  with an idle timer and, given a `Resumer`, resumed after a cut or a stall by asking for
  the bytes still missing (`Range: bytes=N-`), so the protocol sees one body, slower.

The protocol `deliver` feeds sees `connectionLost(ResponseDone)` only for a whole body;
`cut_reason` is how it tells (and how everything else here tells).
"""
from __future__ import annotations

from typing import Awaitable, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from docxy.registry.ranges import parse_content_range, range_from, unsatisfied_size
from docxy.upstream.errors import UpstreamError
from docxy.upstream.idle import IdleTimer
from docxy.upstream.pace import RateCap

log = Logger()

SMALL_BODY_IDLE = 60.0  # seconds a small upstream answer may stall before it is cut
MAX_DISCARD = 64 * 1024  # a discarded body up to this size is read (the connection stays)
# Answers to a resume that are worth asking again after a pause; any other refusal ends it.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class BodyStalled(Exception):
    """The upstream sent nothing for the idle timeout."""


class BodyTooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__(502, "UNKNOWN", "upstream answer too large")


def cut_reason(reason: Failure, expected: int | None, received: int) -> str | None:
    """Why a body that ended with `reason` is not whole, or None when it is: the HTTP
    client saw its end (ResponseDone) and every announced byte arrived.  A body without a
    length that ended with its connection (PotentialDataLoss) may have been cut: as with
    readBody, that is not whole."""
    if reason.check(ResponseDone) is None:
        return f"cut after {received} bytes: {reason.getErrorMessage()}"
    if expected is not None and received != expected:
        return f"short: {received} of {expected} bytes"
    return None


def body_length(response: IResponse) -> int | None:
    """The upstream's Content-Length.  The HTTP client keeps it only as `length` for a body,
    and only as a header for HEAD (where `length` is 0); a HEAD answer must carry it."""
    header = response.headers.getRawHeaders(b"content-length", [None])[0]
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return response.length if isinstance(response.length, int) else None


def _length(response: IResponse) -> int | None:
    return response.length if isinstance(response.length, int) else None


# --- discarding -------------------------------------------------------------------------

class _Discard(Protocol):
    def __init__(self) -> None:
        self._seen = 0

    def dataReceived(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > MAX_DISCARD:
            self.transport.stopProducing()


def discard(response: IResponse) -> None:
    """Drop the body of a response nobody wants: a small one is read to its end, so that
    its connection goes back to the pool; a larger one is cut."""
    if _length(response) is not None and response.length > MAX_DISCARD:
        response.deliverBody(_Stop())
    else:
        response.deliverBody(_Discard())


class _Stop(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


# --- small bodies -----------------------------------------------------------------------

class _Collect(Protocol):
    def __init__(self, limit: int, expected: int | None) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self._limit = limit
        self._expected = expected
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._size > self._limit:
            self.done.errback(BodyTooLarge())
        elif reason.check(BodyStalled):
            self.done.errback(UpstreamError(504, "UNAVAILABLE", "upstream answer stalled"))
        elif (why := cut_reason(reason, self._expected, self._size)) is not None:
            log.warn("upstream answer not whole: {why}", why=why)
            self.done.errback(UpstreamError(502, "UNAVAILABLE", "upstream answer cut short"))
        else:
            self.done.callback(b"".join(self._chunks))


def read_small(
    response: IResponse, limit: int, reactor=None, idle: float = SMALL_BODY_IDLE
) -> defer.Deferred[bytes]:
    """The whole (small) body.  Fails with BodyTooLarge past `limit` bytes, and with
    UpstreamError when it is cut or (given a reactor) stalls for `idle` seconds."""
    collector = _Collect(limit, _length(response))
    deliver(response, collector, reactor, idle if reactor is not None else 0)
    return collector.done


# --- streamed bodies --------------------------------------------------------------------

def default_backoff(attempt: int) -> float:
    """Seconds before resume attempt `attempt` (1, 2, ...): the first at once (a cut link
    usually answers again), then 0.5 s doubling up to 8 s."""
    return 0.0 if attempt <= 1 else min(0.5 * 2 ** (attempt - 2), 8.0)


@attrs.frozen
class Resumer:
    """How a cut body is asked for again: `again(range, if_range)` sends the request (a
    fresh one, through the registry, so an expired CDN link is signed anew); at most
    `attempts` in a row without a byte gained; `on_resume(position, attempt, why)` is told
    of each."""

    again: Callable[[bytes, bytes | None], Awaitable[IResponse]]
    attempts: int
    on_resume: Callable[[int, int, str], None] = lambda position, attempt, why: None
    backoff: Callable[[int], float] = default_backoff


def deliver(response: IResponse, protocol, reactor, idle_timeout: float,
            resumer: Resumer | None = None, cap: RateCap | None = None) -> None:
    """Stream `response`'s body into `protocol` (see the module docstring); `cap`: the
    registry's bandwidth cap, which pauses the body while its budget is spent."""
    _Body(response, protocol, reactor, idle_timeout, resumer, cap).start()


class _Leg(Protocol):
    """One upstream response's part of a body.  `overlong`: it may run past the end of
    the body (a 200 answering a resume), so docxy ends it itself when the body is whole."""

    def __init__(self, body: "_Body", overlong: bool) -> None:
        self._body = body
        self.overlong = overlong
        self.received = 0

    def connectionMade(self) -> None:
        self._body._leg_started(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._body._leg_data(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self._body._leg_lost(self, reason)


@implementer(IPushProducer)
class _Body:
    """A body made of one or more upstream responses (legs), delivered to one protocol.
    The protocol pauses, resumes and stops it as it would the response itself."""

    def __init__(self, response: IResponse, protocol, reactor, idle_timeout: float,
                 resumer: Resumer | None, cap: RateCap | None = None) -> None:
        self._first = response
        self._cap = cap
        self._capped = None  # the delayed call ending a wait for the cap's budget
        self._protocol = protocol
        self._reactor = reactor
        self._resumer = resumer
        self._timer = IdleTimer(reactor, idle_timeout, self._stalled)
        self._expected = _length(response)
        span = (
            parse_content_range(response.headers.getRawHeaders(b"content-range", [b""])[0]
                                .decode("latin-1"))
            if response.code == 206 else None
        )
        if response.code not in (200, 206) or (response.code == 206 and span is None):
            self._resumer = None  # no way to say where a resume would start (multipart)
        self._start = span[0] if span else 0  # where this body starts in the blob
        if self._expected is None and span is not None:
            self._expected = span[1] - span[0]
        etag = response.headers.getRawHeaders(b"etag", [None])[0]
        self._etag = etag if etag and not etag.startswith(b"W/") else None
        self._delivered = 0
        self._leg: _Leg | None = None
        self._transport = None
        self._skip = 0
        self._failures = 0
        self._paused = False
        self._stopped = False
        self._done = False
        self._waiting = None  # the delayed call or Deferred of a resume in preparation

    def start(self) -> None:
        self._protocol.makeConnection(self)
        self._begin_leg(self._first, overlong=False)

    # --- IPushProducer, for the protocol ----------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True
        self._timer.disarm()  # a body the protocol holds back is not the upstream's stall
        if self._transport is not None:
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._transport is not None and self._capped is None:
            self._timer.arm()
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._stopped or self._done:
            return
        self._stopped = True
        self._timer.disarm()
        if self._transport is not None:
            self._transport.stopProducing()  # its connectionLost ends the body
        else:
            self._cancel_waiting()
            self._reactor.callLater(0, self._finish, Failure(defer.CancelledError("stopped")))

    # --- legs ---------------------------------------------------------------------------
    def _begin_leg(self, response: IResponse, overlong: bool) -> None:
        self._leg = _Leg(self, overlong)
        response.deliverBody(self._leg)

    def _leg_started(self, leg: _Leg) -> None:
        if leg is not self._leg:
            return
        self._transport = leg.transport
        if self._stopped:
            self._transport.stopProducing()
            return
        if self._paused or self._capped is not None:
            self._transport.pauseProducing()
        else:
            self._timer.arm()

    def _leg_data(self, leg: _Leg, data: bytes) -> None:
        if leg is not self._leg or self._done:
            return
        if not self._paused and self._capped is None:
            self._timer.arm()
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._expected is not None:
            data = data[: self._expected - self._delivered]
        if not data:
            return
        self._failures = 0  # progress: the attempts count again from none
        self._delivered += len(data)
        self._protocol.dataReceived(data)
        if leg.overlong and self._delivered == self._expected:
            self._leg = None
            self._transport = None
            leg.transport.stopProducing()
            self._finish(Failure(ResponseDone()))
        elif self._cap is not None and not self._done:
            self._pace(self._cap.take(len(data)))

    # --- the registry's bandwidth cap ---------------------------------------------------
    def _pace(self, wait: float) -> None:
        """Over the cap's budget: the transport waits `wait` seconds (not a stall)."""
        if wait <= 0 or self._capped is not None:
            return
        self._timer.disarm()
        if self._transport is not None:
            self._transport.pauseProducing()
        self._capped = self._reactor.callLater(wait, self._uncap)

    def _uncap(self) -> None:
        self._capped = None
        if self._done or self._stopped:
            return
        wait = self._cap.wait()  # other bodies of the registry may have spent it meanwhile
        if wait > 0:
            self._pace(wait)
        elif not self._paused and self._transport is not None:
            self._timer.arm()
            self._transport.resumeProducing()

    def _leg_lost(self, leg: _Leg, reason: Failure) -> None:
        if leg is not self._leg or self._done:
            return
        self._leg = None
        self._transport = None
        self._timer.disarm()
        why = cut_reason(reason, self._expected, self._delivered)
        if why is None or self._stopped:
            self._finish(reason)
        else:
            self._retry(why, reason)

    def _stalled(self) -> None:
        transport = self._transport
        self._leg = None
        self._transport = None
        seconds = self._timer.seconds
        if transport is not None:
            transport.stopProducing()
        log.warn("upstream body stalled for {secs}s after {n} bytes", secs=seconds,
                 n=self._start + self._delivered)
        self._retry(f"stalled for {seconds}s", Failure(BodyStalled(f"no data for {seconds}s")))

    # --- resuming -----------------------------------------------------------------------
    def _retry(self, why: str, failure: Failure) -> None:
        """The body broke off: ask for the rest, or, with no attempt left, fail it."""
        resumer = self._resumer
        if resumer is None or self._failures >= resumer.attempts:
            if resumer is not None:
                log.warn("upstream body {why}; giving up after {n} resume attempts",
                         why=why, n=self._failures)
            self._finish(failure)
            return
        self._failures += 1
        position = self._start + self._delivered
        resumer.on_resume(position, self._failures, why)
        self._waiting = self._reactor.callLater(
            resumer.backoff(self._failures), self._ask_again, position)

    def _ask_again(self, position: int) -> None:
        end = self._start + self._expected if self._expected is not None else None
        d = defer.ensureDeferred(self._resumer.again(range_from(position, end), self._etag))
        self._waiting = d
        d.addCallbacks(lambda response: self._answered(response, position),
                       self._ask_failed)

    def _ask_failed(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(defer.CancelledError) or self._done:
            return
        if isinstance(failure.value, UpstreamError):
            why = failure.value.message
        else:  # not an upstream's failure: a bug, whose traceback must not be lost
            log.failure("asking an upstream again for a cut body failed", failure)
            why = failure.getErrorMessage()
        self._retry(f"could not be asked again ({why})", failure)

    def _answered(self, response: IResponse, position: int) -> None:
        self._waiting = None
        if self._done or self._stopped:
            discard(response)
            if not self._done:
                self._finish(Failure(defer.CancelledError("stopped")))
            return
        header = response.headers.getRawHeaders(b"content-range", [b""])[0].decode("latin-1")
        if response.code == 206:
            span = parse_content_range(header)
            if span is None or span[0] > position:
                discard(response)
                self._finish(Failure(UpstreamError(
                    502, "UNAVAILABLE", f"upstream answered a resume with range {header!r}")))
                return
            self._skip = position - span[0]
            end = self._start + self._expected if self._expected is not None else None
            self._begin_leg(response, overlong=end is not None and span[1] > end)
        elif response.code == 200:
            log.info("upstream ignored Range; skipping the {n} bytes already here", n=position)
            self._skip = position
            self._begin_leg(response, overlong=self._expected is not None)
        elif response.code == 416 and self._expected is None \
                and unsatisfied_size(header) == position:
            discard(response)  # the body had ended after all: nothing is missing
            self._finish(Failure(ResponseDone()))
        elif response.code in _RETRY_STATUSES:
            discard(response)
            self._retry(f"resume answered {response.code}",
                        Failure(UpstreamError(502, "UNAVAILABLE", f"upstream {response.code}")))
        else:
            discard(response)
            log.warn("upstream refused to resume a body with {status}", status=response.code)
            self._finish(Failure(UpstreamError(
                502, "UNAVAILABLE", f"upstream answered a resume with {response.code}")))

    def _cancel_waiting(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        if isinstance(waiting, defer.Deferred):
            waiting.cancel()
        elif waiting.active():
            waiting.cancel()

    def _finish(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        self._timer.disarm()
        if self._capped is not None and self._capped.active():
            self._capped.cancel()
        self._capped = None
        self._cancel_waiting()
        self._protocol.connectionLost(reason)
