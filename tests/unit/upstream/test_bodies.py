"""docxy.upstream.bodies: the one rule for a whole body, the small-body reader, and a
streamed body resumed after cuts and stalls, driven byte by byte with a Clock."""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from docxy.upstream.bodies import (
    BodyTooLarge,
    Resumer,
    cut_reason,
    default_backoff,
    deliver,
    read_small,
)
from docxy.upstream.errors import UpstreamError

from ..fakes import FakeResponse

BLOB = bytes(range(256)) * 40  # 10240 bytes


def _lost(kind: str) -> Failure:
    return {
        "done": Failure(ResponseDone()),
        "potential": Failure(PotentialDataLoss()),
        "failed": Failure(ResponseFailed([Failure(Exception("reset"))])),
    }[kind]


@pytest.mark.parametrize("kind, expected, received, whole", [
    ("done", 10, 10, True),
    ("done", None, 7, True),        # chunked, its end seen
    ("done", 10, 9, False),         # fewer bytes than announced
    ("potential", None, 7, False),  # closed without a length: maybe cut (as readBody)
    ("failed", 10, 5, False),
    ("failed", None, 5, False),
])
def test_cut_reason_is_none_only_for_a_whole_body(kind, expected, received, whole):
    """A body is whole only when the client saw its end and every announced byte came."""
    assert (cut_reason(_lost(kind), expected, received) is None) is whole


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


def _failure_of(d: defer.Deferred) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the reader did not fail"
    return failures[0]


def test_read_small_fails_on_a_manifest_cut_mid_body():
    """Half of a promised manifest, then the connection closes: an error, not half a
    document."""
    response = FakeResponse(200, body=b"", length=100, auto=False)
    d = read_small(response, 1000, Clock(), 60)
    response.protocol.dataReceived(b"{" * 50)
    response.cut()
    assert _failure_of(d).check(UpstreamError)


def test_read_small_fails_on_a_body_closed_without_a_length():
    """No Content-Length and the connection closed: it may have been cut (PotentialDataLoss)."""
    response = FakeResponse(200, body=b"", length=None, auto=False)
    response.length = None
    d = read_small(response, 1000)
    response.protocol.dataReceived(b'{"token": "abc"}')
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert _failure_of(d).check(UpstreamError)


def test_read_small_gives_a_whole_body_and_refuses_a_large_one():
    whole = FakeResponse(200, body=b'{"ok": 1}')
    got: list[bytes] = []
    read_small(whole, 1000).addCallback(got.append)
    assert got == [b'{"ok": 1}']
    large = FakeResponse(200, body=b"x" * 2000)
    assert _failure_of(read_small(large, 1000)).check(BodyTooLarge)
    assert large.transport.stopped


def test_read_small_times_out_a_stall():
    clock = Clock()
    response = FakeResponse(200, body=b"", length=100, auto=False)
    d = read_small(response, 1000, clock, 5)
    response.protocol.dataReceived(b"x")
    clock.advance(6)
    failure = _failure_of(d)
    assert failure.check(UpstreamError) and failure.value.status == 504
    assert response.transport.stopped


class Upstream:
    """Answers resume requests with the responses a test queues; records the ranges."""

    def __init__(self) -> None:
        self.asked: list[tuple[bytes, bytes | None]] = []
        self.answers: list = []
        self.served: list[FakeResponse] = []

    async def again(self, range_value: bytes, if_range: bytes | None):
        self.asked.append((range_value, if_range))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.served.append(answer)
        return answer


def _partial(start: int, end: int, data: bytes = BLOB, total: int | None = None) -> FakeResponse:
    total = len(data) if total is None else total
    return FakeResponse(206, {b"content-range": f"bytes {start}-{end - 1}/{total}".encode()},
                        body=data[start:end], length=end - start, auto=False)


def _streamed(attempts: int = 5, etag: bytes | None = b'"v1"'):
    clock = Clock()
    upstream = Upstream()
    resumes: list[tuple[int, int]] = []
    first = FakeResponse(200, {b"etag": etag} if etag else {}, body=BLOB, length=len(BLOB),
                         auto=False)
    sink = Collect()
    resumer = Resumer(upstream.again, attempts, lambda pos, n, why: resumes.append((pos, n)))
    deliver(first, sink, clock, 30, resumer)
    return clock, upstream, first, sink, resumes


