"""The daemon's Prometheus metrics: one registry per daemon (never the global one), built
with the Context and served by `/metrics`.  Modules count through the `Metrics` object
they are given; the cache's own counters and the token services' state are read at scrape
time, never copied."""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The request durations of a mirror run from a cached manifest (ms) to a large layer on a
# slow link (minutes); the upstream's time to headers from ms to its header timeout.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def parse_ratelimit(value: bytes | str | None) -> int | None:
    """The number in a `ratelimit-remaining` / `ratelimit-limit` value (Hub sends
    `76;w=21600`), or None when there is none."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    match = re.match(r"\s*(\d+)\s*(?:[;,]|$)", value)
    return int(match.group(1)) if match else None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refusals = Counter(
            "docxy_refusals",
            "Requests docxy refused itself (access control, rate limits, unmirrored names)",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "docxy_requests",
            "Requests answered, by endpoint (ping, token, manifest, blob, tags, referrers, "
            "health, metrics, other) and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "docxy_request_duration_seconds",
            "Time from a request's arrival to its last byte sent, by endpoint",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "docxy_sent_bytes",
            "Body bytes sent to clients, by where they came from: cache (stored content), "
            "upstream (streamed from a registry, also through a cache download) or local "
            "(docxy's own answers)",
            ["source"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "docxy_upstream_response_seconds",
            "Time until an upstream's response headers (redirects to a CDN included), by "
            "registry",
            ["registry"],
            buckets=_UPSTREAM_BUCKETS,
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "docxy_upstream_failures",
            "Upstream requests that got no answer (unreachable, timed out, connection "
            "failed), by registry",
            ["registry"],
            registry=self.registry,
        )
        self.upstream_up = Gauge(
            "docxy_upstream_up",
            "1 when the last request to the registry got an answer (any status), 0 when it "
            "got none (unreachable, timed out, connection failed); absent before the first",
            ["registry"],
            registry=self.registry,
        )
        self.upstream_resumes = Counter(
            "docxy_upstream_resumes",
            "Cut or stalled upstream blob downloads asked again from the byte reached "
            "(Range), by registry",
            ["registry"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "docxy_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream sent (Hub: pulls left in its window)",
            ["registry"],
            registry=self.registry,
        )
        self.ratelimit_limit = Gauge(
            "docxy_upstream_ratelimit_limit",
            "The last ratelimit-limit an upstream sent",
            ["registry"],
            registry=self.registry,
        )

    def count_request(self, endpoint: str, status: int, seconds: float, sent: int,
                      source: str) -> None:
        """One finished (or aborted) client request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(max(seconds, 0.0))
        if sent:
            self.sent_bytes.labels(source).inc(sent)

    def upstream_answered(self, registry: str, seconds: float, headers) -> None:
        """An upstream's response headers arrived after `seconds`; `headers` are the
        response's (twisted Headers), read for the rate limit it reports."""
        self.upstream_seconds.labels(registry).observe(max(seconds, 0.0))
        self.upstream_up.labels(registry).set(1)
        for name, gauge in ((b"ratelimit-remaining", self.ratelimit_remaining),
                            (b"ratelimit-limit", self.ratelimit_limit)):
            value = parse_ratelimit(headers.getRawHeaders(name, [None])[0])
            if value is not None:
                gauge.labels(registry).set(value)

    def upstream_failed(self, registry: str) -> None:
        self.upstream_failures.labels(registry).inc()
        self.upstream_up.labels(registry).set(0)

    def upstream_resumed(self, registry: str) -> None:
        self.upstream_resumes.labels(registry).inc()

    def watch_upstreams(self, proxies: dict) -> None:
        """Export each registry's token service state (docxy.upstream.auth), read at each
        scrape; `proxies`: RegistryProxy by registry name."""
        self.registry.register(UpstreamCollector(proxies))

    def watch_cluster(self, parts, blobs) -> None:
        """Export the shared store's and the cluster's state (docxy.cluster.node), if any."""
        if parts.bucket is not None or parts.link is not None:
            self.registry.register(ClusterCollector(parts, blobs))

    def watch_cache(self, blobs, manifests) -> None:
        """Export the cache's counters (docxy.cache), read at each scrape."""
        self.registry.register(CacheCollector(blobs, manifests))


class UpstreamCollector:
    """Whether each registry's token service is believed up, read when scraped (the
    scrape runs in a thread: `token_service_down()` only reads attributes and the clock)."""

    def __init__(self, proxies: dict) -> None:
        self._proxies = proxies

    def collect(self):
        up = GaugeMetricFamily("docxy_upstream_token_service_up",
                               "0 while the registry's token service is believed down (it "
                               "failed within the last 30 s), 1 otherwise (also for a "
                               "registry without one)", labels=["registry"])
        for name, proxy in list(self._proxies.items()):
            up.add_metric([name], 0 if proxy.auth.token_service_down() else 1)
        yield up


