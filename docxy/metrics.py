"""The daemon's Prometheus metrics: one registry per daemon (never the global one), built
with the Context and served by `/metrics`.  Modules count through the `Metrics` object
they are given; nothing here reads requests or does I/O."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refusals = Counter(
            "docxy_refusals",
            "Requests docxy refused itself (access control, rate limits, unmirrored names)",
            ["reason"],
            registry=self.registry,
        )
