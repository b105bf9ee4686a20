"""An idle timer for a body that must keep flowing: re-armed by every chunk, disarmed while
docxy itself holds the body back, fired when the other side has gone silent."""
from __future__ import annotations

from typing import Callable


class IdleTimer:
    def __init__(self, reactor, seconds: float, on_idle: Callable[[], None]) -> None:
        self._reactor = reactor
        self.seconds = seconds
        self._on_idle = on_idle
        self._call = None

    def arm(self) -> None:
        """Start the countdown again (0 or less: never fire)."""
        if self.seconds <= 0:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)
        else:
            self._call = self._reactor.callLater(self.seconds, self._fire)

    def disarm(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._on_idle()
