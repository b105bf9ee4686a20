"""The blob cache under faults, against the Hub-like upstream: docxy killed mid-download,
eviction under a size bound while clients read, cached private content kept from clients
the upstream would refuse, and ranges answered from a cached blob."""
from __future__ import annotations

import base64
import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from harness.daemon import Docxy, cached_blob, mirror_args
from harness.procs import poll_until

pytestmark = pytest.mark.integration

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


# --- helpers ------------------------------------------------------------------------------





def _token(docxy: Docxy, repository: str, creds: tuple[str, str] | None = None) -> str:
    headers = {}
    if creds:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    query = urlencode({"scope": f"repository:{repository}:pull"})
    status, _, body = docxy.request(f"/auth/token?{query}", headers)
    assert status == 200, f"token for {repository}: {status} {body[:200]!r}"
    return json.loads(body)["token"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _pull_blob(docxy: Docxy, name: str, digest: str, token: str) -> bytes:
    status, headers, body = docxy.request(f"/v2/{name}/blobs/{digest}", _bearer(token))
    assert status == 200, f"GET {name}@{digest}: {status} {body[:200]!r}"
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return body


def _stream_blob(docxy: Docxy, name: str, digest: str, token: str, out: dict,
                 pause: float = 0.0, go_fast: threading.Event | None = None,
                 chunk: int = 64 * 1024) -> None:
    """Docxy.stream of a blob with the client's token, 64 KiB reads by default."""
    docxy.stream(f"/v2/{name}/blobs/{digest}", _bearer(token), out, pause, chunk, go_fast)


def _blobs_total(cache: Path) -> int:
    total = 0
    for path in (cache / "blobs").rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _partials(cache: Path) -> list[Path]:
    partial = cache / "partial"
    return sorted(partial.iterdir()) if partial.exists() else []


def _large_layer(upstream):
    return max(upstream.images.large.manifest.layers, key=lambda b: b.size)


# --- 1. killed mid-download -----------------------------------------------------------------

def test_sigkill_mid_download_leaves_no_partial_blob(upstream, tmp_path):
    """After SIGKILL mid-download, a restart empties partial/, holds no blob, and re-pulls and caches it."""
    layer = _large_layer(upstream)
    cache = tmp_path / "cache"
    docxy = Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache))
    # The download runs at the upstream's pace whatever the client does: slow the CDN
    # (1 MB/s) so that it is surely mid-way when docxy is killed.
    upstream.restart_cdn("slow")
    reader: threading.Thread | None = None
    try:
        docxy.start()
        token = _token(docxy, "large")
        out: dict = {}
        reader = threading.Thread(target=_stream_blob,
                                  args=(docxy, "large", layer.digest, token, out, 0.05),
                                  daemon=True)
        reader.start()
        partial = poll_until(
            lambda: [p for p in _partials(cache) if p.stat().st_size >= 2 << 20], 30)
        assert len(partial) == 1, f"expected one partial download, found {partial}"
        assert not cached_blob(cache, layer.digest).exists(), "blob stored before it was complete"

        docxy.process.send_signal(signal.SIGKILL)
        poll_until(lambda: not docxy.process.running(), 10)
        docxy.stop()  # reap and clean its process group
        assert docxy.process.returncode == -signal.SIGKILL
        reader.join(30)
        assert not reader.is_alive()
        assert out.get("digest") != layer.digest, "the client got a whole blob from a killed docxy"
        assert out["read"] < layer.size
        # SIGKILL leaves the partial file behind: it is the restart that must remove it.
        assert partial[0].exists()

        upstream.restart_cdn("ok")
        docxy.start()
        assert _partials(cache) == [], f"partial/ not emptied at start: {_partials(cache)}"
        assert not cached_blob(cache, layer.digest).exists(), "a partial download became a blob"
        assert "partial downloads left" in docxy.log()

        token = _token(docxy, "large")
        again: dict = {}
        _stream_blob(docxy, "large", layer.digest, token, again, chunk=1 << 20)
        assert "error" not in again, again
        assert again["status"] == 200
        assert again["digest"] == layer.digest
        stored = cached_blob(cache, layer.digest)
        assert stored.exists() and stored.stat().st_size == layer.size
        assert _partials(cache) == []
    finally:
        docxy.stop()
        if upstream.cdn.mode != "ok" or not upstream.cdn.running():
            upstream.restart_cdn("ok")
        if reader is not None:
            reader.join(30)


