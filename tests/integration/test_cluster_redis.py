"""docxy.cluster's Redis pieces against a real redis-server: leases (one download per blob
across nodes), the shared rate budget, membership, shared state, and the link's
behaviour when Redis goes away and comes back."""
from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager

import pytest
import pytest_twisted
from harness.redisd import RedisServer
from twisted.internet import reactor, task

from docxy.admission.ratelimit import RateLimiter
from docxy.cluster.leases import Lease, Leases
from docxy.cluster.link import ClusterUnavailable, RedisLink, parse_redis_url
from docxy.cluster.members import Membership
from docxy.cluster.ratelimit import SharedRateLimiter
from docxy.cluster.state import SharedState

pytestmark = pytest.mark.integration


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(check, timeout: float, interval: float = 0.1):
    """Poll `check` (sync or async) until truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s (last: {result!r})")
        await sleep(interval)


@asynccontextmanager
async def linked(url: str, count: int = 1, **kwargs):
    """`count` started RedisLinks to `url` (as many nodes), up before the body runs."""
    links = [RedisLink(url, reactor, **kwargs) for _ in range(count)]
    for link in links:
        link.start()
    try:
        for link in links:
            await wait_until(lambda link=link: link.up, 5)
        yield links
    finally:
        for link in links:
            await link.stop()


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


def test_redis_urls_parse_or_say_what_is_wrong():
    """Redis URLs give host, port, db and password; bad ones raise a clear ValueError."""
    assert parse_redis_url("redis://127.0.0.1:6390/3") == ("127.0.0.1", 6390, 3, None, None)
    assert parse_redis_url("redis://:s%40cret@localhost:1/0") == ("localhost", 1, 0, None, "s@cret")
    assert parse_redis_url("redis://h") == ("h", 6379, 0, None, None)
    for bad in ("http://h:1/0", "redis://h:1/x", "redis://:1/0", "redis://h:99999/0", "h:1"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@pytest_twisted.ensureDeferred
async def test_second_node_gets_the_holder_until_release(redis_server):
    """Of two nodes the first take leads, the second learns its URL, and takes it after release."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a = Leases(la, "http://a", reactor, prefix=p)
        b = Leases(lb, "http://b", reactor, prefix=p)
        lease = await a.take("sha256:1")
        assert isinstance(lease, Lease) and lease.digest == "sha256:1" and not lease.lost
        assert await b.take("sha256:1") == "http://a"
        assert await b.holder("sha256:1") == "http://a"
        assert await a.take("sha256:1") == "http://a"  # not twice, even on the same node
        await lease.release()
        assert await a.holder("sha256:1") is None
        taken = await b.take("sha256:1")
        assert isinstance(taken, Lease)
        assert await a.take("sha256:1") == "http://b"
        await taken.release()


@pytest_twisted.ensureDeferred
async def test_lease_is_renewed_while_held_and_expires_when_its_node_dies(redis_server):
    """A held lease outlives its TTL; one whose node stops renewing expires within the TTL."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a = Leases(la, "http://a", reactor, ttl=1.0, prefix=p)
        b = Leases(lb, "http://b", reactor, ttl=1.0, prefix=p)
        lease = await a.take("sha256:2")
        assert isinstance(lease, Lease)
        await sleep(2.5)
        assert not lease.lost
        assert await b.take("sha256:2") == "http://a"
        pttl = int(redis_server.cli("PTTL", a.key("sha256:2")))
        assert 0 < pttl <= 1000
        a.stop()  # node a "dies": no more renewals, nothing released
        stopped = time.monotonic()
        await wait_until(lambda: _gone(b, "sha256:2"), 2.0, 0.05)
        assert time.monotonic() - stopped <= 1.0 + 0.5  # the TTL, and polling
        taken = await b.take("sha256:2")
        assert isinstance(taken, Lease)
        await taken.release()


async def _gone(leases: Leases, digest: str) -> bool:
    return await leases.holder(digest) is None


@pytest_twisted.ensureDeferred
async def test_release_does_not_delete_another_nodes_lease(redis_server):
    """Releasing a lease another node now holds leaves theirs in place, and ours is lost."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a = Leases(la, "http://a", reactor, ttl=1.0, prefix=p)
        b = Leases(lb, "http://b", reactor, ttl=1.0, prefix=p)
        lease = await a.take("sha256:3")
        assert isinstance(lease, Lease)
        # As if a's lease expired and b took it over: overwrite the key.
        redis_server.cli("SET", a.key("sha256:3"), "http://b", "PX", "5000")
        await wait_until(lambda: lease.lost, 2.0, 0.05)  # its next renewal sees it
        await lease.release()
        assert await b.holder("sha256:3") == "http://b"
        redis_server.cli("DEL", a.key("sha256:3"))


