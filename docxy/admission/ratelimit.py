"""Per-client token buckets, so that one host (or user) cannot spend the upstream
account's pull budget: a bucket holds `capacity` requests and refills at capacity per
`period`.  Pure apart from the clock."""
from __future__ import annotations

import math
import re
from collections import OrderedDict

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_CLIENTS = 100_000


def parse_rate(text: str) -> tuple[int, float]:
    """`100/h`, `10/m`, `5/s`, `1000/d` into (capacity, period in seconds)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*", text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"a rate is like 100/h, 10/m or 5/s, not {text!r}")
    count = int(match.group(2) or 1)
    return int(match.group(1)), float(count * _UNITS[match.group(3)])


class RateLimiter:
    def __init__(self, capacity: int, period: float, clock, max_clients: int = MAX_CLIENTS) -> None:
        self.capacity = capacity
        self._rate = capacity / period  # tokens per second
        self._clock = clock
        self._max = max_clients
        # client -> (tokens left, when counted); least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """Spend one request of `client`'s bucket: 0 if it may go ahead, else how many
        seconds until it may (nothing is spent then)."""
        now = self._clock.seconds()
        tokens, then = self._buckets.pop(client, (float(self.capacity), now))
        tokens = min(float(self.capacity), tokens + (now - then) * self._rate)
        if tokens >= 1:
            tokens -= 1
            wait = 0.0
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)  # the longest unseen: its bucket is full again
        return wait


def retry_after(wait: float) -> int:
    """The Retry-After value (whole seconds, at least 1) for a wait."""
    return max(1, math.ceil(wait))
