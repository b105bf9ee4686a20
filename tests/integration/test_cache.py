"""The blob cache against the Hub-like upstream: concurrent cold pulls make one CDN
download, a second pull never leaves the box, and a corrupt upstream blob is never cached."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from harness.clients import Skopeo
from harness.daemon import Docxy
from harness.procs import poll_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cached_docxy(upstream, tmp_path):
    args = ["--upstream", upstream.registry_url, "--upstream-ca", str(upstream.ca_path),
            "--library", "--cache-dir", str(tmp_path / "cache")]
    with Docxy(tmp_path / "docxy", args) as daemon:
        yield daemon


def _token(docxy: Docxy, repository: str) -> str:
    with urllib.request.urlopen(f"{docxy.url}/auth/token?scope=repository:{repository}:pull", timeout=30) as r:
        return json.loads(r.read())["token"]


def _blob_downloads(upstream, digest: str) -> list[dict]:
    hex_part = digest.split(":")[1]
    return [e for e in upstream.cdn_log_entries()
            if hex_part in e["uri"] and e["method"] == "GET" and e["status"] in (200, 206)]


def _pull_blob(url: str, token: str, results: list, index: int, pause: float = 0.0) -> None:
    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                if pause:
                    time.sleep(pause)
        results[index] = "sha256:" + h.hexdigest()
    except Exception as e:  # recorded, asserted by the test
        results[index] = e


def test_concurrent_cold_pulls_make_one_upstream_download(upstream, cached_docxy):
    """Ten clients pull the large layer at once (one of them crawling): the CDN serves it
    once, every client gets the right digest, and docxy's memory stays bounded."""
    layer = max(upstream.images.large.manifest.layers, key=lambda b: b.size)
    token = _token(cached_docxy, "large")
    url = f"{cached_docxy.url}/v2/large/blobs/{layer.digest}"
    before = len(_blob_downloads(upstream, layer.digest))
    baseline = cached_docxy.rss_bytes()
    results: list = [None] * 10
    threads = [threading.Thread(target=_pull_blob, args=(url, token, results, i, 0.05 if i == 0 else 0.0))
               for i in range(10)]
    for t in threads:
        t.start()
    peak = baseline
    while any(t.is_alive() for t in threads[1:]):
        peak = max(peak, cached_docxy.rss_bytes())
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=600)
    assert results == [layer.digest] * 10
    poll_until(lambda: len(_blob_downloads(upstream, layer.digest)) > before, 10)
    assert len(_blob_downloads(upstream, layer.digest)) - before == 1
    assert peak - baseline < 100 * 1024**2, f"docxy grew by {(peak - baseline) / 2**20:.0f} MB"


def test_second_pull_is_served_from_cache(upstream, cached_docxy, tmp_path):
    """skopeo copies an image twice; the second copy fetches no blob from the CDN."""
    image = upstream.images.namespaced
    with Skopeo(tmp_path / "s1", tls_verify=False) as skopeo:
        first = skopeo.copy(f"{cached_docxy.host}/{image.ref}")
        cdn_before = len(upstream.cdn_log_entries())
        time.sleep(1)  # nginx logs after the response; let the first copy's lines land
        cdn_before = len(upstream.cdn_log_entries())
        second = skopeo.copy(f"{cached_docxy.host}/{image.ref}")
    assert first.digest == second.digest == image.digest
    time.sleep(1)
    assert len(upstream.cdn_log_entries()) == cdn_before


def test_corrupt_upstream_blob_is_never_cached(upstream, cached_docxy, tmp_path):
    """The CDN serves wrong bytes for a digest: the client's transfer fails, nothing
    enters the cache, and the next pull (CDN healthy again) fetches and succeeds."""
    layer = upstream.images.nested.manifest.layers[0]
    token = _token(cached_docxy, "deep/er/nested/name/x")
    url = f"{cached_docxy.url}/v2/deep/er/nested/name/x/blobs/{layer.digest}"
    cache_blobs = Path(cached_docxy.workdir).parent / "cache" / "blobs"
    upstream.restart_cdn("corrupt")
    try:
        results: list = [None]
        _pull_blob(url, token, results, 0)
        assert isinstance(results[0], Exception), f"a corrupt blob was delivered: {results[0]}"
        assert not any(p.name == layer.digest.split(":")[1] for p in cache_blobs.rglob("*"))
        assert "digest mismatch" in cached_docxy.log()
    finally:
        upstream.restart_cdn("ok")
    results = [None]
    _pull_blob(url, token, results, 0)
    assert results[0] == layer.digest
    assert (cache_blobs / "sha256" / layer.digest[7:9] / layer.digest[7:]).exists()
