"""Where a node gets a blob its disk lacks (docxy.cache.sources): the bucket first, then
the node leading the download, then the upstream under a lease of its own; Redis away
means leading alone; a dead leader's lease is waited out and taken over."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from docxy.cache.sources import BlobSources, Source, range_start
from docxy.cluster.link import ClusterUnavailable
from docxy.cluster.peers import PeerUnreachable

DIGEST = "sha256:" + "ab" * 32


class _Response:
    def __init__(self, code: int = 200, length: int = 10, who: str = "") -> None:
        self.code, self.length, self.who = code, length, who
        self.headers = None

    def deliverBody(self, protocol) -> None:  # discard() of a refused answer
        pass


class _Bucket:
    def __init__(self, has: bool) -> None:
        self.has = has
        self.opened: list[int] = []

    async def blob_size(self, digest):
        return 10 if self.has else None

    async def open_blob(self, digest, start=0):
        self.opened.append(start)
        return _Response(206 if start else 200, who="bucket")


class _Lease:
    lost = False


class _Leases:
    def __init__(self, answers) -> None:
        self.answers = list(answers)  # each: "ours", a node URL, or an exception

    async def take(self, digest):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return _Lease() if answer == "ours" else answer


class _Peers:
    def __init__(self, alive: set[str]) -> None:
        self.alive = alive
        self.asked: list[tuple[str, int]] = []

    async def get(self, node, digest, start=0):
        self.asked.append((node, start))
        if node not in self.alive:
            raise PeerUnreachable(node)
        return _Response(206 if start else 200, who=node)


def _upstream(calls: list):
    async def open_upstream(start: int):
        calls.append(start)
        return _Response(200, who="upstream")
    return open_upstream


def _run(clock: Clock, coroutine):
    d = defer.ensureDeferred(coroutine)
    for _ in range(400):
        if d.called:
            break
        clock.advance(0.25)
    return d


@pytest_twisted.ensureDeferred
async def test_the_bucket_answers_before_any_lease_or_upstream():
    """A blob in the bucket is read from it: no lease is taken, the upstream is not asked."""
    clock, calls = Clock(), []
    bucket, leases = _Bucket(has=True), _Leases(["ours"])
    sources = BlobSources(clock, bucket, leases, _Peers(set()), "http://me")
    opened = await _run(clock, sources.open(DIGEST, 0, _upstream(calls)))
    assert opened.source is Source.BUCKET and opened.lease is None
    assert calls == [] and bucket.opened == [0]


@pytest_twisted.ensureDeferred
async def test_a_peer_holding_the_lease_is_streamed_from():
    """Another node holds the lease: its download is streamed, from the byte asked."""
    clock, calls = Clock(), []
    peers = _Peers({"http://leader"})
    sources = BlobSources(clock, _Bucket(False), _Leases(["http://leader"]), peers, "http://me")
    opened = await _run(clock, sources.open(DIGEST, 123, _upstream(calls)))
    assert opened.source is Source.PEER and opened.response.who == "http://leader"
    assert peers.asked == [("http://leader", 123)] and calls == []


@pytest_twisted.ensureDeferred
async def test_our_lease_means_one_upstream_download():
    """No one holds the lease: this node takes it and downloads upstream."""
    clock, calls = Clock(), []
    sources = BlobSources(clock, _Bucket(False), _Leases(["ours"]), _Peers(set()), "http://me")
    opened = await _run(clock, sources.open(DIGEST, 0, _upstream(calls)))
    assert opened.source is Source.UPSTREAM and opened.lease is not None and calls == [0]
    assert sources.takeovers == 0


@pytest_twisted.ensureDeferred
async def test_redis_away_means_leading_alone():
    """Redis does not answer: the node downloads for itself, counted as degraded."""
    clock, calls = Clock(), []
    sources = BlobSources(clock, None, _Leases([ClusterUnavailable("down")]), _Peers(set()), "http://me")
    opened = await _run(clock, sources.open(DIGEST, 0, _upstream(calls)))
    assert opened.source is Source.UPSTREAM and opened.lease is None
    assert calls == [0] and sources.degraded == 1


@pytest_twisted.ensureDeferred
async def test_a_dead_leaders_lease_is_waited_out_then_taken_over():
    """The leader stopped answering: the follower waits until its lease passes, takes it
    and resumes upstream from its own byte; that is a takeover."""
    clock, calls = Clock(), []
    peers = _Peers(set())
    leases = _Leases(["http://dead"] * 8 + ["ours"])
    sources = BlobSources(clock, _Bucket(False), leases, peers, "http://me")
    opened = await _run(clock, sources.open(DIGEST, 500, _upstream(calls), after_leader=True))
    assert opened.source is Source.UPSTREAM and opened.lease is not None
    assert calls == [500] and len(peers.asked) == 8 and sources.takeovers == 1


@pytest_twisted.ensureDeferred
async def test_no_leader_in_time_means_downloading_anyway():
    """A lease that never passes (a leader wedged) does not hang the client: after the
    give-up time the node downloads by itself."""
    clock, calls = Clock(), []
    sources = BlobSources(clock, None, _Leases(["http://wedged"]), _Peers(set()), "http://me",
                          give_up=5.0)
    opened = await _run(clock, sources.open(DIGEST, 0, _upstream(calls)))
    assert opened.source is Source.UPSTREAM and opened.lease is None and calls == [0]


def test_range_start_reads_the_first_byte():
    """A resume's Range names its first byte in either form."""
    assert range_start(b"bytes=100-") == 100
    assert range_start(b"bytes=100-199") == 100
    assert range_start(b"bytes=-5") == 0


@pytest_twisted.ensureDeferred
async def test_a_follower_resumes_from_the_new_leader_even_with_resuming_off():
    """With --resume-attempts 0 a follower whose leader's body was cut still asks once
    more, from the byte it reached, and the answer comes from the node leading now."""
    clock = Clock()
    peers = _Peers({"http://new-leader"})
    sources = BlobSources(clock, None, _Leases(["http://new-leader"]), peers, "http://me")
    taken = []
    resumer = sources.resumer(DIGEST, None, 0, leading=lambda: False, took_lease=taken.append)
    assert resumer.attempts == 1
    resumer.on_resume(4096, 1, "cut")  # told of the resume, as the body does
    response = await _run(clock, resumer.again(b"bytes=4096-", b'"etag"'))
    assert response.who == "http://new-leader" and peers.asked == [("http://new-leader", 4096)]
    assert taken == []
