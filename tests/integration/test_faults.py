"""Faults of the world around docxy, made real: the CDN, the registry and its token service
stopped or misbehaving (the Hub-like upstream), an upstream answering 500, 429 or hanging
after its headers (harness.faultserver), a full disk (a small tmpfs as the cache), and the
cache directory removed while docxy runs.  After each, docxy keeps serving.

An upstream dying mid-body without the cache is tests/integration/test_transport.py's
test_upstream_death_mid_blob_fails_the_client; here it dies under the cache."""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from harness.clients import ClientError, Skopeo
from harness.daemon import Docxy, cached_blob, mirror_args
from harness.faultserver import RETRY_AFTER, FaultServer
from harness.procs import poll_until

pytestmark = pytest.mark.integration

DISK_RESERVE = 64 << 20  # docxy.cache.blobs.DISK_RESERVE
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.oci.image.manifest.v1+json"}


# --- helpers ------------------------------------------------------------------------------





def _error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def _token(docxy: Docxy, repository: str) -> str:
    query = urlencode({"scope": f"repository:{repository}:pull"})
    status, _, body = docxy.request(f"/auth/token?{query}")
    assert status == 200, f"token for {repository}: {status} {body[:200]!r}"
    return json.loads(body)["token"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _still_serving(docxy: Docxy) -> None:
    status, _, body = docxy.request("/health", timeout=10)
    assert status == 200, body






def _partials(cache: Path) -> list[Path]:
    partial = cache / "partial"
    return sorted(partial.iterdir()) if partial.exists() else []


def _large_layer(upstream):
    return max(upstream.images.large.manifest.layers, key=lambda b: b.size)


def _registry_gets(upstream, digest: str) -> int:
    return sum(1 for e in upstream.registry_log_entries()
               if e["method"] == "GET" and e["uri"].endswith(f"/blobs/{digest}"))


def _cdn_entries(upstream, digest: str, since: int = 0) -> list[dict]:
    """The CDN's requests for `digest` after its first `since` log entries (other tests
    of the session fetch the same blobs)."""
    hex_part = digest.split(":", 1)[1]
    return [e for e in upstream.cdn_log_entries()[since:] if hex_part in e["uri"]]


# --- the CDN: an expired signed URL -------------------------------------------------------

@pytest.fixture
def cdn_mode(upstream):
    """Switch the session upstream's CDN into a mode; it is healthy again afterwards."""
    def switch(mode: str) -> None:
        upstream.restart_cdn(mode)
    yield switch
    if upstream.cdn.mode != "ok" or not upstream.cdn.running():
        upstream.restart_cdn("ok")


def test_cdn_refusing_an_expired_url_gets_a_fresh_redirect(upstream, cdn_mode, tmp_path):
    """The CDN answers 403 to the first URL: docxy asks the registry again and the pull succeeds."""
    image = upstream.images.namespaced
    blob = max(image.blobs, key=lambda b: b.size)
    cdn_mode("expire-first")
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=tmp_path / "cache")) as docxy:
        token = _token(docxy, image.short_name)
        before = _registry_gets(upstream, blob.digest)
        cdn_before = len(upstream.cdn_log_entries())
        status, headers, body = docxy.request(f"/v2/{image.short_name}/blobs/{blob.digest}",
                                         _bearer(token))
        assert status == 200, body[:300]
        assert _sha256(body) == blob.digest
        assert "Location" not in headers
        poll_until(lambda: any(e["status"] == 200 for e in _cdn_entries(upstream, blob.digest, cdn_before)), 10)
        statuses = [e["status"] for e in _cdn_entries(upstream, blob.digest, cdn_before)]
        assert statuses == [403, 200], f"the CDN saw {statuses}"
        assert poll_until(lambda: _registry_gets(upstream, blob.digest) - before, 10) == 2
        assert cached_blob(tmp_path / "cache", blob.digest).exists()
        _still_serving(docxy)


def test_cdn_refusing_every_url_is_asked_again_only_once(upstream, cdn_mode, tmp_path):
    """A CDN that refuses every URL costs one more redirect, not a loop: a clear 502 JSON error."""
    image = upstream.images.nested
    blob = max(image.blobs, key=lambda b: b.size)
    cdn_mode("forbidden")
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=tmp_path / "cache")) as docxy:
        token = _token(docxy, image.short_name)
        before = _registry_gets(upstream, blob.digest)
        cdn_before = len(upstream.cdn_log_entries())
        status, headers, body = docxy.request(f"/v2/{image.short_name}/blobs/{blob.digest}",
                                         _bearer(token))
        assert status == 502, body[:300]
        assert headers["Content-Type"] == "application/json"
        assert _error_code(body) == "UNAVAILABLE"
        time.sleep(1)  # nginx logs after the answer
        assert _registry_gets(upstream, blob.digest) - before == 2
        assert [e["status"] for e in _cdn_entries(upstream, blob.digest, cdn_before)] == [403, 403]
        assert not cached_blob(tmp_path / "cache", blob.digest).exists()
        _still_serving(docxy)


