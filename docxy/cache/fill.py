"""One upstream download of a blob into the store: a `docxy.stream.download.Download`
whose bytes also go to a partial file of the store, written and hashed off the reactor.

It runs at the upstream's pace, never held back by a slow client (they read the file when
they fall behind).  When the body ends, the blob enters the store only if its length is
whole and its digest matches; otherwise the partial file is deleted and every follower is
aborted.  A verified blob that cannot be stored (its directory removed, the disk full)
still reaches the followers, who read it through their own descriptors, and is not cached.
"""
from __future__ import annotations

import hashlib
import os
from typing import IO, Callable

from twisted.logger import Logger

from docxy.cache.interfaces import IBlobStore
from docxy.stream.download import Download, State
from docxy.stream.sink import FileSink

log = Logger()


class Fill(Download):
    def __init__(self, store: IBlobStore, digest: str, length: int | None, reactor,
                 on_end: Callable[["Fill"], None] = lambda fill: None,
                 threaded: bool = False) -> None:
        algorithm, _, expected_hex = digest.partition(":")
        self.store = store
        self.digest = digest
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
        self.write_error: OSError | None = None  # why the partial file could not be written
        self.committed = False  # entered into the store
        self.source = None  # docxy.cache.sources.Source: where the bytes come from (set by the cache)
        sink = FileSink(self._file.fileno(), hashlib.new(algorithm), self.stored,
                        self._write_failed, reactor, threaded=threaded)
        super().__init__(length, reactor=reactor, sink=sink, expected_hex=expected_hex, on_end=on_end)

    def open_for_reading(self) -> IO[bytes]:
        return os.fdopen(os.dup(self._reader.fileno()), "rb")

    def _write_failed(self, error: OSError) -> None:
        self.write_error = error
        self.sink_failed(error)

    def _finished(self) -> None:
        self._file.close()
        self._reader.close()  # followers hold their own duplicates
        if self.state is State.FAILED:
            self.store.discard(self.digest, self.path)
            log.warn("not caching {digest}: {reason}", digest=self.digest, reason=self.reason)
            return
        try:
            self.path = self.store.commit(self.digest, self.path, self.received)
        except OSError as e:
            # Followers read through their own descriptors: they still get it whole.
            self.write_error = e
            log.warn("verified {digest} but could not store it: {err}",
                     digest=self.digest, err=e.strerror or str(e))
        else:
            self.committed = True
            log.info("cached {digest} ({size} bytes)", digest=self.digest, size=self.received)
