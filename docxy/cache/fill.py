"""One upstream download of a blob into the store, at the upstream's pace.

`Fill` is the protocol `docxy.upstream.bodies.deliver` feeds the upstream body to (which
times it and resumes it after a cut, so a Fill sees one body).  It writes every chunk to a partial
file and hashes it; clients follow the file as it grows (follow.py), each at its own pace,
so the download is never held back by the slowest client and memory does not grow.  When
the body ends, the blob enters the store only if its length is whole and its digest
matches; otherwise the partial file is deleted and every follower is aborted.  A verified
blob that cannot be stored (its directory removed, the disk full) still reaches the
followers, who read it through their own descriptors, and is not cached.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Callable

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from docxy.cache.store import BlobStore
from docxy.upstream.bodies import cut_reason

log = Logger()

FILLING, COMPLETE, FAILED = "filling", "complete", "failed"
NOTIFY_EVERY = 256 * 1024
HIGH_WATER = 8 * 1024 * 1024  # bytes received but not yet on disk before the upstream waits
LOW_WATER = 2 * 1024 * 1024
REPORT_EVERY = 1024 * 1024  # the writer thread reports progress per this many bytes


class _InlineSink:
    """Writes and hashes in the caller's thread (tests, and tiny bodies)."""

    def __init__(self, fd: int, hasher, stored: Callable[[int], None],
                 failed: Callable[[OSError], None]) -> None:
        self._fd, self._hasher, self._stored, self._failed = fd, hasher, stored, failed
        self._broken = False

    def put(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            _write_all(self._fd, data)
        except OSError as e:
            self._broken = True
            self._failed(e)
            return
        self._hasher.update(data)
        self._stored(len(data))

    def close(self) -> None:
        pass


class _ThreadSink:
    """Writes and hashes in a thread of its own, in order, so that the reactor thread only
    moves bytes: SHA-256 and file writes release the GIL and use the second core."""

    def __init__(self, fd: int, hasher, stored: Callable[[int], None],
                 failed: Callable[[OSError], None], reactor) -> None:
        self._fd, self._hasher, self._stored, self._failed = fd, hasher, stored, failed
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="docxy-fill", daemon=True).start()

    def put(self, data: bytes) -> None:
        self._queue.put(data)

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        broken = False
        done = 0  # stored but not yet reported: one wake-up of the reactor per batch
        while True:
            data = self._queue.get()
            if data is None:
                if done:
                    self._reactor.callFromThread(self._stored, done)
                return
            if broken:
                continue
            try:
                _write_all(self._fd, data)
            except OSError as e:
                broken = True
                self._reactor.callFromThread(self._failed, e)
                continue
            self._hasher.update(data)
            done += len(data)
            if done >= REPORT_EVERY or self._queue.empty():
                self._reactor.callFromThread(self._stored, done)
                done = 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Fill(Protocol):
    def __init__(
        self,
        store: BlobStore,
        digest: str,
        length: int | None,
        reactor,
        on_end: Callable[["Fill"], None] = lambda fill: None,
        threaded: bool = False,
    ) -> None:
        algorithm, _, self._expected_hex = digest.partition(":")
        self._hasher = hashlib.new(algorithm)
        self.store = store
        self.digest = digest
        self.length = length
        self.path, self._file = store.new_partial(digest)
        # Followers read through their own descriptor (a duplicate of this one), which
        # stays valid across the rename into the store, the unlink of a failed download,
        # or the removal of the whole directory.
        try:
            self._reader = open(self.path, "rb")
        except OSError:
            self._file.close()
            store.discard(digest, self.path)
            raise
        self.state = FILLING
        self.received = 0  # from the upstream
        self.written = 0  # on disk and hashed: what followers may read
        self.reason = ""
        self.write_error: OSError | None = None  # why the partial file could not be written
        self.stored = False  # entered into the store
        self._listeners: list[Callable[[], None]] = []
        self._on_end = on_end
        self._notified = 0
        self._held = False
        self._ended: Failure | None = None
        self._sink_broken = False
        fd = self._file.fileno()
        self._sink = (
            _ThreadSink(fd, self._hasher, self._stored, self._sink_failed, reactor)
            if threaded
            else _InlineSink(fd, self._hasher, self._stored, self._sink_failed)
        )

    # --- followers ----------------------------------------------------------------------
    def open_for_reading(self):
        return os.fdopen(os.dup(self._reader.fileno()), "rb")

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    # --- the upstream body --------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._sink_broken or self.reason:
            return
        if self.length is not None and self.received + len(data) > self.length:
            self.reason = "upstream sent more bytes than it announced"
            self.transport.stopProducing()
            return
        self.received += len(data)
        self._sink.put(data)
        # Bounded memory: if the disk (or the hashing) falls behind the network, the
        # upstream socket waits.
        if not self._held and self.received - self.written > HIGH_WATER:
            self._held = True
            self.transport.pauseProducing()

    def _stored(self, n: int) -> None:
        self.written += n
        if self._held and self.received - self.written < LOW_WATER and self._ended is None:
            self._held = False
            self.transport.resumeProducing()
        # Followers are woken per NOTIFY_EVERY bytes, not per network read: each wake-up
        # costs every follower a read and a write, and small ones cost CPU on a fast link.
        if self.written - self._notified >= NOTIFY_EVERY:
            self._notified = self.written
            self._notify()
        self._maybe_finish()

    def _sink_failed(self, error: OSError) -> None:
        self._sink_broken = True
        self.write_error = error
        self.reason = f"cannot write to the cache: {error.strerror}"
        if self._ended is None and self.transport is not None:
            self.transport.stopProducing()
        self._maybe_finish()

    def connectionLost(self, reason: Failure = None) -> None:
        self._ended = reason
        self._sink.close()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Decide once the body has ended and every byte is on disk (or the disk failed)."""
        if self._ended is None or self.state != FILLING:
            return
        if self.written < self.received and not self._sink_broken:
            return
        reason = self._ended
        self._file.close()
        self._reader.close()  # followers hold their own duplicates
        if self.reason:
            pass
        elif (why := cut_reason(reason, self.length, self.written)) is not None:
            self.reason = f"upstream body not whole: {why}"
        elif self._hasher.hexdigest() != self._expected_hex:
            self.reason = "digest mismatch: the upstream sent other bytes than the digest names"
        if self.reason:
            self.state = FAILED
            self.store.discard(self.digest, self.path)
            log.warn("not caching {digest}: {reason}", digest=self.digest, reason=self.reason)
        else:
            self.state = COMPLETE
            self.length = self.written
            try:
                self.path = self.store.commit(self.digest, self.path, self.written)
            except OSError as e:
                # Followers read through their own descriptors: they still get it whole.
                self.write_error = e
                log.warn("verified {digest} but could not store it: {err}",
                         digest=self.digest, err=e.strerror or str(e))
            else:
                self.stored = True
                log.info("cached {digest} ({size} bytes)", digest=self.digest, size=self.written)
        self._on_end(self)
        self._notify()
        self._listeners.clear()
