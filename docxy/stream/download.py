"""One upstream body on its way to any number of clients, and for the cache to a file.

`Download` is the protocol `docxy.upstream.bodies.deliver` feeds (which times the body and
resumes it after a cut, so a Download sees one body).  It keeps the newest bytes in a
window in memory, from which followers that keep up take them without a copy or a read.
With a `FileSink` (the cache) the download runs at the upstream's pace: bytes also go to
the file, followers that fall behind the window read the file, and the upstream waits only
for the disk.  Without one (the relay) the window is all there is: the slowest follower
holds the upstream back, and when the last one leaves the upstream transfer stops.

A body is COMPLETE only when it ended whole (`cut_reason`) and, with a digest, hashed to
it; followers get its final byte only then, so a body that turns out wrong is never
received whole by anyone.
"""
from __future__ import annotations

import bisect
import enum
from collections import deque
from typing import Callable
from typing import Protocol as TypingProtocol

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from docxy.stream.sink import FileSink
from docxy.upstream.bodies import cut_reason

FILE_WINDOW = 4 * 1024 * 1024  # bytes kept in memory beside the file (cache downloads)
RELAY_WINDOW = 1024 * 1024  # bytes a relay buffers for its slowest follower
FLUSH_AT = 1024 * 1024  # bytes gathered before they are handed on within one reactor turn
HIGH_WATER = 8 * 1024 * 1024  # bytes received but not yet on disk before the upstream waits
LOW_WATER = 2 * 1024 * 1024
CLIENTS_GONE = "every client went away"  # the reason of a relay nobody reads any more