def _feed(response: FakeResponse, data: bytes, end: bool = True) -> None:
    response.protocol.dataReceived(data)
    if end:
        response.end()


def test_a_cut_body_is_resumed_from_the_byte_reached():
    """Cut after 4000 bytes: docxy asks for bytes=4000- (If-Range with the ETag) and the
    protocol sees one whole body."""
    clock, upstream, first, sink, resumes = _streamed()
    first.protocol.dataReceived(BLOB[:4000])
    upstream.answers.append(_partial(4000, len(BLOB)))
    first.cut()
    clock.advance(0)
    assert upstream.asked == [(b"bytes=4000-10239", b'"v1"')]
    assert resumes == [(4000, 1)]
    _feed(upstream.served[0], BLOB[4000:])
    assert sink.data == BLOB and sink.reason.check(ResponseDone)


def test_an_upstream_that_ignores_range_is_skipped_to_the_byte_reached():
    """A 200 to the resume: the bytes already delivered are dropped, the rest delivered."""
    clock, upstream, first, sink, _ = _streamed()
    first.protocol.dataReceived(BLOB[:3000])
    upstream.answers.append(FakeResponse(200, body=BLOB, length=len(BLOB), auto=False))
    first.cut()
    clock.advance(0)
    again = upstream.served[0]
    again.protocol.dataReceived(BLOB[:5000])
    again.protocol.dataReceived(BLOB[5000:])
    again.end()
    assert sink.data == BLOB and sink.reason.check(ResponseDone)


def test_every_cut_is_resumed_while_bytes_keep_coming():
    """A link cut every 2000 bytes: more cuts than attempts, but each resume gained bytes."""
    clock, upstream, first, sink, resumes = _streamed(attempts=2)
    first.protocol.dataReceived(BLOB[:2000])
    position = 2000
    current = first
    while position < len(BLOB):
        upstream.answers.append(_partial(position, len(BLOB)))
        current.cut()
        clock.advance(10)
        current = upstream.served[-1]
        step = min(2000, len(BLOB) - position)
        current.protocol.dataReceived(BLOB[position:position + step])
        position += step
    current.end()
    assert sink.data == BLOB and sink.reason.check(ResponseDone)
    assert len(resumes) == 5 and all(n == 1 for _, n in resumes)


def test_attempts_without_progress_end_in_failure_with_backoff():
    """The upstream keeps failing: `attempts` resumes, each after its backoff, then the
    protocol is told the body was cut."""
    clock, upstream, first, sink, resumes = _streamed(attempts=3)
    first.protocol.dataReceived(BLOB[:100])
    upstream.answers += [UpstreamError(502, "UNAVAILABLE", "unreachable"),
                         FakeResponse(503, body=b"busy"),
                         UpstreamError(502, "UNAVAILABLE", "unreachable")]
    first.cut()
    clock.advance(0)
    assert len(upstream.asked) == 1
    clock.advance(default_backoff(2) - 0.01)
    assert len(upstream.asked) == 1, "the second attempt came before its backoff"
    clock.advance(0.02)
    assert len(upstream.asked) == 2
    clock.advance(default_backoff(3))
    assert len(upstream.asked) == 3
    assert [n for _, n in resumes] == [1, 2, 3]
    assert sink.reason is not None and cut_reason(sink.reason, len(BLOB), len(sink.data))
    assert sink.data == BLOB[:100]


def test_a_refused_resume_fails_at_once():
    """A 404 (or any refusal that is no outage) ends the body: no more attempts."""
    clock, upstream, first, sink, _ = _streamed()
    first.protocol.dataReceived(BLOB[:100])
    upstream.answers.append(FakeResponse(404, body=b"gone"))
    first.cut()
    clock.advance(0)
    assert len(upstream.asked) == 1 and sink.reason is not None
    assert not sink.reason.check(ResponseDone)