@pytest_twisted.ensureDeferred
async def test_release_right_after_takeover_keeps_the_new_holder(redis_server):
    """Even before a renewal noticed, release of a lease now someone else's deletes nothing."""
    p = prefix()
    async with linked(redis_server.url) as (la,):
        a = Leases(la, "http://a", reactor, ttl=5.0, prefix=p)
        lease = await a.take("sha256:4")
        redis_server.cli("SET", a.key("sha256:4"), "http://c", "PX", "5000")
        await lease.release()
        assert await a.holder("sha256:4") == "http://c"


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_rate_budget(redis_server):
    """Two nodes' limiters (10 per 60 s) spend one budget; another client has its own."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        limiters = [SharedRateLimiter(link, 10, 60.0, RateLimiter(10, 60.0, reactor), prefix=p)
                    for link in (la, lb)]
        waits = [await limiters[i % 2].take("alice") for i in range(10)]
        assert waits == [0.0] * 10
        wait = await limiters[1].take("alice")
        assert 0 < wait <= 6.5  # one token refills in 6 s
        assert await limiters[0].take("alice") > 0  # nothing was spent by the refusal
        assert await limiters[0].take("bob") == 0.0
        ttl = int(redis_server.cli("PTTL", limiters[0].key("alice")))
        assert 60_000 < ttl <= 120_000


@pytest_twisted.ensureDeferred
async def test_membership_sees_nodes_come_and_go(redis_server):
    """Two nodes see each other; after one stops, the other sees only itself."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a = Membership(la, "http://a", reactor, interval=0.5, prefix=p)
        b = Membership(lb, "http://b", reactor, interval=0.5, prefix=p)
        a.start()
        b.start()
        try:
            await wait_until(lambda: _members_are(a, ["http://a", "http://b"]), 3)
            assert await b.members() == ["http://a", "http://b"]
            await b.stop()
            assert await a.members() == ["http://a"]  # left at once (ZREM)
        finally:
            await a.stop()
            await b.stop()


