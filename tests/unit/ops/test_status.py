"""The status page's document from the daemon's objects (every number /metrics exports read
from the same registry, so a page and a scrape agree), its pure parts, and the page and
document resources on the admin listener."""
import hashlib
import json
import re
from types import SimpleNamespace

import attrs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from docxy.admin.warmup import Job
from docxy.cache.sources import Source
from docxy.cache.usage import PullLog, Usage
from docxy.ops.history import History, Sample
from docxy.ops.metrics import Metrics
from docxy.ops.status import (
    StatusSource,
    by_label,
    cache_section,
    collect,
    counters,
    document,
    downloads_section,
    hits_section,
    top_repositories,
    total,
    upstreams_section,
    value,
    warmups_section,
)
from docxy.tap import Options, makeService
from docxy.web.resources.admin import Admin
from docxy.web.resources.status import BODY, CSP, StatusPage
from docxy.web.site import DocxySite, admin_resource

from ..fakes import (
    Exchange,
    FakeResponse,
    FakeUpstream,
    blob_upstream,
    get,
    hub_config,
    make_site,
)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def scrape(metrics: Metrics) -> dict:
    """What /metrics says, parsed from its text: {(name, labels): value}."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collect_reads_every_sample_and_the_helpers_pick_them():
    """Samples by name and labels; `total` sums over the labels not given."""
    metrics = Metrics()
    metrics.count_request("blob", 200, 0.1, 300, "cache")
    metrics.count_request("blob", 200, 0.1, 200, "upstream")
    metrics.count_request("manifest", 200, 0.1, 50, "upstream")
    samples = collect(metrics.registry)
    assert value(samples, "docxy_sent_bytes_total", source="upstream") == 250
    assert value(samples, "docxy_sent_bytes_total", source="local") is None
    assert total(samples, "docxy_requests_total") == 3
    assert total(samples, "docxy_requests_total", endpoint="blob") == 2
    assert by_label(samples, "docxy_sent_bytes_total", "source") == {"cache": 300, "upstream": 250}
    assert counters(samples) == {"hits": 0, "misses": 0, "cache_bytes": 300,
                                 "upstream_bytes": 250, "used": 0}


def _cache_samples(**gauges) -> dict:
    return {(name, ()): v for name, v in gauges.items()}


def test_the_cache_bound_is_max_size_or_else_the_disk():
    """--cache-max-size when given, the file system's size otherwise; no cache, None."""
    bounded = cache_section(_cache_samples(docxy_cache_size_bytes=250,
                                           docxy_cache_max_size_bytes=1000,
                                           docxy_cache_free_bytes=5000,
                                           docxy_cache_entries=3), disk_total=10_000)
    assert bounded == {"used": 250, "bound": 1000, "bound_is": "max-size",
                       "used_fraction": 0.25, "free": 5000, "entries": 3}
    unbounded = cache_section(_cache_samples(docxy_cache_size_bytes=250), disk_total=10_000)
    assert (unbounded["bound"], unbounded["bound_is"], unbounded["used_fraction"]) == (
        10_000, "disk", 0.025)
    assert cache_section(_cache_samples(docxy_cache_size_bytes=1), None)["bound"] is None
    assert cache_section({}, 10_000) is None


def test_the_hit_ratio_counts_blobs_and_manifests():
    samples = {("docxy_cache_hits_total", (("kind", "blob"),)): 3,
               ("docxy_cache_hits_total", (("kind", "manifest"),)): 1,
               ("docxy_cache_misses_total", (("kind", "blob"),)): 1,
               ("docxy_cache_misses_total", (("kind", "manifest"),)): 3}
    hits = hits_section(samples)
    assert (hits["hits"], hits["misses"], hits["ratio"]) == (4, 4, 0.5)
    assert hits["by_kind"]["blob"] == {"hits": 3, "misses": 1, "ratio": 0.75}
    assert hits_section({})["ratio"] is None