def test_a_range_that_starts_late_is_refused():
    """A 206 starting after the byte reached would leave a hole: the body fails."""
    clock, upstream, first, sink, _ = _streamed()
    first.protocol.dataReceived(BLOB[:100])
    upstream.answers.append(_partial(200, len(BLOB)))
    first.cut()
    clock.advance(0)
    assert sink.reason is not None and not sink.reason.check(ResponseDone)
    assert sink.data == BLOB[:100]


def test_a_stall_is_resumed():
    """No byte for the idle timeout: the leg is stopped and the rest asked for."""
    clock, upstream, first, sink, resumes = _streamed()
    first.protocol.dataReceived(BLOB[:500])
    upstream.answers.append(_partial(500, len(BLOB)))
    clock.advance(31)
    assert first.transport.stopped
    clock.advance(0)
    assert upstream.asked[0][0] == b"bytes=500-10239"
    _feed(upstream.served[0], BLOB[500:])
    assert sink.data == BLOB and sink.reason.check(ResponseDone)


def test_a_paused_body_is_not_a_stall_and_a_new_leg_starts_paused():
    clock, upstream, first, sink, _ = _streamed()
    first.protocol.dataReceived(BLOB[:500])
    sink.transport.pauseProducing()
    clock.advance(300)
    assert not first.transport.stopped and first.transport.paused
    upstream.answers.append(_partial(500, len(BLOB)))
    first.cut()
    clock.advance(0)
    assert upstream.served[0].transport.paused
    sink.transport.resumeProducing()
    assert not upstream.served[0].transport.paused


def test_stopping_while_a_resume_waits_asks_nothing_more():
    """The protocol stops the body (its client left) during the backoff: no request."""
    clock, upstream, first, sink, _ = _streamed()
    first.protocol.dataReceived(BLOB[:100])
    upstream.answers.append(UpstreamError(502, "UNAVAILABLE", "unreachable"))
    first.cut()
    clock.advance(0)
    sink.transport.stopProducing()
    clock.advance(60)
    assert len(upstream.asked) == 1
    assert sink.reason is not None and not sink.reason.check(ResponseDone)


def test_without_a_resumer_a_cut_ends_the_body():
    clock = Clock()
    first = FakeResponse(200, body=BLOB, length=len(BLOB), auto=False)
    sink = Collect()
    deliver(first, sink, clock, 30)
    first.protocol.dataReceived(BLOB[:10])
    first.cut()
    assert sink.reason is not None and not sink.reason.check(ResponseDone)


def test_a_client_range_is_resumed_within_its_own_span():
    """A relayed 206 for bytes 1000-4999 cut after 1500 bytes asks for 2500-4999."""
    clock = Clock()
    upstream = Upstream()
    first = _partial(1000, 5000)
    sink = Collect()
    deliver(first, sink, clock, 30, Resumer(upstream.again, 3))
    first.protocol.dataReceived(BLOB[1000:2500])
    upstream.answers.append(_partial(2500, 5000))
    first.cut()
    clock.advance(0)
    assert upstream.asked[0][0] == b"bytes=2500-4999"
    _feed(upstream.served[0], BLOB[2500:5000])
    assert sink.data == BLOB[1000:5000] and sink.reason.check(ResponseDone)


def test_a_body_without_length_that_had_ended_is_confirmed_by_416():
    """Closed without a length: a Range past the end answered 416 */N says it was whole."""
    clock = Clock()
    upstream = Upstream()
    first = FakeResponse(200, body=b"", auto=False)
    first.length = None
    sink = Collect()
    deliver(first, sink, clock, 30, Resumer(upstream.again, 3))
    first.protocol.dataReceived(BLOB[:700])
    upstream.answers.append(FakeResponse(416, {b"content-range": b"bytes */700"}))
    first.protocol.connectionLost(Failure(PotentialDataLoss()))
    clock.advance(0)
    assert upstream.asked[0][0] == b"bytes=700-"
    assert sink.data == BLOB[:700] and sink.reason.check(ResponseDone)


def test_backoff_starts_at_once_and_is_bounded():
    assert default_backoff(1) == 0
    assert [default_backoff(n) for n in (2, 3, 4)] == [0.5, 1.0, 2.0]
    assert default_backoff(50) == 8.0