@pytest_twisted.ensureDeferred
async def test_membership_forgets_a_node_that_died(redis_server):
    """A node that stops announcing without leaving is no member after three intervals."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a = Membership(la, "http://a", reactor, interval=0.3, prefix=p)
        b = Membership(lb, "http://b", reactor, interval=0.3, prefix=p)
        a.start()
        b.start()
        try:
            await wait_until(lambda: _members_are(a, ["http://a", "http://b"]), 3)
            b._beater.stop()  # dies: no ZREM
            await wait_until(lambda: _members_are(a, ["http://a"]), 0.9 + 1.0)
        finally:
            await a.stop()
            b._beater = None
            await b.stop()


async def _members_are(membership: Membership, expected: list[str]) -> bool:
    return await membership.members() == expected


@pytest_twisted.ensureDeferred
async def test_shared_state_put_get_delete_and_ttl(redis_server):
    """Shared state round-trips JSON objects, deletes, and expires values put with a TTL."""
    p = prefix()
    async with linked(redis_server.url, 2) as (la, lb):
        a, b = SharedState(la, prefix=p), SharedState(lb, prefix=p)
        assert await a.get("tokens", "x") is None
        await a.put("tokens", "x", {"user": "alice", "n": 1, "nested": [1, "2"]})
        assert await b.get("tokens", "x") == {"user": "alice", "n": 1, "nested": [1, "2"]}
        assert await b.get("other", "x") is None
        await b.delete("tokens", "x")
        assert await a.get("tokens", "x") is None
        await a.put("tokens", "y", {"v": "12"}, ttl=0.5)
        assert await b.get("tokens", "y") == {"v": "12"}
        await wait_until(lambda: _state_gone(b, "tokens", "y"), 2.0, 0.05)
        with pytest.raises(TypeError):
            await a.put("tokens", "z", ["not", "a", "dict"])


async def _state_gone(state: SharedState, namespace: str, key: str) -> bool:
    return await state.get(namespace, key) is None


@pytest_twisted.ensureDeferred
async def test_redis_going_away_and_coming_back(tmp_path):
    """Redis stopped: calls fail fast with ClusterUnavailable, the limiter goes local, and
    the link comes back by itself after Redis restarts."""
    redis = RedisServer.start(tmp_path / "redis")
    changes: list[tuple[bool, str]] = []
    timeout = 1.0
    link = RedisLink(redis.url, reactor, timeout=timeout,
                     on_change=lambda up, why: changes.append((up, why)))
    try:
        link.start()
        await wait_until(lambda: link.up, 5)
        assert changes == [(True, "")]
        local = RateLimiter(2, 60.0, reactor)
        limiter = SharedRateLimiter(link, 2, 60.0, local, prefix=prefix())
        leases = Leases(link, "http://a", reactor, ttl=5.0, prefix=prefix())
        lease = await leases.take("sha256:5")
        assert isinstance(lease, Lease)
        assert await limiter.take("carol") == 0.0

        redis.stop()
        for attempt in range(3):  # the first may still find the old connection open
            started = time.monotonic()
            with pytest.raises(ClusterUnavailable):
                await link.call("GET", "k")
            assert time.monotonic() - started < timeout + 1.0
        assert not link.up and link.why
        assert [c for c in changes if not c[0]] == [changes[-1]] and len(changes) == 2
        errors = link.errors
        assert errors >= 3
        with pytest.raises(ClusterUnavailable):
            await leases.take("sha256:6")
        with pytest.raises(ClusterUnavailable):
            await link.eval("return 1", [], [])
        # Degraded: the node's own bucket (still full) answers.
        assert [await limiter.take("carol") for _ in range(3)][:2] == [0.0, 0.0]
        assert local.take("carol") > 0
        await sleep(2.0)  # lease renewals fail meanwhile: the lease is kept
        assert not lease.lost

        redis.restart()  # empty: nothing persisted
        await wait_until(lambda: link.up, 5)  # no traffic needed
        assert changes[-1] == (True, "") and len(changes) == 3
        assert await link.call("SET", "k", "v") == "OK"
        assert await link.call("GET", "k") == "v"
        assert await link.eval("return ARGV[1]", [], ["x"]) == "x"  # EVALSHA cache gone too
        assert await limiter.take("carol") == 0.0
        await wait_until(lambda: lease.lost, 3)  # its key died with Redis
    finally:
        await link.stop()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_link_started_while_redis_is_down_connects_when_it_starts(tmp_path):
    """A link to a Redis that is not running fails fast, then comes up once Redis starts."""
    redis = RedisServer.start(tmp_path / "redis")
    redis.stop()
    link = RedisLink(redis.url, reactor, timeout=1.0)
    try:
        link.start()
        await wait_until(lambda: link.why != "not connected yet", 3)
        assert not link.up
        started = time.monotonic()
        with pytest.raises(ClusterUnavailable):
            await link.call("PING")
        assert time.monotonic() - started < 2.0
        redis.restart()
        await wait_until(lambda: link.up, 5)
        assert await link.call("PING") == "PONG"
    finally:
        await link.stop()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_frozen_redis_times_out_and_recovers(tmp_path):
    """A Redis that accepts but does not answer (SIGSTOP) gives ClusterUnavailable within the
    timeout, and the link recovers after it resumes."""
    import signal

    redis = RedisServer.start(tmp_path / "redis")
    link = RedisLink(redis.url, reactor, timeout=1.0)
    try:
        link.start()
        await wait_until(lambda: link.up, 5)
        redis.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(ClusterUnavailable):
                    await link.call("PING")
                assert time.monotonic() - started < 2.0
            assert not link.up
            await sleep(2.5)  # reconnection attempts hang in the handshake meanwhile
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await wait_until(lambda: link.up, 5)
        assert await link.call("PING") == "PONG"
    finally:
        await link.stop()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_a_database_and_password_from_the_url_are_used(tmp_path):
    """The URL's database is selected and its password sent; a refused AUTH (Redis
    restarted without the password) does not stop reconnecting."""
    redis = RedisServer.start(tmp_path / "redis")
    redis.cli("CONFIG", "SET", "requirepass", "pw")
    link = RedisLink(f"redis://:pw@127.0.0.1:{redis.port}/3", reactor, timeout=1.0)
    try:
        link.start()
        await wait_until(lambda: link.up, 5)
        await link.call("SET", "in3", "yes")
        assert redis.cli("-a", "pw", "--no-auth-warning", "-n", "3", "GET", "in3").strip() == "yes"
        redis.restart()  # comes back without the password: AUTH fails, for now
        await wait_until(lambda: not link.up and "auth" in link.why, 5)
        redis.cli("CONFIG", "SET", "requirepass", "pw")
        await wait_until(lambda: link.up, 5)
        await link.call("SET", "again", "1")
        assert redis.cli("-a", "pw", "--no-auth-warning", "-n", "3", "GET", "again").strip() == "1"
    finally:
        await link.stop()
        redis.stop()