# --- the CDN dies mid-blob under the cache ------------------------------------------------

def test_upstream_killed_mid_blob_aborts_the_client_and_caches_nothing(upstream, cdn_mode, tmp_path):
    """The CDN killed mid-download: the client's transfer fails, nothing is cached, the next pull works."""
    layer = _large_layer(upstream)
    cache = tmp_path / "cache"
    cdn_mode("slow")  # 1 MB/s: surely mid-way when it is killed
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        token = _token(docxy, "large")
        out: dict = {}
        reader = threading.Thread(target=docxy.stream, daemon=True,
                                  args=(f"/v2/large/blobs/{layer.digest}", _bearer(token), out))
        reader.start()
        poll_until(lambda: out.get("read", 0) >= 1 << 20, 30)
        upstream.cdn.stop()
        reader.join(30)
        assert not reader.is_alive()
        assert out["status"] == 200
        assert "error" in out, f"a cut blob looked complete: {out}"
        assert out["read"] < layer.size
        poll_until(lambda: _partials(cache) == [], 10)
        assert not cached_blob(cache, layer.digest).exists()
        _still_serving(docxy)

        upstream.restart_cdn("ok")
        again: dict = {}
        docxy.stream(f"/v2/large/blobs/{layer.digest}", _bearer(token), again)
        assert "error" not in again, again
        assert again["digest"] == layer.digest
        assert cached_blob(cache, layer.digest).exists()


# --- the token service is down ------------------------------------------------------------

def test_token_service_down_gives_json_errors_and_cached_public_images_still_pull(upstream, tmp_path):
    """With the token service stopped: a token request gets docxy's offline token (so the
    client comes in), a cached public image still pulls with skopeo, an uncached one fails
    with a 503 naming the token service, docxy keeps serving."""
    image, uncached = upstream.images.alpine, upstream.images.nested
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=tmp_path / "cache")) as docxy:
        with Skopeo(tmp_path / "s1", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{docxy.host}/{image.short_name}:{image.tag}").digest == image.digest
        # docxy learns in the background that anyone may pull it; make sure it has, as a
        # client without a token would have made it (else it could not know while the
        # token service is down, and rightly refuses)
        status, _, _ = docxy.request(f"/v2/{image.short_name}/manifests/{image.digest}",
                                     {"Accept": image.media_type})
        assert status == 200
        upstream.token_server.stop()
        try:
            query = urlencode({"scope": f"repository:{uncached.short_name}:pull"})
            status, headers, body = docxy.request(f"/auth/token?{query}")
            assert status == 200 and headers["Content-Type"] == "application/json", body
            offline = json.loads(body)["token"]
            status, headers, body = docxy.request(
                f"/v2/{uncached.short_name}/manifests/{uncached.tag}",
                {"Authorization": f"Bearer {offline}", "Accept": uncached.media_type})
            assert status == 503, body
            error = json.loads(body)["errors"][0]
            assert error["code"] == "UNAVAILABLE" and "token service" in error["message"]
            _still_serving(docxy)

            with Skopeo(tmp_path / "s2", tls_verify=False) as skopeo:
                try:
                    copied = skopeo.copy(f"{docxy.host}/{image.short_name}:{image.tag}")
                except ClientError as e:
                    raise AssertionError(f"{e}\n--- docxy:\n{docxy.log()[-4000:]}") from None
                assert copied.digest == image.digest
                started = time.monotonic()
                with pytest.raises(ClientError):
                    skopeo.copy(f"{docxy.host}/{uncached.short_name}:{uncached.tag}", timeout=120)
                assert time.monotonic() - started < 100
            assert "token service" in docxy.log()
            _still_serving(docxy)
        finally:
            upstream.token_server.start()


# --- an upstream answering 500, 429, or hanging after its headers -------------------------

@pytest.fixture
def faulty(tmp_path):
    with FaultServer(tmp_path / "faultserver") as server:
        yield server


def _fault_args(server: FaultServer, cache: Path | None, *extra: str) -> list[str]:
    cache_args = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    return ["--upstream", server.url, "--no-library", *cache_args, *extra]


def test_upstream_500_is_relayed_and_a_cached_tag_served_stale(faulty, tmp_path):
    """An upstream 500 reaches the client as the upstream's JSON error; a tag pulled before is served stale."""
    content = faulty.content
    v1 = content.manifests[("fault/app", "v1")]
    layer, _ = content.layer("v2")
    with Docxy(tmp_path / "docxy", _fault_args(faulty, tmp_path / "cache")) as docxy:
        status, _, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
        assert status == 200 and body == v1
        faulty.set_mode("500")
        status, headers, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
        assert status == 200 and body == v1, "a cached tag was not served stale"
        assert headers["Docker-Content-Digest"] == _sha256(v1)
        for path in ("/v2/fault/app/manifests/v2", f"/v2/fault/app/blobs/{layer}"):
            status, headers, body = docxy.request(path, ACCEPT)
            assert status == 500, (path, body)
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body)["errors"][0]["message"] == "fault injected: internal server error"
        assert "stale" in docxy.log()
        _still_serving(docxy)


