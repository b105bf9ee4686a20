"""The metrics in memory: requests by endpoint and status, bytes by source, the cache's
counters read at scrape time, upstream latency, reachability, rate limit and token service
state, and where /metrics is served."""
import hashlib

import attrs
import pytest
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from docxy.config import Config
from docxy.ops.metrics import Metrics, parse_ratelimit
from docxy.registry.presets import PRESETS
from docxy.tap import Options, makeService
from docxy.upstream.auth import TOKEN_SERVICE_RETRY
from docxy.upstream.errors import UpstreamError
from docxy.upstream.measured import MeasuredClient
from docxy.web.site import DocxySite, metrics_resource_tree

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub, hub_config, make_site


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def context_of(site):
    return site.resource._prefixes[b"/v2/"].context


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def get(site, path, headers=()):
    ex = Exchange(site)
    ex.send("GET", path, headers)
    return ex


@pytest.mark.parametrize(
    "value, number",
    [("76;w=21600", 76), (b"100;w=21600", 100), ("5", 5), (" 7 ;w=1", 7),
     ("", None), ("many", None), (None, None), ("-1", None)],
)
def test_parse_ratelimit(value, number):
    """Hub's `N;w=SECONDS` gives N; anything without a leading number gives nothing."""
    assert parse_ratelimit(value) == number


def test_requests_are_counted_by_endpoint_and_status_never_by_name():
    """Each answered request counts once under a fixed endpoint label and its status;
    repository names never become label values."""
    site, _, _ = make_site(upstream=FakeUpstream(lambda m, u, h, b: FakeResponse(404, body=b"{}")))
    get(site, "/v2/secret-team/app/manifests/latest")
    get(site, "/v2/secret-team/app/tags/list")
    get(site, "/health")
    get(site, "/nope")
    metrics = site.metrics
    assert sample(metrics, "docxy_requests_total", endpoint="manifest", status="404") == 1
    assert sample(metrics, "docxy_requests_total", endpoint="tags", status="404") == 1
    assert sample(metrics, "docxy_requests_total", endpoint="health", status="200") == 1
    assert sample(metrics, "docxy_requests_total", endpoint="other", status="404") == 1
    assert sample(metrics, "docxy_request_duration_seconds_count", endpoint="manifest") == 1
    assert b"secret-team" not in generate_latest(metrics.registry)


def test_cache_counters_and_bytes_by_source(tmp_path):
    """A cold blob pull counts a miss and upstream bytes, the warm one a hit and cache
    bytes; the cache's own counters are what /metrics shows, read when scraped."""
    data = b"layer" * 1000
    digest = digest_of(data)

    def respond(method, url, headers, body):
        if method == b"HEAD":
            return FakeResponse(200, {b"content-length": str(len(data)).encode()}, length=0)
        return FakeResponse(200, body=data)

    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "c")), FakeUpstream(respond),
                           with_cache=True)
    ctx = context_of(site)
    ctx.metrics.watch_cache(ctx.blobs, ctx.manifests)
    metrics = site.metrics
    assert get(site, f"/v2/x/blobs/{digest}").response()[2] == data
    assert sample(metrics, "docxy_cache_misses_total", kind="blob") == 1
    assert sample(metrics, "docxy_sent_bytes_total", source="upstream") == len(data)
    assert sample(metrics, "docxy_cache_size_bytes") == len(data)
    assert sample(metrics, "docxy_cache_entries") == 1
    assert get(site, f"/v2/x/blobs/{digest}").response()[2] == data
    assert sample(metrics, "docxy_cache_hits_total", kind="blob") == 1
    assert sample(metrics, "docxy_sent_bytes_total", source="cache") == len(data)
    assert sample(metrics, "docxy_cache_filled_bytes_total") == len(data)
    assert sample(metrics, "docxy_upstream_fetches_in_flight") == 0
    assert sample(metrics, "docxy_cache_free_bytes") == pytest.approx(
        ctx.blobs.store.free_bytes(), rel=0.01)
    ctx.blobs.stats.digest_mismatches = 3
    ctx.manifests.stale = 2
    assert sample(metrics, "docxy_cache_digest_mismatches_total") == 3
    assert sample(metrics, "docxy_cache_stale_serves_total") == 2


class _SlowUpstream:
    """Answers when the test fires `answer`."""

    def __init__(self):
        self.answer = defer.Deferred()

    async def request(self, method, url, headers, body=None, follow_redirects=True):
        result = await self.answer
        if isinstance(result, Exception):
            raise result
        return result


def test_upstream_latency_and_ratelimit_are_recorded_per_registry():
    """The time to the upstream's headers lands in its registry's histogram, and Hub's
    `ratelimit-remaining: 76;w=21600` becomes the gauge 76."""
    clock, metrics, slow = Clock(), Metrics(), _SlowUpstream()
    client = MeasuredClient(slow, metrics, "docker.io", clock)
    d = defer.ensureDeferred(client.request(b"HEAD", "https://r/v2/x/manifests/1", Headers()))
    clock.advance(0.3)
    slow.answer.callback(FakeResponse(200, {b"ratelimit-remaining": b"76;w=21600",
                                            b"ratelimit-limit": b"100;w=21600"}))
    assert d.result.code == 200
    assert sample(metrics, "docxy_upstream_response_seconds_count", registry="docker.io") == 1
    assert sample(metrics, "docxy_upstream_response_seconds_sum", registry="docker.io") == pytest.approx(0.3)
    assert sample(metrics, "docxy_upstream_ratelimit_remaining", registry="docker.io") == 76
    assert sample(metrics, "docxy_upstream_ratelimit_limit", registry="docker.io") == 100


