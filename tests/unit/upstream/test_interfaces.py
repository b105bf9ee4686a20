"""The upstream client is one named interface: the real client, the client seen through the
metrics and the tests' fakes all provide `IUpstreamClient` (checked with verifyObject), and
the client can be given any `IAgent` instead of building its own."""
from __future__ import annotations

from treq.testing import RequestTraversalAgent, StringStubbingResource
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface.verify import verifyObject

from docxy.ops.metrics import Metrics
from docxy.upstream.client import UpstreamClient
from docxy.upstream.interfaces import IUpstreamClient
from docxy.upstream.measured import MeasuredClient

from ..fakes import FakeResponse, FakeUpstream


def _client(**kwargs) -> UpstreamClient:
    return UpstreamClient(Clock(), None, connect_timeout=1, header_timeout=1, max_redirects=5,
                          pool_size=1, **kwargs)


def test_the_real_client_provides_the_interface():
    """The client as the daemon builds it (its own pooled Agent) is an IUpstreamClient."""
    assert verifyObject(IUpstreamClient, _client())


def test_the_measured_client_provides_the_interface_and_forwards_close():
    """MeasuredClient is a proxy for IUpstreamClient: what it does not time (close) is
    the client's own."""
    closed = []

    class Closing(FakeUpstream):
        def close(self):
            closed.append(True)
            return defer.succeed(None)

    measured = MeasuredClient(Closing(), Metrics(), "docker.io", Clock())
    assert verifyObject(IUpstreamClient, measured)
    assert verifyObject(IUpstreamClient, MeasuredClient(_client(), Metrics(), "docker.io", Clock()))
    measured.close()
    assert closed == [True]


def test_the_fakes_provide_the_interfaces_they_stand_in_for():
    """tests/unit/fakes.py's upstream and response can be used wherever docxy's are."""
    assert verifyObject(IUpstreamClient, FakeUpstream())
    assert verifyObject(IResponse, FakeResponse(200, body=b"x"))


def test_the_client_sends_through_the_agent_it_is_given():
    """Given an agent (here treq's in-memory one), the client sends its requests through it
    and has no pool of its own to close."""
    seen = []

    def answer(method, url, params, headers, data):
        seen.append((method, url))
        return 200, {b"content-type": b"application/json"}, b"{}"

    client = _client(agent=RequestTraversalAgent(StringStubbingResource(answer)))
    d = defer.ensureDeferred(client.request(b"GET", "https://registry.test/v2/", Headers()))
    assert d.result.code == 200
    assert seen == [(b"GET", "https://registry.test/v2/")]
    assert client.pool is None and client.close().called