def test_top_repositories_sum_pulls_per_repository_without_an_index_s_own_images():
    """Pulls are summed per registry and repository as `docxy cache ls` counts them: the
    GET of an image an index names is part of the index's pull; ties go by name."""
    records = [
        (("docker.io", "library/alpine", "sha256:a1"), Usage(3, 100.0)),
        (("docker.io", "library/alpine", "sha256:a2"), Usage(1, 300.0)),
        (("docker.io", "library/multi", "sha256:index"), Usage(2, 50.0)),
        (("docker.io", "library/multi", "sha256:amd64"), Usage(2, 50.0)),
        (("ghcr.io", "org/app", "sha256:b"), Usage(2, 40.0)),
        (("ghcr.io", "org/warm", "sha256:w"), Usage(0, 10.0)),  # warmed, never pulled
    ]
    top = top_repositories(records, {"sha256:amd64"}, {"docker.io": "docker.io"})
    assert top == [
        {"registry": "docker.io", "repository": "library/alpine", "pulls": 4, "last_pull": 300.0},
        {"registry": "docker.io", "repository": "library/multi", "pulls": 2, "last_pull": 50.0},
        {"registry": "ghcr.io", "repository": "org/app", "pulls": 2, "last_pull": 40.0},
    ]
    assert len(top_repositories(records, set(), {}, limit=1)) == 1


def test_downloads_and_warmups_as_the_page_lists_them():
    """A download's bytes so far, on disk and announced; warm-ups newest first."""
    fill = SimpleNamespace(digest="sha256:f", received=700, durable=600, length=1000,
                           source=Source.UPSTREAM)
    assert downloads_section([fill]) == [{"digest": "sha256:f", "received": 700, "stored": 600,
                                          "length": 1000, "source": "upstream"}]
    jobs = [Job("docker.io/a:1", 1.0, state="done"), Job("docker.io/b:2", 2.0, layers=3)]
    assert [j["ref"] for j in warmups_section(jobs)] == ["docker.io/b:2", "docker.io/a:1"]
    assert warmups_section(jobs)[0]["layers"] == 3


def test_upstreams_carry_ratelimit_answer_token_service_and_readiness():
    """The last ratelimit-remaining from the gauge; None where nothing was seen yet."""
    metrics = Metrics()
    metrics.upstream_answered("docker.io", 0.1, _headers(b"ratelimit-remaining", b"76;w=21600"))
    metrics.upstream_failed("ghcr.io")
    readiness = {"upstreams": {"docker.io": {"ok": True, "status": 401},
                               "ghcr.io": {"ok": False, "error": "upstream unreachable"}}}
    rows = upstreams_section(["docker.io", "ghcr.io", "quay.io"], collect(metrics.registry),
                             readiness)
    assert [(r["name"], r["ratelimit_remaining"], r["up"], r["ready"]) for r in rows] == [
        ("docker.io", 76, True, True), ("ghcr.io", None, False, False),
        ("quay.io", None, None, None)]
    assert rows[1]["readiness"]["error"] == "upstream unreachable"


def _headers(name: bytes, value: bytes):
    return Headers({name: [value]})


def test_the_history_series_ends_with_the_document_s_own_moment():
    """The kept samples and the counters now: the newest interval runs up to now."""
    samples = {("docxy_cache_hits_total", (("kind", "blob"),)): 4,
               ("docxy_cache_misses_total", (("kind", "blob"),)): 1}
    doc = document(samples, 120.0, history=[Sample(0), Sample(60, hits=1, misses=1)], every=60)
    assert doc["history"]["series"]["t"] == [60, 120]
    assert doc["history"]["series"]["hit_ratio"] == [0.5, 1.0]
    assert doc["history"]["every"] == 60
    assert document({}, 5.0)["history"]["series"]["t"] == []


class _Ready:
    def __init__(self, report):
        self.report = report

    def check(self):
        return defer.succeed(self.report)