def test_upstream_up_follows_the_last_request():
    """docxy_upstream_up is absent before a registry's first request, 0 after a request
    that got no answer, 1 after one that got any answer (a 503 too)."""
    clock, metrics = Clock(), Metrics()
    answers = []
    client = MeasuredClient(FakeUpstream(lambda m, u, h, b: answers.pop(0)), metrics,
                            "quay.io", clock)
    assert metrics.registry.get_sample_value("docxy_upstream_up", {"registry": "quay.io"}) is None
    for answer, up in ((UpstreamError(504, "UNAVAILABLE", "upstream did not answer in time"), 0),
                       (FakeResponse(503), 1),
                       (UpstreamError(502, "UNAVAILABLE", "upstream unreachable"), 0),
                       (FakeResponse(200), 1)):
        answers.append(answer)
        d = defer.ensureDeferred(client.request(b"GET", "https://r/v2/", Headers()))
        d.addErrback(lambda _: None)
        assert metrics.registry.get_sample_value("docxy_upstream_up", {"registry": "quay.io"}) == up


def test_token_service_up_is_read_at_scrape_time():
    """docxy_upstream_token_service_up is 1 for every registry until its token service
    fails, 0 while it is believed down, and 1 again once that belief has run out."""
    config = Config(upstreams=(hub(), attrs.evolve(PRESETS["ghcr.io"], url="https://ghcr.test")))
    site, upstream, clock = make_site(config)
    ctx = context_of(site)
    ctx.metrics.watch_upstreams(ctx.proxies)
    metrics = site.metrics
    assert sample(metrics, "docxy_upstream_token_service_up", registry="docker.io") == 1
    assert sample(metrics, "docxy_upstream_token_service_up", registry="ghcr.io") == 1
    down = UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
    upstream.responder = lambda m, u, h, b: down
    auth = ctx.proxies["docker.io"].auth
    d = defer.ensureDeferred(auth.ask(b"GET", "https://auth.test/token", Headers()))
    assert isinstance(d.result.value, UpstreamError)
    d.addErrback(lambda _: None)
    assert sample(metrics, "docxy_upstream_token_service_up", registry="docker.io") == 0
    assert sample(metrics, "docxy_upstream_token_service_up", registry="ghcr.io") == 1
    clock.advance(TOKEN_SERVICE_RETRY + 1)
    assert sample(metrics, "docxy_upstream_token_service_up", registry="docker.io") == 1


def test_upstream_failure_is_counted_and_raised():
    """An upstream that cannot be asked counts a failure; the error still reaches the caller."""
    clock, metrics, slow = Clock(), Metrics(), _SlowUpstream()
    client = MeasuredClient(slow, metrics, "ghcr.io", clock)
    d = defer.ensureDeferred(client.request(b"GET", "https://r/v2/", Headers()))
    slow.answer.callback(UpstreamError(502, "UNAVAILABLE", "upstream unreachable"))
    assert isinstance(d.result.value, UpstreamError)
    d.addErrback(lambda _: None)
    assert sample(metrics, "docxy_upstream_failures_total", registry="ghcr.io") == 1
    assert sample(metrics, "docxy_upstream_response_seconds_count", registry="ghcr.io") == 0


def test_refusals_keep_their_name_and_label():
    """Other modules count refusals as docxy_refusals{reason}."""
    metrics = Metrics()
    metrics.refusals.labels("network").inc()
    assert sample(metrics, "docxy_refusals_total", reason="network") == 1


def test_metrics_on_the_api_unless_given_their_own_listener():
    """/metrics is an API route by default; with --metrics-listen it is served only on
    that endpoint's site."""
    site, _, _ = make_site()
    assert b"/metrics" in site.resource._routes
    site, _, _ = make_site(hub_config(metrics_listen="tcp:0:interface=127.0.0.1"))
    assert b"/metrics" not in site.resource._routes
    assert list(metrics_resource_tree(context_of(site))._routes) == [b"/metrics"]


def test_metrics_listen_option_adds_a_site():
    """--metrics-listen (or DOCXY_METRICS_LISTEN) starts one more listener serving /metrics."""
    options = Options(environ={"DOCXY_METRICS_LISTEN": "tcp:0:interface=127.0.0.1"})
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--no-cache"])
    assert options["metrics-listen"] == "tcp:0:interface=127.0.0.1"
    sites = [s.factory for s in makeService(options, reactor=Clock())
             if isinstance(getattr(s, "factory", None), DocxySite)]
    routes = [sorted(site.resource._routes) for site in sites]
    assert [b"/metrics"] in routes
    api = next(r for r in routes if b"/v2/" in r)
    assert b"/metrics" not in api
    assert all(site.metrics is sites[0].metrics for site in sites)


def test_the_daemon_exports_the_token_services_and_no_cache_metrics_without_a_cache():
    """The daemon built from options exports each registry's token service state; with
    --no-cache no cache metric (docxy_cache_free_bytes among them) exists."""
    options = Options(environ={})
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--no-cache"])
    site = next(s.factory for s in makeService(options, reactor=Clock())
                if isinstance(getattr(s, "factory", None), DocxySite))
    assert sample(site.metrics, "docxy_upstream_token_service_up", registry="docker.io") == 1
    assert b"docxy_cache_" not in generate_latest(site.metrics.registry)
