"""Where a download's bytes go besides its clients: a file, written and hashed in order.

`FileSink` does it in a thread of its own (SHA-256 and file writes release the GIL, so they
use the second core while the reactor moves bytes), in batches: one `writev` and one
progress report per batch, so neither side wakes the other per network read.  With
`threaded=False` it works in the caller's thread (tests, tiny bodies)."""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable

BATCH_BYTES = 4 * 1024 * 1024  # at most this much is written with one writev
BATCH_CHUNKS = 512  # and at most this many buffers (IOV_MAX is 1024 on Linux)
REPORT_EVERY = 1024 * 1024  # the thread reports progress per this many bytes, and at the end


def _write_all(fd: int, chunks: list) -> None:
    pending = list(chunks)
    while pending:
        n = os.writev(fd, pending)
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = memoryview(pending[0])[n:]


class FileSink:
    """Writes chunks to `fd` and hashes them with `hasher`, in order.  `stored(n)` is called
    in the reactor thread as bytes are on disk and hashed; `failed(error)` once if a write
    fails (nothing more is written then)."""

    def __init__(self, fd: int, hasher, stored: Callable[[int], None],
                 failed: Callable[[OSError], None], reactor, threaded: bool = True) -> None:
        self.hasher = hasher
        self._fd, self._stored, self._failed = fd, stored, failed
        self._reactor = reactor
        self._broken = False
        self._queue: queue.SimpleQueue | None = None
        if threaded:
            self._queue = queue.SimpleQueue()
            threading.Thread(target=self._run, name="docxy-fill", daemon=True).start()

    def put(self, data: bytes) -> None:
        if self._queue is not None:
            self._queue.put(data)
        elif not self._broken:
            if self._write([data]):
                self._stored(len(data))

    def close(self) -> None:
        """No more chunks: the thread reports what is left and ends."""
        if self._queue is not None:
            self._queue.put(None)

    def _write(self, chunks: list) -> bool:
        try:
            _write_all(self._fd, chunks)
        except OSError as e:
            self._broken = True
            if self._queue is None:
                self._failed(e)
            else:
                self._reactor.callFromThread(self._failed, e)
            return False
        for chunk in chunks:
            self.hasher.update(chunk)
        return True

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        done = 0  # on disk but not yet reported
        ended = False
        while not ended:
            chunks = [get()]
            size = 0
            if chunks[0] is None:
                chunks, ended = [], True
            else:
                size = len(chunks[0])
                while size < BATCH_BYTES and len(chunks) < BATCH_CHUNKS:
                    try:
                        item = get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        ended = True
                        break
                    chunks.append(item)
                    size += len(item)
            if chunks and not self._broken and self._write(chunks):
                done += size
            if done and (done >= REPORT_EVERY or ended):
                self._reactor.callFromThread(self._stored, done)
                done = 0
