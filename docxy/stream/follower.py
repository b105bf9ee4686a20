"""Sends one client its bytes of a `Download`, or of a stored file, at the client's pace.

A push producer: it writes while the client's socket has room (the channel pauses it when
the buffer fills) and while bytes are available, and waits for the download's progress
otherwise.  (A pull producer would be polled in a loop by twisted.web while waiting for a
download.)  Bytes come from the download's window while the client keeps up, else from the
file through the client's own descriptor, which stays valid across the rename into the
store or the unlink of a failed download.  While the download runs its final byte is held
back until it is COMPLETE: a client never receives a whole body that turns out wrong, it
sees its connection aborted instead.
"""
from __future__ import annotations

import os
from typing import IO, Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from docxy.stream.clients import abort_client, request_gone
from docxy.stream.download import Download, State

CHUNK = 256 * 1024  # one read from the file (a lagging client holds at most this much more)


@implementer(IPushProducer)
class Follower:
    def __init__(self, request, start: int, end: int | None, download: Download | None = None,
                 file: IO[bytes] | None = None,
                 on_close: Callable[["Follower"], None] = lambda follower: None) -> None:
        """Send bytes [start, end) (end None: until the download ends) of `download`, or of
        `file` alone when nothing is downloading it.  `file` is needed for a download with
        a file, whose window may have moved past this client."""
        self._request = request
        self.position = start
        self._end = end
        self._download = download
        self._file = file
        self._on_close = on_close
        self._paused = False
        self._pumping = False
        self._closed = False
        self.sent = 0

    def start(self) -> None:
        # for the request log: bytes still arriving from upstream, or stored ones
        self._request.docxy_source = "upstream" if self._download is not None else "cache"
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(lambda _: self._close())
        if self._download is not None:
            self._download.follow(self)
        self.wake()

    def wake(self) -> None:
        if self._pumping:
            return  # a write below paused or resumed us re-entrantly; the loop goes on
        self._pumping = True
        try:
            self._pump()
        finally:
            self._pumping = False

    def _last(self) -> float:
        """Where this client's body ends, as far as is known now."""
        if self._end is not None:
            return self._end
        d = self._download
        return d.received if d is not None and d.state is State.COMPLETE else float("inf")

    def _available(self) -> float:
        d = self._download
        if d is None or d.state is State.COMPLETE:
            return self._last()
        # Hold back the final byte until the download is whole (and verified).
        final = d.length if d.length is not None else d.received + 1
        return min(self._last(), d.received, final - 1)

    def _pump(self) -> None:
        d = self._download
        while not self._closed and not self._paused:
            if request_gone(self._request):
                self._close()
                return
            if d is not None and d.state is State.FAILED:
                self._close()
                abort_client(self._request)
                return
            available = self._available()
            if self.position < available:
                data = self._next(int(min(available, self.position + CHUNK)))
                if data is None:
                    return  # the file has not caught up with this client yet
                if not data:  # the file is shorter than it should be
                    self._close()
                    abort_client(self._request)
                    return
                self.position += len(data)
                self.sent += len(data)
                self._request.write(data)
                if d is not None:
                    d.advanced()
            elif self.position >= self._last() and (d is None or d.state is State.COMPLETE):
                request = self._request
                self._close()
                request.unregisterProducer()
                request.finish()
                return
            else:
                return  # wait for the download's next bytes

    def _next(self, limit: int) -> bytes | None:
        d = self._download
        if d is not None:
            data = d.in_memory(self.position, limit)
            if data is not None:
                return data
            if d.state is not State.COMPLETE:
                limit = min(limit, d.durable)
                if limit <= self.position:
                    return None
        if self._file is None:
            return b""
        return os.pread(self._file.fileno(), limit - self.position, self.position)

    # --- IPushProducer: the client's socket --------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.wake()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._download is not None:
            self._download.unfollow(self)
        self._on_close(self)
