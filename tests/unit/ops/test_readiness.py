"""Readiness in memory: /ready and /health?deep=1 ask every upstream and the cache
directory, answer 503 with the same report when not ready, bound the upstream check, and
share one check among many probes; plain /health never asks anyone."""
import json

from twisted.internet import defer

from docxy.ops.readiness import cache_check
from docxy.upstream.errors import UpstreamError
from docxy.web.site import DocxySite, redirect_resource

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site


def probe(site, path, method="GET"):
    ex = Exchange(site)
    ex.send(method, path)
    return ex


def report_of(ex):
    status, _, body = ex.response()
    return status, json.loads(body)


def context_of(site):
    return site.resource._prefixes[b"/v2/"].context


class Upstream(FakeUpstream):
    """Answers /v2/ pings from `answers` (a response, an exception, or a Deferred)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    async def request(self, method, url, headers, body=None, follow_redirects=True):
        self.calls.append((method, url, headers, body))
        answer = self.answer() if callable(self.answer) else self.answer
        if isinstance(answer, defer.Deferred):
            answer = await answer
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_ready_when_upstream_challenges_and_cache_takes_files(tmp_path):
    """A 401 from /v2/ means the registry is up: ready, 200, with every part reported."""
    upstream = Upstream(lambda: FakeResponse(401, body=b"{}"))
    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "c")), upstream, with_cache=True)
    status, report = report_of(probe(site, "/ready"))
    assert status == 200 and report["ready"] is True and report["status"] == "ready"
    assert report["upstreams"]["docker.io"]["ok"] and report["upstreams"]["docker.io"]["status"] == 401
    assert report["cache"] == {"ok": True, "enabled": True, "dir": str(tmp_path / "c")}
    assert [c[1] for c in upstream.calls] == ["https://registry.test/v2/"]
    assert list((tmp_path / "c").glob(".ready-*")) == []  # the test file is removed


def test_not_ready_when_upstream_is_down():
    """An unreachable upstream: 503 with the same report, naming what failed."""
    site, _, _ = make_site(upstream=Upstream(UpstreamError(502, "UNAVAILABLE", "upstream unreachable")))
    status, report = report_of(probe(site, "/ready"))
    assert status == 503 and report["ready"] is False and report["status"] == "not ready"
    assert report["upstreams"]["docker.io"] == {"ok": False, "error": "upstream unreachable"}


def test_upstream_errors_other_than_401_are_not_ready():
    """A 5xx (or 404) from /v2/ is not a working registry."""
    site, _, _ = make_site(upstream=Upstream(lambda: FakeResponse(503, body=b"{}")))
    status, report = report_of(probe(site, "/ready"))
    assert status == 503 and report["upstreams"]["docker.io"]["status"] == 503


def test_a_silent_upstream_is_given_five_seconds():
    """An upstream that never answers makes the probe 503 after 5 s, not after the 60 s
    header timeout."""
    site, _, clock = make_site(upstream=Upstream(lambda: defer.Deferred()))
    ex = probe(site, "/ready")
    assert ex.transport.value() == b""
    clock.advance(5)
    status, report = report_of(ex)
    assert status == 503 and "no answer within 5s" in report["upstreams"]["docker.io"]["error"]


def test_many_probes_share_one_check_and_reuse_it_briefly():
    """Probes arriving together wait for one upstream check; for 5 s after it, probes
    get its result without asking again."""
    pending = []

    def answer():
        d = defer.Deferred()
        pending.append(d)
        return d

    upstream = Upstream(answer)
    site, _, clock = make_site(upstream=upstream)
    flood = [probe(site, "/ready") for _ in range(20)] + [probe(site, "/health?deep=1")]
    assert len(upstream.calls) == 1
    pending[0].callback(FakeResponse(200, body=b"{}"))
    assert all(ex.response()[0] == 200 for ex in flood)
    clock.advance(4)
    assert probe(site, "/ready").response()[0] == 200 and len(upstream.calls) == 1
    clock.advance(2)
    probe(site, "/ready")
    assert len(upstream.calls) == 2


def test_unwritable_cache_dir_is_not_ready(tmp_path):
    """A cache directory that cannot take a new file (gone, or not a directory) is not ready."""
    assert cache_check(str(tmp_path))["ok"] is True
    assert cache_check(str(tmp_path / "gone"))["ok"] is False
    (tmp_path / "file").write_text("x")
    assert cache_check(str(tmp_path / "file"))["ok"] is False
    assert cache_check(None) == {"ok": True, "enabled": False}


def test_cache_dir_removed_while_running_makes_probe_503(tmp_path):
    """The cache directory vanishing under the daemon shows in /ready."""
    import shutil

    upstream = Upstream(lambda: FakeResponse(200, body=b"{}"))
    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "c")), upstream, with_cache=True)
    shutil.rmtree(tmp_path / "c")
    status, report = report_of(probe(site, "/ready"))
    assert status == 503 and report["cache"]["ok"] is False and report["upstreams"]["docker.io"]["ok"]


def test_plain_health_stays_local_and_deep_health_checks():
    """/health answers 200 without asking the upstream even when it is down;
    /health?deep=1 runs the readiness check and answers 503 with its report."""
    upstream = Upstream(UpstreamError(502, "UNAVAILABLE", "upstream unreachable"))
    site, _, _ = make_site(upstream=upstream)
    status, report = report_of(probe(site, "/health"))
    assert status == 200 and report["status"] == "ok" and upstream.calls == []
    status, report = report_of(probe(site, "/health?deep=1"))
    assert status == 503 and report["status"] == "not ready"
    assert report["registries"] == ["docker.io"] and report["ready"]["ready"] is False


def test_head_probe_gets_the_status_without_body():
    """HEAD /ready answers the same status with an empty body."""
    site, _, _ = make_site(upstream=Upstream(lambda: FakeResponse(401, body=b"{}")))
    status, headers, body = probe(site, "/ready", "HEAD").response()
    assert status == 200 and body == b"" and int(headers[b"content-length"][0]) > 0


def test_probes_answer_on_the_redirecting_listener():
    """With TLS on, the plain listener answers /health and /ready itself and redirects
    the rest."""
    api, _, clock = make_site(upstream=Upstream(lambda: FakeResponse(401, body=b"{}")))
    context = context_of(api)
    site = DocxySite(redirect_resource(context.config, (), 443, context), clock, context.metrics)
    assert report_of(probe(site, "/ready"))[0] == 200
    assert report_of(probe(site, "/health?deep=1"))[1]["ready"]["ready"] is True
    assert probe(site, "/health").response()[0] == 200
    assert probe(site, "/v2/").response()[0] == 301
