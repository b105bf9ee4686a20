"""The cache when the disk or the upstream misbehaves, in memory: a full disk (before and
during a download), the cache directory removed underneath it, a manifest too large or
stalling, and Range headers with absurd numbers."""
import errno
import hashlib
import json
import shutil

import pytest

from docxy.cache import blobs as blobs_module
from docxy.cache.store import BlobStore
from docxy.registry.ranges import UNSATISFIABLE, parse_range
from docxy.stream import sink as sink_module

from ..fakes import (
    FakeResponse,
    FakeUpstream,
    blob_upstream,
    get,
    hub_config,
    make_site,
)

DATA = bytes(range(256)) * 64  # 16 KiB


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_site(tmp_path, data=DATA, auto=True, **config):
    """A cached docxy whose upstream serves `data` as the blob of its digest; the bodies it
    handed out are in the returned list."""
    upstream, responses = blob_upstream(data, auto)
    site, upstream, clock = make_site(
        hub_config(cache_dir=str(tmp_path / "cache"), **config), upstream, with_cache=True,
    )
    return site, clock, responses


def cache_of(site):
    return site.resource._routes[b"/v2/"].context.blobs


# --- a full disk --------------------------------------------------------------------------

def test_blob_larger_than_the_free_space_is_relayed_uncached(tmp_path, monkeypatch):
    """No room for the blob: the client still gets it whole, from the upstream, and nothing is stored."""
    monkeypatch.setattr(BlobStore, "free_bytes", lambda self: 1000)
    site, _, _ = blob_site(tmp_path)
    digest = digest_of(DATA)
    status, headers, body = get(site, f"/v2/x/blobs/{digest}").response()
    assert status == 200 and body == DATA
    assert headers[b"docker-content-digest"] == [digest.encode()]
    cache = cache_of(site)
    assert not cache.store.has(digest) and cache.stats.uncached == 1
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


def test_blob_larger_than_the_cache_bound_is_relayed_uncached(tmp_path):
    site, _, _ = blob_site(tmp_path, cache_max_size=len(DATA) - 1)
    status, _, body = get(site, f"/v2/x/blobs/{digest_of(DATA)}").response()
    assert status == 200 and body == DATA
    assert cache_of(site).stats.uncached == 1


def test_room_counts_the_downloads_already_promised(tmp_path, monkeypatch):
    """Two cold blobs that fit on the disk one at a time, not together: the second is relayed uncached."""
    other = b"other" * 4000
    free = blobs_module.DISK_RESERVE + len(DATA) + len(other) // 2
    monkeypatch.setattr(BlobStore, "free_bytes", lambda self: free)
    bodies = {digest_of(DATA): DATA, digest_of(other): other}
    pending = []

    def respond(method, url, headers, body):
        data = bodies[url.rsplit("/", 1)[1]]
        response = FakeResponse(200, body=data, length=len(data), auto=False)
        pending.append(response)
        return response

    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "cache")), FakeUpstream(respond),
                           with_cache=True)
    get(site, f"/v2/x/blobs/{digest_of(DATA)}")
    get(site, f"/v2/x/blobs/{digest_of(other)}")
    assert cache_of(site).stats.uncached == 1 and cache_of(site).filling() == 1


def test_disk_full_mid_download_aborts_its_clients_then_pulls_relay_uncached(tmp_path, monkeypatch):
    """ENOSPC while filling: the clients of that download are aborted, no partial file stays,
    the next pull is relayed uncached, and caching resumes after the back-off."""
    real_write = sink_module._write_all
    full = [True]

    def write(fd, chunks):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, chunks)

    monkeypatch.setattr(sink_module, "_write_all", write)
    site, clock, responses = blob_site(tmp_path, auto=False)
    digest = digest_of(DATA)
    first = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(DATA[:1000])
    clock.advance(0)  # the reactor's turn ends: what arrived in it is handed on
    assert responses[0].transport.stopped
    responses[0].cut()  # what stopping the upstream connection brings about
    assert first.transport.disconnected
    assert list((tmp_path / "cache" / "partial").iterdir()) == []

    full[0] = False  # space came back, but docxy waits before trying again
    second = get(site, f"/v2/x/blobs/{digest}")
    responses[1].protocol.dataReceived(DATA)
    responses[1].end()
    status, _, body = second.response()
    assert status == 200 and body == DATA
    assert not cache_of(site).store.has(digest) and cache_of(site).stats.uncached == 1

    clock.advance(blobs_module.FULL_BACKOFF + 1)
    third = get(site, f"/v2/x/blobs/{digest}")
    responses[2].protocol.dataReceived(DATA)
    responses[2].end()
    assert third.response()[2] == DATA
    assert cache_of(site).store.has(digest)


