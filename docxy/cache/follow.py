"""Sends a stored blob, or one that a `Fill` is still writing, to one client.

Each client reads at its own pace straight from the file, so memory does not grow with
slow clients.  While the download runs, the last byte is
held back until the digest is verified: a client never receives a whole body that turns
out to be wrong, it sees its connection aborted instead.
"""
from __future__ import annotations

import os
from typing import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from docxy.cache.fill import COMPLETE, FAILED, Fill
from docxy.web.relay import abort_client, request_gone

CHUNK = 256 * 1024


@implementer(IPushProducer)
class FileFollower:
    """A push producer: it writes while the client's socket has room (the channel pauses
    it when the buffer fills) and while bytes are available, and waits for the fill's
    progress otherwise.  (A pull producer would be polled in a loop by twisted.web while
    waiting for a download.)"""

    def __init__(
        self,
        request,
        file,
        start: int,
        end: int,
        fill: Fill | None = None,
        on_close: Callable[[], None] = lambda: None,
    ) -> None:
        """Send bytes [start, end) of `file`; `fill` is the download still writing it."""
        self._request = request
        self._file = file
        self._pos = start
        self._end = end
        self._fill = fill
        self._on_close = on_close
        self._paused = False
        self._pumping = False
        self._closed = False
        self.sent = 0

    def start(self) -> None:
        # for the request log: bytes still arriving from upstream, or stored ones
        self._request.docxy_source = "upstream" if self._fill is not None else "cache"
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(lambda _: self._close())
        if self._fill is not None:
            self._fill.listen(self._pump)
        self._pump()

    def _available(self) -> int:
        fill = self._fill
        if fill is None or fill.state == COMPLETE:
            return self._end
        # Hold back the final byte until the whole blob is verified.
        return min(self._end, fill.written, (fill.length or fill.written + 1) - 1)

    def _pump(self) -> None:
        if self._pumping:
            return  # a write below paused or resumed us re-entrantly; the loop goes on
        self._pumping = True
        try:
            self._pump_loop()
        finally:
            self._pumping = False

    def _pump_loop(self) -> None:
        while not self._closed and not self._paused:
            if request_gone(self._request):
                self._close()
                return
            if self._fill is not None and self._fill.state == FAILED:
                self._close()
                abort_client(self._request)
                return
            available = self._available()
            if self._pos < available:
                data = os.pread(self._file.fileno(), min(CHUNK, available - self._pos), self._pos)
                if not data:  # the file is shorter than it should be
                    self._close()
                    abort_client(self._request)
                    return
                self._pos += len(data)
                self.sent += len(data)
                self._request.write(data)
            elif self._pos >= self._end and (self._fill is None or self._fill.state == COMPLETE):
                request = self._request
                self._close()
                request.unregisterProducer()
                request.finish()
                return
            else:
                return  # wait for the fill's next chunk

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fill is not None:
            self._fill.unlisten(self._pump)
        self._file.close()
        self._on_close()