def test_upstream_429_reaches_the_client_with_retry_after(faulty, tmp_path):
    """An upstream 429 reaches the client as 429 with its Retry-After (GET, HEAD, blobs); a cached tag is served stale."""
    layer, _ = faulty.content.layer("v2")
    v1 = faulty.content.manifests[("fault/app", "v1")]
    with Docxy(tmp_path / "docxy", _fault_args(faulty, tmp_path / "cache")) as docxy:
        status, _, _ = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
        assert status == 200
        faulty.set_mode("429")
        for method, path in (("GET", "/v2/fault/app/manifests/v2"),
                             ("HEAD", "/v2/fault/app/manifests/v2"),
                             ("GET", f"/v2/fault/app/blobs/{layer}")):
            status, headers, body = docxy.request(path, ACCEPT, method=method)
            assert status == 429, (method, path, body)
            assert headers["Retry-After"] == RETRY_AFTER, (method, path)
            if method == "GET":
                assert _error_code(body) == "TOOMANYREQUESTS"
        status, _, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
        assert status == 200 and body == v1
        _still_serving(docxy)


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_upstream_hanging_after_headers_is_cut_by_the_idle_timeout(faulty, tmp_path, cached):
    """A body that never comes: the blob is asked for once more (--resume-attempts 1),
    stalls again, and its client is aborted; the manifest client is answered within the
    idle timeout (2 s); docxy keeps serving."""
    layer, data = faulty.content.layer("v1")
    cache = tmp_path / "cache" if cached else None
    args = _fault_args(faulty, cache, "--idle-timeout", "2", "--resume-attempts", "1")
    with Docxy(tmp_path / "docxy", args) as docxy:
        faulty.set_mode("hang")
        started = time.monotonic()
        # Cut before or after the answer's headers: never a body that looks whole.
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            docxy.request(f"/v2/fault/app/blobs/{layer}", timeout=30)
        assert 4 <= time.monotonic() - started < 15  # two stalls of 2 s, then the abort
        # the server logs a stalled GET once docxy has hung up on it
        blob_gets = lambda: [r for r in faulty.requests()  # noqa: E731
                             if r["method"] == "GET" and layer in r["path"]]
        poll_until(lambda: len(blob_gets()) >= 2, 10)
        assert len(blob_gets()) == 2, blob_gets()

        started = time.monotonic()
        if cached:  # the manifest is read whole before anything is sent: a clear error
            status, headers, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT, timeout=30)
            assert status == 504, body
            assert _error_code(body) == "UNAVAILABLE"
        else:  # relayed as it comes: the client is aborted
            with pytest.raises((http.client.IncompleteRead, ConnectionError)):
                docxy.request("/v2/fault/app/manifests/v1", ACCEPT, timeout=30)
        assert time.monotonic() - started < 15
        if cache is not None:
            assert not cached_blob(cache, layer).exists()
            poll_until(lambda: _partials(cache) == [], 10)
        _still_serving(docxy)
        faulty.set_mode("ok")
        status, _, body = docxy.request(f"/v2/fault/app/blobs/{layer}")
        assert status == 200 and body == data


