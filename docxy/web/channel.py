"""The HTTP/1.1 connection of docxy's sites: Twisted's `HTTPChannel` with an absolute
deadline for receiving a request (its idle timeout alone lets a client that trickles a byte
a second hold a connection forever), a cap on request bodies (docxy takes no uploads), and
registry JSON answers to oversized or malformed requests instead of a bare 400 or a
silently closed connection.  `DocxySite.protocol` is this class itself (docxy offers no
ALPN, so Twisted's HTTP/1.1-or-HTTP/2 switch would only ever pick HTTP/1.1).

The Twisted internals it relies on are named in one place, `_TwistedInternals` below, with
why no public API does; tests/unit/web/test_channel.py checks they still exist.
"""
from __future__ import annotations

from twisted.logger import Logger
from twisted.web.http import RESPONSES, HTTPChannel

from docxy.web.answers import error_body

log = Logger()

LINGER = 2.0  # seconds a refused client's remaining bytes are read and dropped
MAX_BODY = 1024 * 1024  # a request body (only token POSTs have one, of at most 64 KiB)
_PHRASES = {431: b"Request Header Fields Too Large"}  # Twisted's RESPONSES lacks it
TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record carrying a handshake
# Bytes a client connection buffers before it pauses its producer, and sends per write.
# Twisted's 64 KiB and 128 KiB make a blob stream pause and resume the upstream (an epoll
# change each way) and send every few dozen microseconds; 256 KiB buffered and 1 MiB per
# send cost about a third less CPU per GB (measured on the Hub-like path), while a slow
# client still holds well under a megabyte of docxy's memory.
WRITE_BUFFER = 256 * 1024
SEND_LIMIT = 1024 * 1024


class _TwistedInternals(HTTPChannel):
    """The private parts of Twisted's `HTTPChannel` docxy uses, and only here.  Each has no
    public counterpart in Twisted 23.10 to 26.x (setup.cfg bounds the version below 27)."""

    # Twisted's own answer to a malformed request line, header, chunk or form: a bare 400
    # and a close.  It is the one place every such refusal passes, and HTTPChannel offers
    # no public hook for it; overriding it is the only way to answer in registry JSON.
    def _respondToBadRequestAndDisconnect(self) -> None:
        self._bad_request()

    def _bad_request(self) -> None:
        """Answer a malformed request (DocxyChannel: in registry JSON) and disconnect."""
        raise NotImplementedError

    @property
    def _answering(self) -> bool:
        """Whether a whole request is being answered (bytes arriving now are the next,
        pipelined request's, which HTTPChannel buffers).  Twisted keeps this in
        `_handlingRequest` and exposes it nowhere; mirroring it from allContentReceived
        and requestDone would have to match the order in which requestDone replays the
        buffered bytes, a copy of Twisted's rule that would drift."""
        return self._handlingRequest


class DocxyChannel(_TwistedInternals):
    """`request_timeout` seconds (0: none) from a request's first byte to its last; a
    client slower than that gets 408 and is disconnected, however steadily it trickles.
    `DocxySite.buildProtocol` sets it from the site's."""

    request_timeout: float = 30.0
    _deadline = None
    _linger = None
    _refused = False
    _seen_bytes = False
    _body_received = 0
    _head_size = 0  # bytes of the request line and headers so far, counted as Twisted does

    def connectionMade(self) -> None:
        super().connectionMade()
        # Over TLS the transport is the TLS protocol; the TCP connection is under it.
        for transport in (self.transport, getattr(self.transport, "transport", None)):
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = WRITE_BUFFER
                transport.SEND_LIMIT = SEND_LIMIT

    # --- the deadline -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: drop what the client still sends
        if data[:1] == TLS_HANDSHAKE and not self._seen_bytes:
            # A TLS ClientHello on a plain-HTTP port: podman and skopeo try TLS first on
            # an `insecure` mirror and fall back to HTTP only once the handshake fails;
            # waiting for a request line would cost them their 10 s handshake timeout.
            log.info("{client} began a TLS handshake on a plain-HTTP port; closed",
                     client=_peer(self.transport))
            self.transport.loseConnection()
            self._refused = True
            return
        self._seen_bytes = True
        if (
            self._deadline is None
            and data
            and not self._answering
            and self.request_timeout > 0
        ):
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()  # the request is whole: answering it takes what it takes
        self._head_size = 0
        super().allContentReceived()

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "TIMEOUT", f"request not received within {self.request_timeout:g}s")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # --- oversized and malformed requests -----------------------------------------------
    def lineReceived(self, line: bytes):
        if self._refused:
            return None
        # HTTPChannel counts the same bytes, but answers a bare 400 past the limit; ours
        # comes first, at the same byte, and says what the limit was.
        self._head_size += len(line)
        if self._head_size > self.totalHeadersSize:
            self._refuse(431, "SIZE_INVALID",
                         f"request headers larger than {self.totalHeadersSize} bytes")
            return None
        return super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            # Checked before Twisted turns it into an int (which fails past 4300 digits).
            if len(value) > 18 or (value.isdigit() and int(value) > MAX_BODY):
                self._refuse(413, "SIZE_INVALID", f"request body larger than {MAX_BODY} bytes")
                return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._body_received = 0
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._answering:  # a body (chunked ones have no Content-Length)
            self._body_received += len(data)
            if self._body_received > MAX_BODY + 64 * 1024:  # the cap, and chunk framing
                self._refuse(413, "SIZE_INVALID", f"request body larger than {MAX_BODY} bytes")
                return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes):
        # No request object yet: the request line itself is too long.
        if not self.requests:
            self._refuse(414, "SIZE_INVALID", f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self._refuse(431, "SIZE_INVALID", f"request header longer than {self.MAX_LENGTH} bytes")
        return None

    def _bad_request(self) -> None:
        # What Twisted would answer with a bare 400 (see _TwistedInternals).
        self._refuse(400, "UNSUPPORTED", "malformed HTTP request")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer with a JSON error and close, first reading (and dropping) for a moment
        what the client is still sending: closing a socket with unread bytes resets the
        connection, and the client could lose the answer."""
        self._cancel_deadline()
        if self._refused or self.transport is None:
            return
        self._refused = True
        self.clearLineBuffer()  # stop parsing what is left
        log.info("{client} refused: {status} {why}; disconnected",
                 client=_peer(self.transport), status=status, why=message)
        self.setTimeout(None)
        body = error_body(code, message)
        head = (
            b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status) or RESPONSES.get(status, b"Error"))
            + b"content-type: application/json\r\n"
            + b"content-length: %d\r\n" % len(body)
            + b"docker-distribution-api-version: registry/2.0\r\n"
            + b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        metrics = getattr(getattr(self, "site", None), "metrics", None)
        if metrics is not None:  # never reaches the site's request log: count it here
            metrics.count_request("other", status, 0.0, len(head) + len(body), "local")
            metrics.refusals.labels("bad_request").inc()
        self._linger = self.callLater(LINGER, self._close)

    def _close(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)


def _peer(transport) -> str:
    peer = transport.getPeer() if transport is not None else None
    return getattr(peer, "host", "-")