# --- 2. eviction under a bound ----------------------------------------------------------------

def _small_blobs(upstream) -> list[tuple[str, str, int]]:
    """(name as a client types it, digest, size) of every blob except the large layer."""
    large = _large_layer(upstream)
    seen: dict[str, tuple[str, str, int]] = {}
    images = upstream.images
    for image in (images.alpine, images.namespaced, images.nested, images.multiarch,
                  images.oci_index, images.paginated, images.large):
        for blob in image.blobs:
            if blob.digest != large.digest:
                seen.setdefault(blob.digest, (image.short_name, blob.digest, blob.size))
    return list(seen.values())


def test_eviction_keeps_the_bound_and_spares_a_blob_being_read(upstream, tmp_path):
    """blobs/ stays within --cache-max-size after every pull, LRU first, sparing a blob being read."""
    layer = _large_layer(upstream)
    smalls = _small_blobs(upstream)
    small_total = sum(size for _, _, size in smalls)
    # The other images' blobs are a few hundred bytes each: a margin of a third of their
    # total (not 1 MiB, which they would never fill) makes eviction necessary.
    margin = max(small_total // 3, max(size for _, _, size in smalls))
    assert small_total > 2 * margin
    bound = layer.size + margin
    cache = tmp_path / "cache"
    tokens: dict[str, str] = {}

    def token(name: str) -> str:
        if name not in tokens:
            tokens[name] = _token(docxy, name)
        return tokens[name]

    def check_bound(what: str) -> None:
        total = _blobs_total(cache)
        assert total <= bound, f"after {what}: {total} bytes under blobs/ > bound {bound}"

    with Docxy(tmp_path / "docxy", mirror_args(upstream, "--cache-max-size", str(bound), cache=cache)) as docxy:
        # Phase 1: the large layer, then small blobs until it has to go.
        _pull_blob(docxy, "large", layer.digest, token("large"))
        assert cached_blob(cache, layer.digest).exists()
        check_bound("the large layer")
        for name, digest, _ in smalls:
            _pull_blob(docxy, name, digest, token(name))
            check_bound(f"{name}@{digest}")
            assert cached_blob(cache, digest).exists(), "the blob just pulled was evicted"
        assert not cached_blob(cache, layer.digest).exists(), \
            "the least recently used blob (the large layer) was not evicted"

        # Phase 2: the large layer again (it evicts the small ones), then a slow reader of
        # it from the cache while other pulls need eviction.
        _pull_blob(docxy, "large", layer.digest, token("large"))
        large_file = cached_blob(cache, layer.digest)
        assert large_file.exists()
        check_bound("the large layer again")
        go_fast = threading.Event()
        out: dict = {}
        reader = threading.Thread(
            target=_stream_blob,
            args=(docxy, "large", layer.digest, token("large"), out, 0.02, go_fast),
            daemon=True)
        reader.start()
        try:
            poll_until(lambda: out.get("read", 0) >= 1 << 20, 20)
            pulled: list[str] = []
            for name, digest, _ in smalls:
                _pull_blob(docxy, name, digest, token(name))
                pulled.append(digest)
                check_bound(f"{name}@{digest} during the slow read")
                assert large_file.exists(), "the large layer was evicted while a client reads it"
                assert cached_blob(cache, digest).exists(), "the blob just pulled was evicted"
            evicted_meanwhile = [d for d in pulled if not cached_blob(cache, d).exists()]
            assert reader.is_alive() and out["read"] < layer.size, \
                "the slow reader finished before the other pulls: nothing was tested"
            assert evicted_meanwhile, "no eviction was needed during the slow read"
        finally:
            go_fast.set()
            reader.join(60)
        assert not reader.is_alive()
        assert "error" not in out, out
        assert out["status"] == 200
        assert out["read"] == layer.size
        assert out["digest"] == layer.digest
        assert large_file.exists()
        check_bound("the slow read")


# --- 3. private repository ------------------------------------------------------------------

def test_cached_private_content_needs_the_upstreams_yes(upstream, tmp_path):
    """Cached private content is 401 without a token or with an anonymous one, 200 for alice."""
    image = upstream.images.private
    name = image.repository  # private/secret
    blob = image.manifest.layers[0]
    cache = tmp_path / "cache"
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        alice = _bearer(_token(docxy, name, upstream.user))
        manifest_by_tag = f"/v2/{name}/manifests/{image.tag}"
        manifest_by_digest = f"/v2/{name}/manifests/{image.digest}"
        accept = {"Accept": MANIFEST_ACCEPT}

        status, headers, body = docxy.request(manifest_by_tag, {**alice, **accept})
        assert status == 200, body[:300]
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
        for b in image.blobs:
            _pull_blob(docxy, name, b.digest, alice["Authorization"].split(" ", 1)[1])
        assert cached_blob(cache, image.digest).exists(), "the manifest was not cached"
        for b in image.blobs:
            assert cached_blob(cache, b.digest).exists(), f"{b.digest} was not cached"

        anonymous = _bearer(_token(docxy, name))
        for who, auth in (("no token", {}), ("an anonymous token", anonymous)):
            for path in (manifest_by_digest, manifest_by_tag):
                status, headers, body = docxy.request(path, {**auth, **accept})
                assert status == 401, f"{who}: {path} answered {status}: {body[:300]!r}"
                assert "www-authenticate" in headers, f"{who}: {path} without a challenge"
                assert image.manifest.body not in body
            status, headers, body = docxy.request(f"/v2/{name}/blobs/{blob.digest}", auth)
            assert status == 401, f"{who}: blob answered {status}: {body[:300]!r}"
            assert blob.data is None or blob.data not in body

        for path in (manifest_by_digest, manifest_by_tag):
            status, headers, body = docxy.request(path, {**alice, **accept})
            assert status == 200, f"alice: {path} answered {status}"
            assert headers["Docker-Content-Digest"] == image.digest
            assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
        _pull_blob(docxy, name, blob.digest, alice["Authorization"].split(" ", 1)[1])


# --- 4. ranges on a cached blob -------------------------------------------------------------

def test_ranges_of_a_cached_blob(upstream, tmp_path):
    """A cached blob answers 0-99 and -100 with 206 and the right bytes, bytes=<size>- with 416."""
    image = upstream.images.namespaced
    blob = max(image.blobs, key=lambda b: b.size)
    cache = tmp_path / "cache"
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        token = _token(docxy, image.short_name)
        data = _pull_blob(docxy, image.short_name, blob.digest, token)
        size = len(data)
        assert size == blob.size and size > 200
        assert cached_blob(cache, blob.digest).exists()
        time.sleep(1)  # let nginx log the first download
        cdn_before = len(upstream.cdn_log_entries())
        path = f"/v2/{image.short_name}/blobs/{blob.digest}"

        status, headers, body = docxy.request(path, {**_bearer(token), "Range": "bytes=0-99"})
        assert status == 206
        assert body == data[:100]
        assert headers["Content-Range"] == f"bytes 0-99/{size}"
        assert headers["Content-Length"] == "100"

        status, headers, body = docxy.request(path, {**_bearer(token), "Range": "bytes=-100"})
        assert status == 206
        assert body == data[-100:]
        assert headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"

        status, headers, body = docxy.request(path, {**_bearer(token), "Range": f"bytes={size}-"})
        assert status == 416
        assert headers["Content-Range"] == f"bytes */{size}"
        assert body == b""

        time.sleep(1)
        assert len(upstream.cdn_log_entries()) == cdn_before, "a range of a cached blob went upstream"