def _cached_site(tmp_path, data: bytes):
    digest = digest_of(data)

    def respond(method, url, headers, body):
        if method == b"HEAD":
            return FakeResponse(200, {b"content-length": str(len(data)).encode()}, length=0)
        return FakeResponse(200, {b"ratelimit-remaining": b"99;w=21600"}, body=data)

    site, _, clock = make_site(hub_config(cache_dir=str(tmp_path / "c")), FakeUpstream(respond),
                               with_cache=True)
    ctx = site.resource._prefixes[b"/v2/"].context
    ctx.metrics.watch_cache(ctx.blobs, ctx.manifests)
    ctx.metrics.watch_upstreams(ctx.proxies)
    report = {"status": "ready", "ready": True,
              "upstreams": {"docker.io": {"ok": True, "status": 401}}}
    return site, attrs.evolve(ctx, readiness=_Ready(report)), clock, digest


def test_the_document_s_numbers_are_what_a_scrape_says(tmp_path):
    """After a cold and a warm pull of a blob, the document's hit ratio, bytes by source,
    cache use and counts equal the values /metrics exports."""
    data = b"layer" * 2000
    site, ctx, clock, digest = _cached_site(tmp_path, data)
    for _ in range(2):
        assert get(site, f"/v2/x/blobs/{digest}").response()[2] == data
    ctx.metrics.upstream_answered("docker.io", 0.1, _headers(b"ratelimit-remaining", b"99"))
    pulls = PullLog(tmp_path / "usage.json", clock)
    pulls.pulled("docker.io", "library/x", "sha256:m")
    pulls.pulled("docker.io", "library/x", "sha256:m")
    history = History(lambda: {}, clock)
    source = StatusSource(ctx, history, pulls, None, {"docker.io": "docker.io"},
                          disk_usage=lambda path: SimpleNamespace(total=10 << 30))
    doc = defer.ensureDeferred(source.document()).result
    scraped = scrape(ctx.metrics)

    def s(name, **labels):
        return scraped.get((name, tuple(sorted(labels.items()))), 0.0)

    hits = s("docxy_cache_hits_total", kind="blob") + s("docxy_cache_hits_total", kind="manifest")
    misses = (s("docxy_cache_misses_total", kind="blob")
              + s("docxy_cache_misses_total", kind="manifest"))
    assert (hits, misses) == (1, 1)
    assert doc["hits"]["ratio"] == hits / (hits + misses) == 0.5
    assert doc["bytes"] == {"cache": s("docxy_sent_bytes_total", source="cache"),
                            "upstream": s("docxy_sent_bytes_total", source="upstream")}
    assert doc["bytes"]["cache"] == len(data)
    assert doc["cache"]["used"] == s("docxy_cache_size_bytes") == len(data)
    assert doc["cache"]["entries"] == s("docxy_cache_entries")
    assert doc["cache"]["bound"] == 10 << 30 and doc["cache"]["bound_is"] == "disk"
    assert doc["in_flight"] == s("docxy_upstream_fetches_in_flight") == 0
    assert doc["top"] == [{"registry": "docker.io", "repository": "library/x", "pulls": 2,
                           "last_pull": None}]  # the Clock's time 0 is "never"
    [upstream] = doc["upstreams"]
    assert upstream["ratelimit_remaining"] == s("docxy_upstream_ratelimit_remaining",
                                                registry="docker.io") == 99
    assert upstream["token_service_up"] is True and upstream["ready"] is True
    assert doc["ready"] == {"status": "ready", "ready": True}
    json.dumps(doc)  # JSON as it is


def test_a_download_in_flight_is_listed_with_its_progress(tmp_path):
    """While a blob downloads, it is listed with the bytes received of its length, and the
    count is the /metrics gauge."""
    data = b"z" * 10_000
    digest = digest_of(data)
    upstream, responses = blob_upstream(data, auto=False)
    site, _, clock = make_site(hub_config(cache_dir=str(tmp_path / "c")), upstream,
                               with_cache=True)
    ctx = site.resource._prefixes[b"/v2/"].context
    ctx.metrics.watch_cache(ctx.blobs, ctx.manifests)
    ctx = attrs.evolve(ctx, readiness=_Ready({"upstreams": {}}))
    get(site, f"/v2/x/blobs/{digest}")
    responses[-1].protocol.dataReceived(data[:4000])
    clock.advance(0)  # the download takes what arrived
    doc = defer.ensureDeferred(StatusSource(ctx).document()).result
    assert doc["in_flight"] == scrape(ctx.metrics)[("docxy_upstream_fetches_in_flight", ())] == 1
    [row] = doc["downloads"]
    assert (row["digest"], row["length"], row["source"]) == (digest, len(data), "upstream")
    assert row["received"] == 4000
    responses[-1].protocol.dataReceived(data[4000:])
    responses[-1].end()
    clock.advance(0)
    assert defer.ensureDeferred(StatusSource(ctx).document()).result["downloads"] == []


