"""Readiness: can docxy serve pulls right now?  Every upstream must answer `GET /v2/`
(200 or 401) within a few seconds and the cache directory must take a new file.  One
check runs at a time and its result is kept a few seconds, so probes never flood upstreams."""
from __future__ import annotations

import os
import tempfile

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from docxy.flight import SingleFlight
from docxy.upstream.bodies import discard
from docxy.upstream.errors import UpstreamError

log = Logger()

REACHABLE = (200, 401)  # 401: the registry is up and asks for a token, as it should


def cache_check(cache_dir: str | None) -> dict:
    """Whether the cache directory takes a new file (one is made and removed)."""
    if cache_dir is None:
        return {"ok": True, "enabled": False}
    try:
        fd, path = tempfile.mkstemp(dir=cache_dir, prefix=".ready-")
        os.close(fd)
        os.unlink(path)
    except OSError as e:
        return {"ok": False, "enabled": True, "dir": cache_dir,
                "error": e.strerror or type(e).__name__}
    return {"ok": True, "enabled": True, "dir": cache_dir}


def cluster_check(parts) -> dict | None:
    """The shared store and Redis, as the node last found them (no request is made: both
    are asked on every miss anyway).  Either one down leaves the node degraded, not down:
    it still serves (docxy.cache.sources), so it stays ready and says why."""
    if parts is None or (parts.bucket is None and parts.link is None):
        return None
    report: dict = {"ok": True}
    degraded = []
    if parts.bucket is not None:
        report["store"] = {"up": parts.bucket.up, **({"error": parts.bucket.why}
                                                      if not parts.bucket.up else {})}
        if not parts.bucket.up:
            degraded.append("the bucket is unreachable: serving from the local disk, "
                            "relaying the rest")
    if parts.link is not None:
        report["redis"] = {"up": parts.link.up, **({"error": parts.link.why}
                                                    if not parts.link.up else {})}
        report["node"] = parts.node_url
        if not parts.link.up:
            degraded.append("Redis is unreachable: one upstream download per node, "
                            "rate limits per node")
    if degraded:
        report["degraded"] = degraded
    return report


def readiness_report(upstreams: dict[str, dict], cache: dict, cluster: dict | None = None) -> dict:
    """The report of one check: ready only if every part is."""
    ready = cache["ok"] and all(u["ok"] for u in upstreams.values())
    report = {"status": "ready" if ready else "not ready", "ready": ready,
              "upstreams": upstreams, "cache": cache}
    if cluster is not None:
        report["cluster"] = cluster
        if cluster.get("degraded") and ready:
            report["status"] = "ready (degraded)"
    return report


class Readiness:
    def __init__(self, proxies: dict, cache_dir: str | None, reactor,
                 timeout: float = 5.0, keep: float = 5.0, cluster=None) -> None:
        """`proxies`: RegistryProxy by registry name; `timeout`: seconds an upstream has
        to answer; `keep`: seconds a result is reused."""
        self._proxies = proxies
        self._cluster = cluster  # docxy.cluster.node.ClusterParts, or None
        self._cache_dir = cache_dir
        self._reactor = reactor
        self._timeout = timeout
        self._keep = keep
        self._flight = SingleFlight()
        self._last: tuple[float, dict] | None = None

    def check(self) -> defer.Deferred:
        """A Deferred firing with the report (see readiness_report); never fails."""
        if self._last is not None and self._reactor.seconds() - self._last[0] < self._keep:
            return defer.succeed(self._last[1])
        return self._flight.run("ready", self._run)

    async def _run(self) -> dict:
        names = list(self._proxies)
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._upstream(self._proxies[n])) for n in names]
        )
        cluster = cluster_check(self._cluster)
        if cluster is not None and self._cluster.members is not None:
            cluster["members"] = await self._cluster.members.members()
        report = readiness_report(dict(zip(names, results)), cache_check(self._cache_dir),
                                  cluster)
        self._last = (self._reactor.seconds(), report)
        return report

    async def _upstream(self, proxy) -> dict:
        started = self._reactor.seconds()
        d = defer.Deferred.fromCoroutine(proxy.ping(Headers()))
        d.addTimeout(self._timeout, self._reactor)
        try:
            response = await d
        except defer.TimeoutError:
            return {"ok": False, "error": f"no answer within {self._timeout:g}s"}
        except UpstreamError as e:
            return {"ok": False, "error": e.message}
        except Exception:
            log.failure("readiness check of {name} failed", name=proxy.name)
            return {"ok": False, "error": "check failed"}
        discard(response)
        seconds = round(self._reactor.seconds() - started, 3)
        if response.code in REACHABLE:
            return {"ok": True, "status": response.code, "seconds": seconds}
        return {"ok": False, "status": response.code, "seconds": seconds,
                "error": f"upstream answered {response.code}"}
