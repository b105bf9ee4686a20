"""The status page's history: samples of cumulative counters turned into per-interval
series (deltas, hit ratio, merged runs), and the sampler on a Clock."""
import pytest
from twisted.internet.task import Clock

from docxy.ops.history import (
    History,
    Interval,
    Sample,
    hit_ratio,
    intervals,
    merged,
    series,
)


def test_hit_ratio_is_none_without_requests():
    """hits / (hits + misses), and None (not 0) when nothing was asked."""
    assert hit_ratio(3, 1) == 0.75
    assert hit_ratio(0, 4) == 0.0
    assert hit_ratio(0, 0) is None


def test_intervals_are_the_increase_between_consecutive_samples():
    """Each interval holds the counters' increase and the stored bytes at its end."""
    samples = [Sample(0, 0, 0, 0, 0, 10), Sample(60, 5, 1, 500, 100, 20),
               Sample(120, 5, 3, 700, 400, 25)]
    assert intervals(samples) == [
        Interval(0, 60, 5, 1, 500, 100, 20),
        Interval(60, 120, 0, 2, 200, 300, 25),
    ]


def test_a_counter_that_went_down_counts_from_zero_and_empty_spans_are_dropped():
    """A reset counter's new value is its increase (never a negative rate); two samples
    at the same moment make no interval."""
    samples = [Sample(0, 10, 10, 1000, 1000, 5), Sample(0, 11, 10, 1000, 1000, 5),
               Sample(60, 2, 1, 30, 40, 5)]
    assert intervals(samples) == [Interval(0, 60, 2, 1, 30, 40, 5)]


def test_intervals_of_fewer_than_two_samples_are_none():
    assert intervals([]) == [] and intervals([Sample(5)]) == []


def test_merged_keeps_at_most_max_points_and_every_count():
    """1440 one-minute intervals become at most 240 points of summed runs, the newest run
    ending at the newest sample; no hit, miss or byte is lost."""
    samples = [Sample(60.0 * i, i, 2 * i, 10 * i, 20 * i, i) for i in range(1441)]
    spans = intervals(samples)
    out = merged(spans, 240)
    assert len(out) == 240
    assert out[-1].end == 1440 * 60 and out[0].start == 0
    assert all(a.end == b.start for a, b in zip(out, out[1:]))
    for name in ("hits", "misses", "cache_bytes", "upstream_bytes"):
        assert sum(getattr(s, name) for s in out) == sum(getattr(s, name) for s in spans)
    assert out[-1].used == 1440


def test_merged_counts_runs_from_the_newest():
    """An uneven split leaves the short run at the oldest end."""
    spans = intervals([Sample(float(i), hits=i) for i in range(6)])  # 5 intervals
    out = merged(spans, 2)
    assert [(s.start, s.end, s.hits) for s in out] == [(0, 2, 2), (2, 5, 3)]
    assert merged(spans, 5) == spans
    with pytest.raises(ValueError):
        merged(spans, 0)


def test_series_gives_columns_for_the_plots():
    """One entry per interval: its end, its length, the increase, the ratio within it."""
    samples = [Sample(0), Sample(60, 3, 1, 100, 50, 7), Sample(90, 3, 1, 100, 50, 7)]
    assert series(samples) == {
        "t": [60, 90], "seconds": [60, 30], "hit_ratio": [0.75, None], "used": [7, 7],
        "hits": [3, 0], "misses": [1, 0], "cache_bytes": [100, 0], "upstream_bytes": [50, 0],
    }


def test_the_sampler_takes_one_sample_at_start_then_every_period_and_keeps_the_last():
    """A sample at start and each `every` seconds, the oldest dropped past `keep`; none
    after the stop."""
    clock, counts = Clock(), {"n": 0}

    def read():
        counts["n"] += 1
        return {"hits": counts["n"], "used": 100}

    history = History(read, clock, every=60, keep=3)
    history.startService()
    assert [s.at for s in history.samples()] == [0]
    for _ in range(4):
        clock.advance(60)
    assert [(s.at, s.hits) for s in history.samples()] == [(120, 3), (180, 4), (240, 5)]
    history.stopService()
    clock.advance(600)
    assert len(history.samples()) == 3 and counts["n"] == 5


def test_a_failing_read_is_skipped_not_fatal():
    """A read that raises leaves no sample and the loop running."""
    clock, answers = Clock(), [RuntimeError("boom"), {"hits": 1}]

    def read():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    history = History(read, clock, every=10)
    history.startService()
    assert history.samples() == []
    clock.advance(10)
    assert [s.hits for s in history.samples()] == [1]
    history.stopService()


def test_the_sampler_refuses_nonsense_periods():
    with pytest.raises(ValueError):
        History(dict, Clock(), every=0)
    with pytest.raises(ValueError):
        History(dict, Clock(), keep=0)
