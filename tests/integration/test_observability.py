"""Observability of the real daemon: after pulls through docxy, /metrics shows the request
and cache counters; `--log-format json` writes one JSON line per request with its fields
and no secret; /ready answers 503 while the upstream is down, also on the plain listener."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from harness.clients import Skopeo
from harness.daemon import Docxy, mirror_args
from harness.procs import free_port, poll_until
from harness.upstream import Upstream
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)


@pytest.fixture(scope="module")
def small_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A Hub-like upstream of its own (small large layer): these tests stop its registry."""
    up = Upstream.start(tmp_path_factory.mktemp("obs-up"), large_layer_size=4 << 20)
    try:
        yield up
    finally:
        up.stop()


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    status, body, headers = _get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _access_events(docxy: Docxy) -> list[dict]:
    events = []
    for line in docxy.log().splitlines():
        if line.strip() and not line.startswith("--- "):  # the harness's own markers
            event = json.loads(line)  # every line docxy writes is one JSON object
            if event.get("log_namespace") == "docxy.access":
                events.append(event)
    return events


def test_pulls_show_in_metrics_and_in_json_lines(small_upstream: Upstream, tmp_path: Path):
    """Two skopeo copies of one image: /metrics counts manifest and blob requests, a blob
    miss then hits, bytes from upstream and from the cache, and upstream latency; the JSON
    log has one line per request with its fields and never the token."""
    images = small_upstream.images
    args = mirror_args(small_upstream) + ["--log-format", "json"]
    with Docxy(tmp_path / "docxy", args) as docxy:
        with Skopeo(tmp_path / "skopeo", tls_verify=False) as skopeo:
            for _ in range(2):
                assert skopeo.copy(f"{docxy.host}/alpine:latest").digest == images.alpine.digest
        status, body, _ = _get(f"{docxy.url}/auth/token?scope=repository:alpine:pull")
        token = json.loads(body)["token"]
        assert _get(f"{docxy.url}/v2/alpine/manifests/latest",
                    {"Authorization": f"Bearer {token}",
                     "Accept": ", ".join(MANIFEST_TYPES)})[0] == 200
        for i in range(3):
            assert _get(f"{docxy.url}/no-such-{i}")[0] == 404

        samples = _samples(f"{docxy.url}/metrics")
        assert _value(samples, "docxy_requests_total", endpoint="manifest", status="200") >= 2
        assert _value(samples, "docxy_requests_total", endpoint="blob", status="200") >= 2
        assert _value(samples, "docxy_requests_total", endpoint="token", status="200") >= 1
        assert _value(samples, "docxy_requests_total", endpoint="other", status="404") == 3
        assert _value(samples, "docxy_cache_misses_total", kind="blob") >= 1
        assert _value(samples, "docxy_cache_hits_total", kind="blob") >= 1
        assert _value(samples, "docxy_sent_bytes_total", source="upstream") > 0
        assert _value(samples, "docxy_sent_bytes_total", source="cache") > 0
        assert _value(samples, "docxy_cache_size_bytes") > 0
        assert _value(samples, "docxy_cache_entries") >= 2
        assert _value(samples, "docxy_upstream_response_seconds_count", registry="docker.io") > 0
        assert not any("alpine" in str(key) for key in samples)  # never a repository label

        events = poll_until(lambda: [e for e in _access_events(docxy)
                                     if e["endpoint"] == "metrics"] and _access_events(docxy), 10)
        assert [e["path"] for e in events if e["path"].startswith("/no-such-")] == \
            ["/no-such-0", "/no-such-1", "/no-such-2"]
        pulls = [e for e in events if e["endpoint"] == "blob" and e["status"] == 200]
        assert pulls and {e["source"] for e in pulls} == {"upstream", "cache"}
        blob = pulls[0]
        assert blob["registry"] == "docker.io" and blob["repository"] == "library/alpine"
        assert blob["reference"].startswith("sha256:") and blob["method"] == "GET"
        assert blob["client"] == "127.0.0.1" and blob["bytes"] > 0 and blob["duration"] >= 0
        assert {"user", "error", "status"} <= set(blob)
        assert token not in docxy.log() and "Bearer" not in docxy.log()


def test_metrics_listen_moves_metrics_off_the_api(small_upstream: Upstream, tmp_path: Path):
    """With --metrics-listen, /metrics answers there (Prometheus text) and 404 on the API."""
    port = free_port()
    args = mirror_args(small_upstream) + ["--no-cache",
                                    "--metrics-listen", f"tcp:{port}:interface=127.0.0.1"]
    with Docxy(tmp_path / "docxy", args) as docxy:
        assert _get(f"{docxy.url}/v2/")[0] == 401
        samples = _samples(f"http://127.0.0.1:{port}/metrics")
        assert _value(samples, "docxy_requests_total", endpoint="ping", status="401") == 1
        assert _get(f"{docxy.url}/metrics")[0] == 404
        assert _get(f"http://127.0.0.1:{port}/v2/")[0] == 404


def test_ready_is_503_while_the_upstream_is_down(small_upstream: Upstream, tmp_path: Path):
    """/ready and /health?deep=1 answer 200 with the upstream up, 503 with the same report
    while it is down, and 200 again once it is back; plain /health stays 200 throughout.
    With TLS on, the plain listener answers the probes itself."""
    up = small_upstream
    cert = up.intermediate_ca.issue_server("docxy-obs", ["127.0.0.1"])
    args = mirror_args(up) + ["--connect-timeout", "3"]
    with Docxy(tmp_path / "docxy", args, tls=(cert.chain_path, cert.key_path)) as docxy:
        probe = docxy.plain_url  # the redirecting listener
        status, body, _ = _get(f"{probe}/ready")
        assert status == 200, body
        report = json.loads(body)
        assert report["ready"] and report["upstreams"]["docker.io"]["status"] == 401
        assert report["cache"]["ok"] and report["cache"]["enabled"]
        assert _get(f"{probe}/health?deep=1")[0] == 200
        up.stop_registry()
        try:
            status, body, _ = poll_until(
                lambda: (r := _get(f"{probe}/ready"))[0] == 503 and r, 30, interval=0.5)
            report = json.loads(body)
            assert report["ready"] is False and report["upstreams"]["docker.io"]["ok"] is False
            assert report["upstreams"]["docker.io"]["error"]
            assert _get(f"{probe}/health?deep=1")[0] == 503
            assert _get(f"{probe}/health")[0] == 200
        finally:
            up.start_registry()
        poll_until(lambda: _get(f"{probe}/ready")[0] == 200, 30, interval=0.5)