def test_manifest_that_cannot_be_written_is_served_uncached(tmp_path, monkeypatch):
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()

    def respond(method, url, headers, _body):
        hdrs = {b"content-type": b"application/vnd.oci.image.manifest.v1+json",
                b"docker-content-digest": digest_of(body).encode(),
                b"content-length": str(len(body)).encode()}
        return FakeResponse(200, hdrs, length=0) if method == b"HEAD" else FakeResponse(200, hdrs, body)

    def no_space(self, digest):
        raise OSError(errno.ENOSPC, "No space left on device")

    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "cache")), FakeUpstream(respond),
                           with_cache=True)
    monkeypatch.setattr(BlobStore, "new_partial", no_space)
    status, headers, got = get(site, "/v2/x/manifests/t").response()
    assert status == 200 and got == body
    assert not cache_of(site).store.has(digest_of(body))
    assert not list((tmp_path / "cache" / "tags").rglob("t"))


# --- the cache directory removed ----------------------------------------------------------

def test_removed_cache_directory_is_recreated_and_blobs_fetched_again(tmp_path):
    """rm -rf of the cache: the stored blob is forgotten (not a 404), fetched again, and stored again."""
    site, _, responses = blob_site(tmp_path)
    digest = digest_of(DATA)
    assert get(site, f"/v2/x/blobs/{digest}").response()[2] == DATA
    shutil.rmtree(tmp_path / "cache")
    status, _, body = get(site, f"/v2/x/blobs/{digest}").response()
    assert status == 200 and body == DATA
    assert len(responses) == 2
    assert cache_of(site).store.has(digest)
    assert (tmp_path / "cache" / "partial").is_dir()


def test_verified_blob_that_cannot_be_stored_still_reaches_its_clients(tmp_path):
    """The directory removed mid-download: the clients still get the whole, verified blob
    (through their own descriptors); it is not stored, and the next pull fetches it again."""
    site, _, responses = blob_site(tmp_path, auto=False)
    digest = digest_of(DATA)
    first = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(DATA[:5000])
    shutil.rmtree(tmp_path / "cache")
    joined = get(site, f"/v2/x/blobs/{digest}")  # joins the download after the removal
    responses[0].protocol.dataReceived(DATA[5000:])
    responses[0].end()
    for ex in (first, joined):
        status, _, body = ex.response()
        assert status == 200 and body == DATA
    assert not cache_of(site).store.has(digest)
    later = get(site, f"/v2/x/blobs/{digest}")
    assert len(responses) == 2
    responses[1].protocol.dataReceived(DATA)
    responses[1].end()
    assert later.response()[2] == DATA and cache_of(site).store.has(digest)


def test_store_forgets_a_blob_whose_file_is_gone(tmp_path):
    store = BlobStore(tmp_path)
    path, f = store.new_partial(digest_of(b"abc"))
    f.write(b"abc")
    f.close()
    store.commit(digest_of(b"abc"), path, 3)
    store.path(digest_of(b"abc")).unlink()
    assert not store.has(digest_of(b"abc")) and store.total == 0


# --- manifests that are too large or stall ------------------------------------------------

def manifest_site(tmp_path, get_response):
    def respond(method, url, headers, _body):
        if method == b"HEAD":
            return FakeResponse(200, {b"docker-content-digest": b"sha256:" + b"a" * 64,
                                      b"content-length": b"10"}, length=0)
        return get_response()

    return make_site(hub_config(cache_dir=str(tmp_path / "cache"), idle_timeout=5),
                     FakeUpstream(respond), with_cache=True)


def test_manifest_announced_larger_than_the_cap_is_refused_unread(tmp_path):
    big = FakeResponse(200, {b"content-type": b"application/json"}, length=5 << 20, auto=False)
    site, _, _ = manifest_site(tmp_path, lambda: big)
    status, _, body = get(site, "/v2/x/manifests/t").response()
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"
    assert big.transport.stopped
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


def test_manifest_body_that_stalls_is_a_504(tmp_path):
    stalled = FakeResponse(200, {b"content-type": b"application/json"}, length=100, auto=False)
    site, _, clock = manifest_site(tmp_path, lambda: stalled)
    ex = get(site, "/v2/x/manifests/t")
    stalled.protocol.dataReceived(b"{")
    clock.advance(4)
    assert not stalled.transport.stopped
    clock.advance(2)
    assert stalled.transport.stopped
    stalled.cut()  # what stopping the upstream connection brings about
    status, _, body = ex.response()
    assert status == 504 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_relayed_manifest_error_that_stalls_is_cut(tmp_path):
    """An upstream error whose body never ends is cut by the idle timeout, not left open."""
    stalled = FakeResponse(500, {b"content-type": b"application/json"}, length=100, auto=False)
    site, _, clock = manifest_site(tmp_path, lambda: stalled)
    ex = get(site, "/v2/x/manifests/t")
    clock.advance(6)
    assert stalled.transport.stopped
    stalled.cut()
    assert ex.transport.disconnected  # aborted: a cut body never looks whole


# --- absurd ranges ------------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    ("bytes=" + "9" * 5000 + "-", UNSATISFIABLE),
    ("bytes=0-" + "9" * 5000, (0, 100)),
    ("bytes=-" + "9" * 5000, (0, 100)),
    ("bytes=99999999999999999999-", UNSATISFIABLE),
    ("bytes=-0", UNSATISFIABLE),
    ("bytes=--1", None),
    ("bytes=-5-10", None),
])
def test_absurd_ranges_never_raise(header, expected):
    assert parse_range(header, 100) == expected
