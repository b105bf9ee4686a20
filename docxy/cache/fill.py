"""One upstream download of a blob into the store, at the upstream's pace.

`Fill` is the body protocol of the upstream response.  It writes every chunk to a partial
file and hashes it; clients follow the file as it grows (follow.py), each at its own pace,
so the download is never held back by the slowest client and memory does not grow.  When
the body ends, the blob enters the store only if its length is whole and its digest
matches; otherwise the partial file is deleted and every follower is aborted.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from docxy.cache.store import BlobStore

log = Logger()

FILLING, COMPLETE, FAILED = "filling", "complete", "failed"
NOTIFY_EVERY = 256 * 1024


class Fill(Protocol):
    def __init__(
        self,
        store: BlobStore,
        digest: str,
        length: int | None,
        reactor,
        idle_timeout: float,
        on_end: Callable[["Fill"], None] = lambda fill: None,
    ) -> None:
        algorithm, _, self._expected_hex = digest.partition(":")
        self._hasher = hashlib.new(algorithm)
        self.store = store
        self.digest = digest
        self.length = length
        self.path, self._file = store.new_partial(digest)
        # Followers read through their own descriptor, which stays valid across the
        # rename into the store (or the unlink of a failed download).
        self.state = FILLING
        self.written = 0
        self.reason = ""
        self._listeners: list[Callable[[], None]] = []
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer = None
        self._on_end = on_end
        self._notified = 0

    # --- followers ----------------------------------------------------------------------
    def open_for_reading(self):
        return open(self.path, "rb")

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    # --- the upstream body --------------------------------------------------------------
    def connectionMade(self) -> None:
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        if self.length is not None and self.written + len(data) > self.length:
            self.reason = "upstream sent more bytes than it announced"
            self.transport.stopProducing()
            return
        try:
            os.write(self._file.fileno(), data) if len(data) else None
        except OSError as e:
            self.reason = f"cannot write to the cache: {e.strerror}"
            self.transport.stopProducing()
            return
        self._hasher.update(data)
        self.written += len(data)
        # Followers are woken per NOTIFY_EVERY bytes, not per network read: each wake-up
        # costs every follower a read and a write, and small ones cost CPU on a fast link.
        if self.written - self._notified >= NOTIFY_EVERY:
            self._notified = self.written
            self._notify()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._file.close()
        ended = reason.check(ResponseDone) is not None or (
            reason.check(PotentialDataLoss) is not None and self.length is None
        )
        if self.reason:
            pass
        elif not ended:
            self.reason = f"upstream body cut: {reason.getErrorMessage()}"
        elif self.length is not None and self.written != self.length:
            self.reason = f"upstream body short: {self.written} of {self.length} bytes"
        elif self._hasher.hexdigest() != self._expected_hex:
            self.reason = "digest mismatch: the upstream sent other bytes than the digest names"
        if self.reason:
            self.state = FAILED
            self.store.discard(self.digest, self.path)
            log.warn("not caching {digest}: {reason}", digest=self.digest, reason=self.reason)
        else:
            self.state = COMPLETE
            self.length = self.written
            self.path = self.store.commit(self.digest, self.path, self.written)
            log.info("cached {digest} ({size} bytes)", digest=self.digest, size=self.written)
        self._on_end(self)
        self._notify()
        self._listeners.clear()

    # --- idle timer ---------------------------------------------------------------------
    def _arm(self) -> None:
        if self._idle_timeout <= 0:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        else:
            self._timer = self._reactor.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self.reason = f"upstream body stalled for {self._idle_timeout}s"
        if self.transport is not None:
            self.transport.stopProducing()