class State(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"  # whole, verified when a digest was given
    FAILED = "failed"  # see `reason`


class Reader(TypingProtocol):
    """What a download needs of a follower."""

    position: int

    def wake(self) -> None: ...


class Download(Protocol):
    def __init__(self, length: int | None, *, reactor, sink: FileSink | None = None,
                 expected_hex: str | None = None, window: int | None = None,
                 on_end: Callable[["Download"], None] = lambda download: None) -> None:
        """`length`: the bytes announced (None: until the body ends); `sink`: the file the
        bytes also go to, hashed (`expected_hex` is checked against its hash)."""
        self.length = length
        self.state = State.RUNNING
        self.reason = ""  # why it failed
        self.received = 0  # from the upstream: what followers may take from memory
        self.durable = 0  # on disk and hashed: what followers may read from the file
        self._sink = sink
        self._expected_hex = expected_hex
        self._window = window or (FILE_WINDOW if sink is not None else RELAY_WINDOW)
        self._chunks: deque[bytes] = deque()  # contiguous, ending at `received`
        self._starts: deque[int] = deque()  # offset of each chunk in _chunks
        self._followers: list[Reader] = []
        self._on_end = on_end
        self._held = False
        self._ended: Failure | None = None
        self._sink_broken = False
        self._reactor = reactor
        self._pending: list[bytes] = []  # arrived this reactor turn, not yet handed on
        self._pending_bytes = 0
        self._flush_call = None

    @property
    def _kept(self) -> int:
        """Bytes in the window."""
        return self.received - self._starts[0] if self._starts else 0

    # --- followers -----------------------------------------------------------------------
    def follow(self, reader: Reader) -> None:
        self._followers.append(reader)

    def unfollow(self, reader: Reader) -> None:
        if reader in self._followers:
            self._followers.remove(reader)
        if self._sink is None and self.state is State.RUNNING:
            if not self._followers:
                # A relay nobody reads: stop the upstream transfer.
                self.reason = CLIENTS_GONE
                if self.transport is not None:
                    self.transport.stopProducing()
            else:
                self.advanced()

    def in_memory(self, position: int, limit: int) -> bytes | None:
        """Bytes from `position` (up to `limit`, at most one chunk) if the window still
        holds them, else None (read the file)."""
        starts = self._starts
        if not starts or position < starts[0] or position >= self.received:
            return None
        i = bisect.bisect_right(starts, position) - 1
        chunk, start = self._chunks[i], starts[i]
        if position == start and start + len(chunk) <= limit:
            return chunk  # the common case: a whole chunk, no copy
        return chunk[position - start:limit - start]

    def advanced(self) -> None:
        """A follower moved on: a relay may drop what everyone has and ask for more."""
        if self._sink is None:
            self._trim()
            self._hold_or_release()

    def _wake(self) -> None:
        for reader in list(self._followers):
            reader.wake()

    # --- the upstream body ---------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.reason or self._sink_broken:
            return
        if self.length is not None and self.received + self._pending_bytes + len(data) > self.length:
            self.reason = "upstream sent more bytes than it announced"
            self.transport.stopProducing()
            return
        # TLS hands over one record (16 KiB) at a time, dozens per socket read.  They are
        # gathered until the reactor's turn ends (or FLUSH_AT), so that the window, the
        # file and every follower see one chunk per read, not one per record.
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_AT:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending:
            return
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending, self._pending_bytes = [], 0
        if not self.reason and not self._sink_broken:
            self._take(data)

    def _take(self, data: bytes) -> None:
        self._starts.append(self.received)
        self._chunks.append(data)
        self.received += len(data)
        if self._sink is not None:
            self._sink.put(data)
        else:
            self.durable = self.received
        self._trim()
        self._hold_or_release()
        self._wake()

    def connectionLost(self, reason: Failure = None) -> None:
        self._flush()
        self._ended = reason
        if self._sink is not None:
            self._sink.close()
        self._maybe_finish()

    # --- the file ------------------------------------------------------------------------
    def stored(self, n: int) -> None:
        """The sink has `n` more bytes on disk and hashed."""
        self.durable += n
        self._trim()
        self._hold_or_release()
        self._wake()  # followers behind the window read on
        self._maybe_finish()

    def sink_failed(self, error: OSError) -> None:
        self._sink_broken = True
        self.reason = self.reason or f"cannot write to the cache: {error.strerror or error}"
        if self._ended is None and self.transport is not None:
            self.transport.stopProducing()
        self._maybe_finish()

    # --- memory and pace -----------------------------------------------------------------
    def _trim(self) -> None:
        chunks, starts = self._chunks, self._starts
        if self._sink is None:
            # Keep what the slowest follower has not taken yet.
            keep_from = min((r.position for r in self._followers), default=self.received)
            while chunks and starts[0] + len(chunks[0]) <= keep_from:
                chunks.popleft()
                starts.popleft()
        else:
            # Keep the newest bytes; drop only what the file already holds, so that a
            # follower behind the window can always read it there.
            while (chunks and self._kept - len(chunks[0]) >= self._window
                   and starts[0] + len(chunks[0]) <= self.durable):
                chunks.popleft()
                starts.popleft()

    def _hold_or_release(self) -> None:
        if self._sink is not None:
            behind = self.received - self.durable  # the disk (or the hashing) is behind
            hold, release = behind > HIGH_WATER, behind < LOW_WATER
        else:
            hold, release = self._kept > self._window, self._kept <= self._window // 2
        if hold and not self._held and self._ended is None:
            self._held = True
            self.transport.pauseProducing()
        elif release and self._held and self._ended is None:
            self._held = False
            self.transport.resumeProducing()

    # --- the end -------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        """Decide once the body has ended and every byte is on disk (or the disk failed)."""
        if self._ended is None or self.state is not State.RUNNING:
            return
        if self.durable < self.received and not self._sink_broken:
            return
        if self.reason:
            pass
        elif (why := cut_reason(self._ended, self.length, self.received)) is not None:
            self.reason = f"upstream body not whole: {why}"
        elif (self._expected_hex is not None and self._sink is not None
              and self._sink.hasher.hexdigest() != self._expected_hex):
            self.reason = "digest mismatch: the upstream sent other bytes than the digest names"
        if self.reason:
            self.state = State.FAILED
        else:
            self.state = State.COMPLETE
            self.length = self.received
        self._finished()
        self._on_end(self)
        self._wake()  # followers still behind stay listed: a relay keeps their bytes

    def _finished(self) -> None:
        """For subclasses: the state is decided, before anyone hears of it."""