def _admin_site(status=None, users=None):
    admin = Admin(SimpleNamespace(), None, None, users, status=status)
    return DocxySite(admin_resource(admin, Metrics(), StatusPage(admin)), Clock())


def test_the_page_is_one_small_self_contained_document():
    """`GET /` answers the HTML with a policy that admits only its own script and style
    and requests to itself; nothing in it names another host; HEAD sends no body."""
    ex = Exchange(_admin_site())
    ex.send("GET", "/")
    status, headers, body = ex.response()
    assert status == 200 and body == BODY
    assert headers[b"content-type"] == [b"text/html; charset=utf-8"]
    assert headers[b"content-security-policy"] == [CSP]
    assert b"default-src 'none'" in CSP and b"connect-src 'self'" in CSP
    assert len(BODY) < 30 * 1024
    text = BODY.decode()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", text)
    # the SVG namespace is a name, never fetched
    assert set(re.findall(r"[a-z]+://[^\s\"'<>]*", text)) == {"http://www.w3.org/2000/svg"}
    assert "url(" not in text and "@import" not in text and "import(" not in text
    for element in ("hit-ratio", "cache-used", "bytes-cache", "bytes-upstream", "plot-ratio",
                    "plot-bytes", "plot-used", "downloads", "top", "upstreams", "warmups"):
        assert f'id="{element}"' in text
    head = Exchange(_admin_site())
    head.send("HEAD", "/")
    assert head.response()[0] == 200 and head.response()[2] == b""


def test_the_status_resource_answers_an_awaitable_document():
    """/api/v1/status waits for a document that needs the readiness check."""
    later = defer.Deferred()
    ex = Exchange(_admin_site(status=lambda: later))
    ex.send("GET", "/api/v1/status")
    assert ex.transport.value() == b""
    later.callback({"now": 1.0})
    status, headers, body = ex.response()
    assert status == 200 and json.loads(body) == {"now": 1.0}


def test_the_page_asks_the_admin_users_password():
    """With --admin-htpasswd the page, like the API, wants a user's password."""
    users = SimpleNamespace(verify=lambda user, password: defer.succeed(False))
    ex = Exchange(_admin_site(users=users))
    ex.send("GET", "/")
    status, headers, _ = ex.response()
    assert status == 401 and headers[b"www-authenticate"] == [b'Basic realm="docxy admin"']


def _walk(svc):
    yield svc
    for child in getattr(svc, "services", ()):
        yield from _walk(child)


def test_build_admin_wires_the_page_the_document_and_the_sampler(tmp_path):
    """With --admin-listen the admin site serves the page at / and /api/v1/status from a
    StatusSource, and one History samples the daemon's counters."""
    options = Options(environ={"XDG_CACHE_HOME": str(tmp_path)})
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--cache-dir",
                          str(tmp_path / "c"), "--admin-listen", "tcp:0:interface=127.0.0.1"])
    services = list(_walk(makeService(options, reactor=Clock())))
    [history] = [s for s in services if isinstance(s, History)]
    [site] = [s.factory for s in services if isinstance(getattr(s, "factory", None), DocxySite)
              and b"/api/v1/status" in s.factory.resource._routes]
    routes = site.resource._routes
    assert isinstance(routes[b"/"], StatusPage)
    assert routes[b"/api/v1/status"].admin.status.__self__.__class__ is StatusSource
    history.startService()
    [first] = history.samples()
    assert (first.hits, first.used) == (0, 0)
    history.stopService()
