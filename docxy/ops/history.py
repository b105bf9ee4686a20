"""What the status page plots: the cumulative counters it needs (cache hits and misses,
bytes sent from the cache and from upstreams, bytes stored), sampled every minute into a
bounded ring, and the pure functions that turn those samples into per-interval series.
What the counters are and where they come from is docxy.ops.status's business."""
from __future__ import annotations

import collections
import math
from typing import Callable, Sequence

import attrs
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

log = Logger()

SAMPLE_EVERY = 60.0  # seconds between samples
KEEP = 1440  # samples kept: a day of minutes
MAX_POINTS = 240  # points of a series the page gets; older intervals are merged


@attrs.frozen
class Sample:
    """The counters at one moment (`at`: reactor.seconds()); all but `used` only grow."""

    at: float
    hits: float = 0.0
    misses: float = 0.0
    cache_bytes: float = 0.0  # body bytes sent to clients from the cache
    upstream_bytes: float = 0.0  # ... streamed from an upstream
    used: float = 0.0  # bytes stored in the cache (a gauge)


COUNTERS = ("hits", "misses", "cache_bytes", "upstream_bytes")


@attrs.frozen
class Interval:
    """What happened between two samples; `used` is the value at its end."""

    start: float
    end: float
    hits: float
    misses: float
    cache_bytes: float
    upstream_bytes: float
    used: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def hit_ratio(hits: float, misses: float) -> float | None:
    """hits / (hits + misses), or None when nothing was asked."""
    total = hits + misses
    return hits / total if total > 0 else None


def _delta(before: float, after: float) -> float:
    # A counter only goes down when its owner started again (a restored process, a
    # reset in a test): what it counted since is all that is known.
    return after - before if after >= before else after


def intervals(samples: Sequence[Sample]) -> list[Interval]:
    """One Interval per pair of consecutive samples (oldest first)."""
    return [
        Interval(a.at, b.at, *(_delta(getattr(a, n), getattr(b, n)) for n in COUNTERS), b.used)
        for a, b in zip(samples, samples[1:])
        if b.at > a.at
    ]


def merged(spans: Sequence[Interval], max_points: int = MAX_POINTS) -> list[Interval]:
    """At most `max_points` intervals: runs of consecutive ones summed, counted from the
    newest so that the latest minutes keep their own points."""
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    size = max(1, math.ceil(len(spans) / max_points))
    if size == 1:
        return list(spans)
    out: list[Interval] = []
    end = len(spans)
    while end > 0:
        run = spans[max(0, end - size):end]
        out.append(Interval(run[0].start, run[-1].end,
                            *(sum(getattr(s, n) for s in run) for n in COUNTERS), run[-1].used))
        end -= size
    out.reverse()
    return out


def series(samples: Sequence[Sample], max_points: int = MAX_POINTS) -> dict[str, list]:
    """Columns for the page's plots, one entry per interval: its end (`t`), its length
    (`seconds`), the counters' increase, the hit ratio within it (None: no request) and
    the bytes stored at its end."""
    spans = merged(intervals(samples), max_points)
    columns: dict[str, list] = {"t": [], "seconds": [], "hit_ratio": [], "used": []}
    for name in COUNTERS:
        columns[name] = []
    for span in spans:
        columns["t"].append(round(span.end, 1))
        columns["seconds"].append(round(span.seconds, 1))
        ratio = hit_ratio(span.hits, span.misses)
        columns["hit_ratio"].append(None if ratio is None else round(ratio, 4))
        columns["used"].append(span.used)
        for name in COUNTERS:
            columns[name].append(getattr(span, name))
    return columns


class History(service.Service):
    """Samples `read()` (the counters by name, as Sample's fields) every `every` seconds
    while running, the first at start; keeps the last `keep`."""

    def __init__(self, read: Callable[[], dict[str, float]], clock, every: float = SAMPLE_EVERY,
                 keep: int = KEEP) -> None:
        if every <= 0 or keep < 1:
            raise ValueError("every must be positive and keep at least 1")
        self._read = read
        self._clock = clock
        self._samples: collections.deque[Sample] = collections.deque(maxlen=keep)
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = clock
        self.every = every

    def sample(self) -> Sample | None:
        """Take one sample now (None if the counters could not be read)."""
        try:
            taken = Sample(self._clock.seconds(), **self._read())
        except Exception:
            log.failure("status history: cannot read the counters")
            return None
        self._samples.append(taken)
        return taken

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        return list(self._samples)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.every, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