class CacheCollector:
    """The cache's own counters as Prometheus metrics, read when scraped (the scrape runs
    in a thread: only plain attribute reads here, and one statvfs of the cache directory)."""

    def __init__(self, blobs, manifests) -> None:
        self._blobs = blobs
        self._manifests = manifests

    def collect(self):
        blobs, manifests = self._blobs, self._manifests
        store, stats = blobs.store, blobs.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        hits = CounterMetricFamily("docxy_cache_hits", "Answers served from the cache, by kind",
                                   labels=["kind"])
        hits.add_metric(["blob"], stats.hits)
        hits.add_metric(["manifest"], manifests.hits if manifests else 0)
        yield hits
        misses = CounterMetricFamily("docxy_cache_misses",
                                     "Content fetched upstream into the cache, by kind",
                                     labels=["kind"])
        misses.add_metric(["blob"], stats.misses)
        misses.add_metric(["manifest"], manifests.misses if manifests else 0)
        yield misses
        yield counter("docxy_cache_joined_downloads",
                      "Blob requests that joined a download already running", stats.joined)
        yield counter("docxy_cache_stale_serves",
                      "Tags served from the cache while the upstream was down or refusing",
                      manifests.stale if manifests else 0)
        yield counter("docxy_cache_digest_mismatches",
                      "Upstream blobs refused because their digest did not match",
                      stats.digest_mismatches)
        yield counter("docxy_cache_failed_downloads",
                      "Blob downloads into the cache that did not complete", stats.failed_fills)
        yield counter("docxy_cache_uncached_relays",
                      "Blobs relayed without caching (no room on the disk or under the bound)",
                      stats.uncached)
        yield counter("docxy_cache_filled_bytes",
                      "Bytes downloaded from upstreams into the cache", stats.bytes_from_upstream)
        yield counter("docxy_cache_evictions", "Blobs evicted to stay under the size bound",
                      store.stats.evictions)
        yield counter("docxy_cache_evicted_bytes", "Bytes evicted to stay under the size bound",
                      store.stats.evicted_bytes)
        yield gauge("docxy_cache_size_bytes", "Bytes stored in the cache", store.total)
        yield gauge("docxy_cache_entries", "Blobs and manifests stored in the cache", len(store))
        if store.max_size is not None:
            yield gauge("docxy_cache_max_size_bytes", "The cache's size bound", store.max_size)
        free = store.free_bytes()
        if free is not None:
            yield gauge("docxy_cache_free_bytes", "Free space on the cache directory's file "
                        "system (for docxy's user)", free)
        yield gauge("docxy_upstream_fetches_in_flight",
                    "Blob downloads from upstreams into the cache running now", blobs.filling())


class ClusterCollector:
    """The bucket's and Redis's state and this node's traffic with its peers (plain
    attribute reads, as the CacheCollector's)."""

    def __init__(self, parts, blobs) -> None:
        self._parts = parts
        self._blobs = blobs

    def collect(self):
        parts, stats = self._parts, self._blobs.stats
        sources = self._blobs.sources
        if parts.bucket is not None:
            bucket = parts.bucket
            yield GaugeMetricFamily("docxy_store_up", "1 while the shared store (S3 bucket) "
                                    "answers, 0 while it does not", value=int(bucket.up))
            yield CounterMetricFamily("docxy_store_errors", "Requests to the shared store that "
                                      "failed", value=bucket.errors)
            yield CounterMetricFamily("docxy_store_uploads", "Verified blobs this node put "
                                      "in the shared store", value=bucket.uploads)
            yield CounterMetricFamily("docxy_store_upload_failures", "Blob uploads to the "
                                      "shared store that failed", value=bucket.upload_failures)
            yield CounterMetricFamily("docxy_store_read_bytes", "Blob bytes this node "
                                      "downloaded from the shared store", value=stats.bytes_from_bucket)
        if parts.bound is not None:
            bound = parts.bound
            yield GaugeMetricFamily("docxy_store_max_size_bytes", "The shared store's bound "
                                    "(--store-max-size)", value=bound.max_size)
            yield CounterMetricFamily("docxy_store_evictions", "Blobs this node removed from "
                                      "the shared store to keep its bound", value=bound.evictions)
            if bound.total is not None:
                yield GaugeMetricFamily("docxy_store_size_bytes", "Bytes of blobs in the shared "
                                        "store at this node's last sweep", value=bound.total)
        if parts.link is not None:
            link = parts.link
            yield GaugeMetricFamily("docxy_cluster_redis_up", "1 while Redis answers, 0 while "
                                    "the node runs degraded without it", value=int(link.up))
            yield CounterMetricFamily("docxy_cluster_redis_errors", "Redis calls that failed "
                                      "(each one served degraded)", value=link.errors)
            yield CounterMetricFamily("docxy_cluster_peer_bytes", "Blob bytes this node "
                                      "streamed from other nodes' downloads", value=stats.bytes_from_peers)
            if sources is not None:
                yield CounterMetricFamily("docxy_cluster_lease_takeovers", "Downloads this "
                                          "node took over from a leader that went away",
                                          value=sources.takeovers)
                yield CounterMetricFamily("docxy_cluster_unleased_downloads", "Downloads led "
                                          "without a lease because Redis did not answer",
                                          value=sources.degraded)


def metrics_resource(metrics: Metrics):
    """prometheus-client's Twisted resource over this daemon's registry.  (It renders in
    the reactor's thread pool; imported here so that importing docxy installs no reactor.)"""
    from prometheus_client.twisted import MetricsResource

    return MetricsResource(metrics.registry)
