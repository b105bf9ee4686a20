"""An upstream's bandwidth cap (`max_rate` in its `[upstream."NAME"]` table): one token
bucket per registry, shared by every blob body docxy reads from it at once, so that
docxy's downloads together stay under the rate an operator allows that registry.
Pure apart from the clock; the bodies pause and resume themselves (docxy.upstream.bodies),
and the rate is read by docxy.registry.units."""
from __future__ import annotations

BURST = 0.1  # seconds of the rate a body may take at once before it waits


class RateCap:
    """A token bucket of `rate` bytes per second, holding at most BURST seconds of it."""

    def __init__(self, rate: float, clock, burst: float = BURST) -> None:
        self.rate = rate
        self._clock = clock
        self._capacity = rate * burst
        self._tokens = self._capacity
        self._then = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._then) * self.rate)
        self._then = now

    def take(self, n: int) -> float:
        """`n` bytes arrived: spend them (the bucket may go into debt); returns how many
        seconds the body must wait before it reads on (0: it need not)."""
        self._refill()
        self._tokens -= n
        return self.wait()

    def wait(self) -> float:
        """Seconds until the bucket is out of debt."""
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
