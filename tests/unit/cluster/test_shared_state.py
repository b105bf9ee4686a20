"""What one node learns, every node of a cluster knows (docxy.cluster.state through the
access gate, the upstream's tokens and the tags): the upstream is asked once per cluster,
and a node without Redis still works on what it learned itself."""
from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from docxy.cluster.link import ClusterUnavailable
from docxy.registry.names import Route
from docxy.upstream.auth import UpstreamAuth
from docxy.upstream.proxy import RegistryProxy

from ..fakes import FakeResponse, FakeUpstream, hub

DIGEST = "sha256:" + "cd" * 32


class MemoryState:
    """docxy.cluster.state.SharedState over a dict (`down`: Redis does not answer)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict] = {}
        self.down = False

    async def lookup(self, namespace, key):
        return None if self.down else self.values.get((namespace, key))

    def remember(self, namespace, key, value, ttl=None):
        if not self.down:
            self.values[(namespace, key)] = json.loads(json.dumps(value))


def _token_answer(method, url, headers, body):
    if "token" in url:
        return FakeResponse(200, body=json.dumps({"token": "t-1", "expires_in": 300}).encode())
    if method == b"HEAD":
        return FakeResponse(200, {}, length=0)
    return FakeResponse(404)


def _node(state, clock, responder, mirror=False):
    upstream = FakeUpstream(responder)
    spec = hub(mirror_mode=mirror, auth_realm="https://auth.test/token",
               auth_service="registry.test")
    auth = UpstreamAuth(spec, upstream, clock)
    auth.shared = state
    proxy = RegistryProxy(spec, upstream, auth, clock)
    proxy.access.shared = state
    return proxy, upstream


@pytest_twisted.ensureDeferred
async def test_a_public_repository_found_by_one_node_costs_the_others_nothing():
    """Node A serves library/x and learns, as after a cache miss, that anyone may pull
    it; node B then serves it without asking the upstream at all."""
    clock, state = Clock(), MemoryState()
    clock.advance(1_000_000)
    a, up_a = _node(state, clock, _token_answer)
    b, up_b = _node(state, clock, _token_answer)
    route = Route("library/x", "blobs", DIGEST)
    assert await a.access.check_access(route, Headers()) is None
    a.access.learn_publicity(route)
    assert up_a.calls
    assert await b.access.check_access(route, Headers()) is None
    assert up_b.calls == []


@pytest_twisted.ensureDeferred
async def test_mirror_mode_token_is_fetched_once_for_the_cluster():
    """Node A fetches the upstream token for a scope; node B uses it until it expires,
    then fetches its own."""
    clock, state = Clock(), MemoryState()
    clock.advance(1_000_000)
    a, up_a = _node(state, clock, _token_answer, mirror=True)
    b, up_b = _node(state, clock, _token_answer, mirror=True)
    assert await a.auth.token("repository:library/x:pull") == "t-1"
    assert await b.auth.token("repository:library/x:pull") == "t-1"
    assert [u for u in up_b.urls() if "token" in u] == []
    clock.advance(600)
    await b.auth.token("repository:library/x:pull")
    assert [u for u in up_b.urls() if "token" in u] != []


@pytest_twisted.ensureDeferred
async def test_without_redis_a_node_asks_for_itself():
    """Redis away: nothing is shared, each node asks the upstream itself, and nothing fails."""
    clock, state = Clock(), MemoryState()
    clock.advance(1_000_000)
    state.down = True
    a, up_a = _node(state, clock, _token_answer, mirror=True)
    b, up_b = _node(state, clock, _token_answer, mirror=True)
    assert await a.auth.token("repository:library/x:pull") == "t-1"
    assert await b.auth.token("repository:library/x:pull") == "t-1"
    assert [u for u in up_b.urls() if "token" in u] != []


def test_cluster_unavailable_is_what_the_state_hides():
    """The real SharedState's lookup turns ClusterUnavailable into None (a sanity check of
    the name this module's fake stands in for)."""
    from docxy.cluster.state import SharedState

    class DownLink:
        async def call(self, *args):
            raise ClusterUnavailable("down")

    state = SharedState(DownLink())
    coroutine = state.lookup("tag", "x")
    try:
        coroutine.send(None)
    except StopIteration as stop:
        assert stop.value is None
    else:
        raise AssertionError("lookup did not finish at once")
