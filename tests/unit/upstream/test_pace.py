"""A registry's bandwidth cap (docxy.upstream.pace, docxy.registry.units): rates as
operators write them, one token bucket shared by the registry's bodies, and a body that
waits (paused, not stalled) while the budget is spent."""
from __future__ import annotations

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from docxy.registry.presets import parse_config
from docxy.registry.units import parse_bandwidth
from docxy.upstream.bodies import deliver
from docxy.upstream.pace import RateCap

from ..fakes import FakeResponse


@pytest.mark.parametrize("text, rate", [
    ("50MB/s", 50e6), ("1.5GB/s", 1.5e9), ("200MiB/s", 200 * 2**20),
    ("400Mbit/s", 50e6), ("64 KiB / s", 65536), ("10kB/s", 10_000),
])
def test_rates_as_operators_write_them(text, rate):
    """Decimal and binary prefixes, bytes and bits, spaces allowed."""
    assert parse_bandwidth(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["50MB", "fast", "-5MB/s", "100B/s", "5 MB/h"])
def test_bad_rates_are_refused_with_the_form_to_use(text):
    """What is not a rate (or is uselessly small) is a ValueError naming the form."""
    with pytest.raises(ValueError):
        parse_bandwidth(text)


def test_max_rate_in_the_configuration_file():
    """`max_rate` in an upstream table sets its cap; a number there is refused."""
    settings = parse_config({"upstream": {"ghcr.io": {"max_rate": "50MB/s"}}})
    assert dict(settings.upstreams)["ghcr.io"]["max_rate"] == 50e6
    with pytest.raises(ValueError, match="max_rate"):
        parse_config({"upstream": {"ghcr.io": {"max_rate": 50}}})


def test_bucket_lets_the_rate_through_and_makes_debt_wait():
    """Within the burst nothing waits; a debt waits exactly as long as the rate takes
    to pay it; time refills the bucket."""
    clock = Clock()
    cap = RateCap(1_000_000, clock)  # 1 MB/s, burst 100 kB
    assert cap.take(100_000) == 0
    assert cap.take(500_000) == pytest.approx(0.5)
    clock.advance(0.5)
    assert cap.wait() == 0
    clock.advance(10)
    assert cap.take(100_000) == 0  # the burst is all that accumulates


class _Counting(Protocol):
    def __init__(self) -> None:
        self.received = 0
        self.ended = None

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason=None) -> None:
        self.ended = reason


def test_a_body_over_the_cap_is_paused_until_its_budget_returns():
    """Two bodies of one registry share the cap: the first's debt makes the second wait
    too, and the first waits on until the registry's whole debt is paid; the transports
    are paused meanwhile and resumed after, and no idle timeout fires while they wait."""
    clock = Clock()
    cap = RateCap(1_000_000, clock)
    bodies = [FakeResponse(200, body=b"", length=2_000_000, auto=False) for _ in range(2)]
    protocols = [_Counting() for _ in bodies]
    for response, protocol in zip(bodies, protocols):
        deliver(response, protocol, clock, idle_timeout=1.0, cap=cap)
    bodies[0].protocol.dataReceived(b"x" * 600_000)
    assert bodies[0].transport.paused  # 0.5 s of debt
    bodies[1].protocol.dataReceived(b"x" * 100_000)
    assert bodies[1].transport.paused  # the registry's budget is spent
    clock.advance(0.55)  # the first's own debt is paid, the registry's is not yet
    assert bodies[0].transport.paused and bodies[1].transport.paused
    clock.advance(0.2)
    assert not bodies[0].transport.paused and not bodies[1].transport.paused
    assert all(p.ended is None for p in protocols)  # waited 0.75 s with a 1 s idle timeout
    assert [p.received for p in protocols] == [600_000, 100_000]