# --- a full disk --------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size_bytes) -> a directory on a fresh tmpfs of that size (unmounted after)."""
    mounted: list[Path] = []

    def mount_tmpfs(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount_tmpfs
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def _fill_up(directory: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            for _ in range(1 << 16):
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_blob_larger_than_the_free_space_is_relayed_uncached(upstream, tmpfs, tmp_path):
    """On a disk with less room than a blob, the pull still succeeds (uncached); small blobs still cache."""
    layer = _large_layer(upstream)
    if layer.size < 8 << 20:
        pytest.skip("the large layer is too small to outgrow the tmpfs")
    cache = tmpfs(DISK_RESERVE + layer.size // 2) / "cache"
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        token = _token(docxy, "large")
        out: dict = {}
        docxy.stream(f"/v2/large/blobs/{layer.digest}", _bearer(token), out)
        assert "error" not in out, out
        assert out["status"] == 200 and out["digest"] == layer.digest
        assert not cached_blob(cache, layer.digest).exists()
        assert _partials(cache) == []
        assert "uncached" in docxy.log()

        image = upstream.images.namespaced
        token = _token(docxy, image.short_name)
        small = image.blobs[0]
        status, _, body = docxy.request(f"/v2/{image.short_name}/blobs/{small.digest}", _bearer(token))
        assert status == 200 and _sha256(body) == small.digest
        assert cached_blob(cache, small.digest).exists(), "a blob that fits was not cached"
        status, _, body = docxy.request(f"/v2/{image.short_name}/manifests/{image.tag}",
                                   {**_bearer(token), "Accept": image.media_type})
        assert status == 200 and _sha256(body) == image.digest


def test_disk_filling_up_mid_download_then_pulls_relay_uncached(upstream, cdn_mode, tmpfs, tmp_path):
    """The disk fills up mid-download: that client is aborted, nothing partial is kept or
    served, and the next pull of the blob succeeds uncached."""
    layer = _large_layer(upstream)
    disk = tmpfs(layer.size + DISK_RESERVE + (32 << 20))
    cache = disk / "cache"
    cdn_mode("slow")
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        token = _token(docxy, "large")
        out: dict = {}
        reader = threading.Thread(target=docxy.stream, daemon=True,
                                  args=(f"/v2/large/blobs/{layer.digest}", _bearer(token), out))
        reader.start()
        poll_until(lambda: [p for p in _partials(cache) if p.stat().st_size >= 1 << 20], 30)
        _fill_up(disk)
        reader.join(60)
        assert not reader.is_alive()
        assert out.get("status") == 200
        assert "error" in out, f"a blob cut by a full disk looked complete: {out}"
        poll_until(lambda: _partials(cache) == [], 10)
        assert not cached_blob(cache, layer.digest).exists()
        assert "No space left on device" in docxy.log()

        upstream.restart_cdn("ok")
        again: dict = {}
        docxy.stream(f"/v2/large/blobs/{layer.digest}", _bearer(token), again)
        assert "error" not in again, again
        assert again["status"] == 200 and again["digest"] == layer.digest
        assert not cached_blob(cache, layer.digest).exists()
        assert _partials(cache) == []
        _still_serving(docxy)


# --- the cache directory removed ----------------------------------------------------------

def _remove_tree(path) -> None:
    """rm -rf as an operator runs it, again if docxy wrote a file in between (a tag, the
    access list of a background check): "Directory not empty" is the race, not a fault."""
    for _ in range(20):
        try:
            shutil.rmtree(path)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            time.sleep(0.05)
    raise AssertionError(f"{path} kept being written to")


def test_cache_directory_removed_while_running(upstream, cdn_mode, tmp_path):
    """rm -rf of the cache directory, at rest and mid-download: pulls keep working, and the
    store recreates its directories and caches again."""
    image = upstream.images.namespaced
    cache = tmp_path / "cache"
    with Docxy(tmp_path / "docxy", mirror_args(upstream, cache=cache)) as docxy:
        token = _token(docxy, image.short_name)
        headers = {**_bearer(token), "Accept": image.media_type}

        def pull_image() -> None:
            status, _, body = docxy.request(f"/v2/{image.short_name}/manifests/{image.tag}", headers)
            assert status == 200 and _sha256(body) == image.digest, body[:300]
            for blob in image.blobs:
                status, _, body = docxy.request(f"/v2/{image.short_name}/blobs/{blob.digest}", headers)
                assert status == 200 and _sha256(body) == blob.digest, body[:300]

        pull_image()
        assert all(cached_blob(cache, b.digest).exists() for b in image.blobs)
        _remove_tree(cache)
        pull_image()
        pull_image()
        assert all(cached_blob(cache, b.digest).exists() for b in image.blobs), "not cached again"
        assert cached_blob(cache, image.digest).exists()

        # Mid-download: the client still gets the verified blob, which is not stored.
        layer = _large_layer(upstream)
        upstream.cdn.slow_rate = "40m"
        try:
            cdn_mode("slow")
        finally:
            upstream.cdn.slow_rate = "1m"
        large_token = _token(docxy, "large")
        out: dict = {}
        reader = threading.Thread(target=docxy.stream, daemon=True,
                                  args=(f"/v2/large/blobs/{layer.digest}", _bearer(large_token), out))
        reader.start()
        poll_until(lambda: [p for p in _partials(cache) if p.stat().st_size >= 1 << 20], 30)
        _remove_tree(cache)
        reader.join(120)
        assert not reader.is_alive()
        assert "error" not in out, out
        assert out["digest"] == layer.digest
        assert not cached_blob(cache, layer.digest).exists()
        pull_image()
        assert "recreating" in docxy.log()


# --- a manifest cut mid-body, references that cannot exist, the first client leaving ------

def test_a_manifest_cut_mid_body_is_never_answered_as_whole(faulty, tmp_path):
    """The upstream promises a manifest, sends half and closes (no Docker-Content-Digest,
    fetched by tag): every request gets a JSON 502, never the half, nothing is cached, and
    once the upstream is whole again the manifest is served whole."""
    whole = faulty.content.manifests[("fault/app", "v1")]
    with Docxy(tmp_path / "docxy", _fault_args(faulty, tmp_path / "cache")) as docxy:
        faulty.set_mode("cut-manifest")
        for _ in range(2):
            status, headers, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
            assert status == 502 and headers["Content-Type"] == "application/json", body
            assert _error_code(body) == "UNAVAILABLE" and whole[: len(whole) // 2] not in body
        cut_gets = lambda: [r for r in faulty.requests()  # noqa: E731
                            if r["method"] == "GET" and r["mode"] == "cut-manifest"]
        poll_until(lambda: len(cut_gets()) >= 2, 10)  # logged once the answer is written
        assert len(cut_gets()) == 2, "a cut manifest was served from the cache"
        assert not list((tmp_path / "cache" / "tags").rglob("v1"))
        faulty.set_mode("ok")
        status, _, body = docxy.request("/v2/fault/app/manifests/v1", ACCEPT)
        assert status == 200 and body == whole


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path, code", [
    ("/v2/fault/app/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
    ("/v2/fault/app/manifests/sha256:totallywrong", "MANIFEST_UNKNOWN"),
    ("/v2/fault/app/blobs/sha256:totallywrong", "BLOB_UNKNOWN"),
    ("/v2/fault/app/blobs/latest", "BLOB_UNKNOWN"),
])
def test_references_that_cannot_exist_are_404_and_never_sent_upstream(faulty, tmp_path, method,
                                                                      path, code):
    """What the OCI conformance suite asks (pull workflow): 404 with the registry error
    (HEAD: no body), nothing sent upstream."""
    with Docxy(tmp_path / "docxy", _fault_args(faulty, tmp_path / "cache")) as docxy:
        before = len(faulty.requests())
        status, headers, body = docxy.request(path, method=method)
        assert status == 404
        if method == "GET":
            assert headers["Content-Type"] == "application/json" and _error_code(body) == code
        status, _, _ = docxy.request("/health")  # a request after it, then compare
        assert status == 200 and len(faulty.requests()) == before


def test_the_first_client_leaving_before_the_upstream_answers_costs_no_second_download(
        faulty, tmp_path):
    """Two clients ask for a blob the upstream takes 3 s to answer; the first hangs up
    after 1 s. The second gets the whole blob from the one upstream GET."""
    import socket

    layer, _ = faulty.content.layer("v1")
    with Docxy(tmp_path / "docxy", _fault_args(faulty, tmp_path / "cache")) as docxy:
        faulty.set_mode("slow-headers")
        first = socket.create_connection(("127.0.0.1", docxy.port))
        first.sendall(f"GET /v2/fault/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.5)  # the first client's request is the one that asks the upstream
        out: dict = {}
        second = threading.Thread(target=docxy.stream,
                                  args=(f"/v2/fault/app/blobs/{layer}", {}, out))
        second.start()
        time.sleep(1.0)
        first.close()
        second.join(30)
        assert out.get("status") == 200 and out.get("digest") == layer, out
        gets = lambda: [r for r in faulty.requests()  # noqa: E731
                        if r["method"] == "GET" and layer in r["path"]]
        poll_until(gets, 10)  # the server logs a GET once its answer is written
        assert len(gets()) == 1, gets()
