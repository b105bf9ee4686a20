"""The blob cache in memory: the store's bounds and crash safety, a fill's verification,
and followers that read a growing file at their own pace."""
import hashlib

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from docxy.cache.fill import Fill
from docxy.cache.store import BlobStore
from docxy.registry.ranges import UNSATISFIABLE, parse_range
from docxy.stream.download import State

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


def put(store: BlobStore, data: bytes) -> str:
    digest = digest_of(data)
    path, f = store.new_partial(digest)
    f.write(data)
    f.close()
    store.commit(digest, path, len(data))
    return digest


def test_partial_files_are_removed_on_start(tmp_path):
    """A download cut by a crash is never served: partial/ is emptied at start."""
    store = BlobStore(tmp_path)
    digest = digest_of(b"x" * 10)
    path, f = store.new_partial(digest)
    f.write(b"x" * 5)
    f.close()
    reopened = BlobStore(tmp_path)
    assert not path.exists() and not reopened.has(digest)


def test_store_survives_restart(tmp_path):
    store = BlobStore(tmp_path)
    digest = put(store, b"hello")
    again = BlobStore(tmp_path)
    assert again.has(digest) and again.size_of(digest) == 5 and again.total == 5


def test_eviction_is_lru_and_spares_readers(tmp_path):
    """Over the bound the least recently used blob goes, unless someone is reading it."""
    store = BlobStore(tmp_path, max_size=250)
    a = put(store, b"a" * 100)
    b = put(store, b"b" * 100)
    reading = store.acquire(a)  # a is now the most recently used, and being read
    c = put(store, b"c" * 100)
    assert store.has(a) and store.has(c) and not store.has(b)
    store.release(a)
    reading.close()
    store.acquire(c).close()
    store.release(c)
    put(store, b"d" * 100)
    assert not store.has(a) and store.total <= 250
    assert store.stats.evictions == 2


def test_reader_protects_even_the_oldest(tmp_path):
    store = BlobStore(tmp_path, max_size=150)
    a = put(store, b"a" * 100)
    handle = store.acquire(a)
    put(store, b"b" * 100)
    assert store.has(a), "a blob being read was evicted"
    handle.close()


def _fill(store, data, length=None, digest=None):
    from twisted.internet.task import Clock

    digest = digest or digest_of(data)
    fill = Fill(store, digest, len(data) if length is None else length, Clock())
    response = FakeResponse(200, body=data, length=len(data) if length is None else length, auto=False)
    response.deliverBody(fill)
    return fill, response


def test_fill_enters_store_only_when_digest_matches(tmp_path):
    store = BlobStore(tmp_path)
    fill, response = _fill(store, b"good bytes")
    response.protocol.dataReceived(b"good bytes")
    response.end()
    assert fill.state is State.COMPLETE and store.has(fill.digest)
    assert store.path(fill.digest).read_bytes() == b"good bytes"


def test_fill_with_wrong_bytes_caches_nothing(tmp_path):
    """Bytes that do not hash to the digest never enter the cache; no partial remains."""
    store = BlobStore(tmp_path)
    fill, response = _fill(store, b"evil bytes", digest=digest_of(b"good bytes"))
    response.protocol.dataReceived(b"evil bytes")
    response.end()
    assert fill.state is State.FAILED and "digest mismatch" in fill.reason
    assert not store.has(fill.digest)
    assert list((tmp_path / "partial").iterdir()) == []


def test_cut_fill_caches_nothing(tmp_path):
    store = BlobStore(tmp_path)
    fill, response = _fill(store, b"0123456789")
    response.protocol.dataReceived(b"01234")
    response.cut()
    assert fill.state is State.FAILED and not store.has(fill.digest)


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=10-", (10, 1000)),
        ("bytes=-100", (900, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes=1000-", UNSATISFIABLE),
        ("bytes=-0", UNSATISFIABLE),
        ("bytes=5-2", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header, expected):
    """Single byte ranges, suffixes and unsatisfiable ranges; anything else is ignored."""
    assert parse_range(header, 1000) == expected


def _cache_site(tmp_path, data, digest=None):
    digest = digest or digest_of(data)
    upstream, responses = blob_upstream(data, auto=False)
    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, _, clock = make_site(config, upstream, with_cache=True)
    return site, upstream, responses, digest


def test_concurrent_clients_share_one_upstream_download(tmp_path):
    """Three clients of one cold blob: one upstream GET; all get every byte, and the
    last byte only after the digest is verified."""
    data = bytes(range(256)) * 4096  # 1 MiB: followers are woken every 256 KiB
    site, upstream, responses, digest = _cache_site(tmp_path, data)
    first = get(site, f"/v2/x/blobs/{digest}", [("Authorization", "Bearer a")])
    assert len(responses) == 1
    fill = responses[0].protocol
    fill.dataReceived(data[:300_000])
    second = get(site, f"/v2/x/blobs/{digest}", [("Authorization", "Bearer a")])
    third = get(site, f"/v2/x/blobs/{digest}", [("Authorization", "Bearer a")])
    gets = [c for c in upstream.calls if c[0] == b"GET" and "/blobs/" in c[1]]
    assert len(gets) == 1
    fill.dataReceived(data[300_000:])
    for ex in (first, second, third):
        assert ex.transport.value().endswith(data[-2:-1])  # all but the held-back last byte
    responses[0].end()
    for ex in (first, second, third):
        status, headers, body = ex.response()
        assert status == 200 and body == data
        assert headers[b"content-length"] == [str(len(data)).encode()]


def test_first_client_leaving_does_not_stop_the_download(tmp_path):
    data = b"z" * 10000
    site, upstream, responses, digest = _cache_site(tmp_path, data)
    first = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(data[:100])
    first.http.connectionLost(Failure(ConnectionDone()))
    assert not responses[0].transport.stopped
    responses[0].protocol.dataReceived(data[100:])
    responses[0].end()
    later = get(site, f"/v2/x/blobs/{digest}")
    status, _, body = later.response()
    assert status == 200 and body == data
    assert len([c for c in upstream.calls if c[0] == b"GET" and "/blobs/" in c[1]]) == 1


def test_mismatch_aborts_followers_and_next_pull_retries(tmp_path):
    """A corrupt upstream blob: every client's connection is aborted, nothing is cached,
    and the next pull asks the upstream again."""
    site, upstream, responses, digest = _cache_site(tmp_path, b"bad!" * 100, digest=digest_of(b"good" * 100))
    ex = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(b"bad!" * 100)
    responses[0].end()
    assert ex.transport.disconnected
    assert not ex.transport.value().endswith(b"!" * 1)
    get(site, f"/v2/x/blobs/{digest}")
    assert len(responses) == 2


def test_cached_range_and_unsatisfiable(tmp_path):
    """Ranges on a cached blob come from the file: 206 with Content-Range, 416 past the end."""
    data = bytes(range(200))
    site, upstream, responses, digest = _cache_site(tmp_path, data)
    warm = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(data)
    responses[0].end()
    assert warm.response()[2] == data
    status, headers, body = get(site, f"/v2/x/blobs/{digest}", [("Range", "bytes=-10")]).response()
    assert status == 206 and body == data[-10:]
    assert headers[b"content-range"] == [b"bytes 190-199/200"]
    status, headers, _ = get(site, f"/v2/x/blobs/{digest}", [("Range", "bytes=500-")]).response()
    assert status == 416 and headers[b"content-range"] == [b"bytes */200"]
    assert len(responses) == 1


def test_cached_blob_needs_upstream_yes_for_the_client(tmp_path):
    """A cached blob is served only after the upstream accepts this client's credential
    for the repository (once); a refusal is relayed with the mirror's realm."""
    data = b"secret" * 10
    digest = digest_of(data)

    def respond(method, url, headers, body):
        auth = headers.getRawHeaders(b"authorization", [b""])[0]
        if method == b"HEAD":
            if auth == b"Bearer good":
                return FakeResponse(307, {b"location": b"https://cdn/x"}, length=0)
            return FakeResponse(401, {b"www-authenticate": b'Bearer realm="https://a/t",service="s"'}, b"{}")
        r = FakeResponse(200, body=data)
        return r

    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, upstream, _ = make_site(config, FakeUpstream(respond), with_cache=True)
    assert get(site, f"/v2/p/blobs/{digest}", [("Authorization", "Bearer good")]).response()[2] == data
    status, headers, _ = get(site, f"/v2/p/blobs/{digest}", [("Authorization", "Bearer bad")]).response()
    assert status == 401 and b"auth/token" in headers[b"www-authenticate"][0]
    for _ in range(2):
        assert get(site, f"/v2/p/blobs/{digest}", [("Authorization", "Bearer good")]).response()[0] == 200
    heads = [c for c in upstream.calls if c[0] == b"HEAD" and c[2].hasHeader(b"authorization")]
    # "good" was answered by the upstream itself (its download); "bad" was asked once
    assert [c[2].getRawHeaders(b"authorization") for c in heads] == [[b"Bearer bad"]]
    anonymous = [c for c in upstream.calls if c[0] == b"HEAD" and not c[2].hasHeader(b"authorization")]
    assert len(anonymous) == 1  # docxy asked once whether anyone may pull it: no


def _slow_blob_site(tmp_path):
    """A site whose upstream answers blob GETs only when the test fires `answer`; the
    GETs it was asked are in `gets`."""
    from twisted.internet import defer

    answer: defer.Deferred = defer.Deferred()
    gets: list[str] = []

    class Slow(FakeUpstream):
        async def request(self, method, url, headers, body=None, follow_redirects=True):
            self.calls.append((method, url, headers, body))
            if method == b"HEAD":
                return FakeResponse(200, {}, length=0)
            if url.endswith("/v2/"):
                return FakeResponse(200, body=b"{}")
            gets.append(url)
            return await answer

    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, _, _ = make_site(config, Slow(), with_cache=True)
    return site, answer, gets


def test_clients_arriving_before_upstream_answers_make_one_request(tmp_path):
    """Clients that ask while the first is still waiting for the upstream's headers wait
    for it and join its download: one upstream GET, not one each."""
    data = b"q" * 5000
    site, answer, gets = _slow_blob_site(tmp_path)
    clients = [get(site, f"/v2/x/blobs/{digest_of(data)}") for _ in range(4)]
    answer.callback(FakeResponse(200, body=data))
    assert len(gets) == 1
    for ex in clients:
        status, _, body = ex.response()
        assert status == 200 and body == data


def test_the_first_client_leaving_before_the_headers_costs_no_second_download(tmp_path):
    """Two clients miss one blob; the first leaves while the upstream is still answering:
    the one upstream GET goes on and the second client gets the whole blob."""
    data = b"q" * 5000
    site, answer, gets = _slow_blob_site(tmp_path)
    first = get(site, f"/v2/x/blobs/{digest_of(data)}")
    second = get(site, f"/v2/x/blobs/{digest_of(data)}")
    first.http.connectionLost(Failure(ConnectionDone()))
    assert not answer.called, "the first client's leaving cancelled the shared request"
    answer.callback(FakeResponse(200, body=data))
    status, _, body = second.response()
    assert status == 200 and body == data
    assert len(gets) == 1


# --- manifests ------------------------------------------------------------------------

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}'
MTYPE = b"application/vnd.oci.image.index.v1+json"


def _manifest_site(tmp_path, down=None, body=MANIFEST, tag_ttl=0.0):
    """An upstream with one tag `t` of repository `x`; `down` is a list whose truth makes
    every request fail as unreachable."""
    from docxy.upstream.errors import UpstreamError

    digest = digest_of(MANIFEST)
    down = down if down is not None else []

    def respond(method, url, headers, _body):
        if down:
            return UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if "/manifests/" in url:
            hdrs = {b"content-type": MTYPE, b"docker-content-digest": digest.encode(),
                    b"content-length": str(len(body)).encode()}
            if method == b"HEAD":
                return FakeResponse(200, hdrs, length=0)
            return FakeResponse(200, hdrs, body)
        return FakeResponse(404)

    config = hub_config(cache_dir=str(tmp_path / "cache"), tag_ttl=tag_ttl)
    upstream = FakeUpstream(respond)
    site, _, clock = make_site(config, upstream, with_cache=True)
    return site, upstream, digest, down, clock


def _manifest_calls(upstream, method):
    """Manifest requests made for clients (docxy's own public-access probe, which sends its
    own Accept, is not counted)."""
    from docxy.registry.headers import MANIFEST_ACCEPT

    return [c for c in upstream.calls if c[0] == method and "/manifests/" in c[1]
            and c[2].getRawHeaders(b"accept") != [MANIFEST_ACCEPT]]


def test_tag_is_resolved_by_head_and_served_from_cache(tmp_path):
    """First pull of a tag: HEAD + GET upstream; every later pull: one HEAD, no GET."""
    site, upstream, digest, _, _ = _manifest_site(tmp_path)
    for _ in range(3):
        status, headers, body = get(site, "/v2/x/manifests/t").response()
        assert status == 200 and body == MANIFEST
        assert headers[b"docker-content-digest"] == [digest.encode()]
        assert headers[b"content-type"] == [MTYPE]
    assert len(_manifest_calls(upstream, b"GET")) == 1
    assert len(_manifest_calls(upstream, b"HEAD")) >= 3


def test_manifest_by_digest_needs_no_upstream_content(tmp_path):
    """A stored manifest by digest is answered without a GET upstream."""
    site, upstream, digest, _, _ = _manifest_site(tmp_path)
    get(site, "/v2/x/manifests/t").response()
    gets_before = len(_manifest_calls(upstream, b"GET"))
    status, _, body = get(site, f"/v2/x/manifests/{digest}").response()
    assert status == 200 and body == MANIFEST
    assert len(_manifest_calls(upstream, b"GET")) == gets_before


def test_tag_ttl_skips_the_head(tmp_path):
    site, upstream, _, _, clock = _manifest_site(tmp_path, tag_ttl=60)
    get(site, "/v2/x/manifests/t").response()
    heads = len(_manifest_calls(upstream, b"HEAD"))
    assert get(site, "/v2/x/manifests/t").response()[0] == 200
    assert len(_manifest_calls(upstream, b"HEAD")) == heads
    clock.advance(61)
    assert get(site, "/v2/x/manifests/t").response()[0] == 200
    assert len(_manifest_calls(upstream, b"HEAD")) == heads + 1


def test_stale_tag_served_when_upstream_is_down(tmp_path):
    """With the upstream unreachable, a tag pulled before is served from the cache."""
    site, upstream, digest, down, _ = _manifest_site(tmp_path)
    get(site, "/v2/x/manifests/t").response()
    down.append(True)
    status, headers, body = get(site, "/v2/x/manifests/t").response()
    assert status == 200 and body == MANIFEST
    status, _, _ = get(site, "/v2/x/manifests/never-seen").response()
    assert status == 502


def test_manifest_that_does_not_match_its_digest_is_refused(tmp_path):
    site, upstream, digest, _, _ = _manifest_site(tmp_path, body=b'{"evil":1}')
    status, _, body = get(site, "/v2/x/manifests/t").response()
    assert status == 502 and b"DIGEST_INVALID" in body
    assert not (tmp_path / "cache" / "tags" / "registry.test" / "x" / "t").exists()


def test_accepts():
    from docxy.cache.manifests import accepts

    assert accepts([], "a/b")
    assert accepts([b"a/b, c/d;q=0.5"], "c/d")
    assert accepts([b"*/*"], "x/y")
    assert not accepts([b"application/vnd.docker.distribution.manifest.v2+json"], "application/vnd.oci.image.index.v1+json")


def test_refusals_to_a_get_have_a_whole_body(tmp_path):
    """A GET refused by the upstream's HEAD gets a JSON error whose length matches its
    body (a HEAD answer's Content-Length must never reach a GET), with the challenge."""
    def respond(method, url, headers, body):
        hdrs = {b"www-authenticate": b'Bearer realm="https://a/t",service="s"',
                b"content-type": b"application/json", b"content-length": b"159"}
        if method == b"HEAD":
            return FakeResponse(401, hdrs, length=0)
        return FakeResponse(401, hdrs, b"{}")

    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, _, _ = make_site(config, FakeUpstream(respond), with_cache=True)
    status, headers, body = get(site, "/v2/x/manifests/t").response()
    assert status == 401
    assert int(headers[b"content-length"][0]) == len(body) and b"UNAUTHORIZED" in body
    assert b"127.0.0.1:5000/auth/token" in headers[b"www-authenticate"][0]


def test_health_reports_cache_size_free_disk_and_counters(tmp_path):
    import json

    data = b"h" * 300
    site, upstream, responses, digest = _cache_site(tmp_path, data)
    ex = get(site, f"/v2/x/blobs/{digest}")
    responses[0].protocol.dataReceived(data)
    responses[0].end()
    ex.response()
    get(site, f"/v2/x/blobs/{digest}").response()
    report = json.loads(get(site, "/health").response()[2])
    cache = report["cache"]
    assert report["status"] == "ok"
    assert cache["size_bytes"] == 300 and cache["entries"] == 1
    assert cache["free_disk_bytes"] > 0
    assert cache["blob_misses"] == 1 and cache["blob_hits"] == 1
    assert cache["bytes_from_upstream"] == 300 and cache["bytes_from_cache"] == 300


def test_public_repo_path_cannot_read_another_repos_blob(tmp_path):
    """A digest cached from a private repository is not served through a public
    repository's path unless the upstream holds it there too."""
    data = b"private layer" * 10
    digest = digest_of(data)
    public_data = b"public layer" * 10
    public_digest = digest_of(public_data)

    def respond(method, url, headers, body):
        auth = headers.getRawHeaders(b"authorization", [b""])[0]
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if "/v2/private/" in url:
            if auth != b"Bearer owner":
                return FakeResponse(401, {b"www-authenticate": b'Bearer realm="https://a/t"'}, length=0)
            return FakeResponse(200, body=data) if method == b"GET" else FakeResponse(200, length=0)
        if "/v2/public/" in url and url.endswith(digest):
            return FakeResponse(404, {b"content-type": b"application/json"}, b'{"errors":[]}') \
                if method == b"GET" else FakeResponse(404, length=0)
        if "/v2/public/" in url and url.endswith(public_digest):
            return FakeResponse(200, body=public_data) if method == b"GET" else FakeResponse(200, length=0)
        return FakeResponse(404, length=0)

    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, upstream, _ = make_site(config, FakeUpstream(respond), with_cache=True)
    assert get(site, f"/v2/private/x/blobs/{digest}", [("Authorization", "Bearer owner")]).response()[2] == data
    for _ in range(2):  # the second pull is a hit: docxy learns that anyone may pull public/x
        assert get(site, f"/v2/public/x/blobs/{public_digest}").response()[2] == public_data
    status, _, body = get(site, f"/v2/public/x/blobs/{digest}").response()
    assert status == 404 and data not in body


def test_small_blob_delivered_at_once_is_served_or_refused_cleanly(tmp_path):
    """A body that ends while the first client is being set up: served whole when it
    verifies, a JSON 502 when it does not (never a crash)."""
    good = b"tiny"
    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, _, _ = make_site(config, FakeUpstream(lambda m, u, h, b: FakeResponse(200, body=good)), with_cache=True)
    status, _, body = get(site, f"/v2/x/blobs/{digest_of(good)}").response()
    assert status == 200 and body == good
    status, _, body = get(site, f"/v2/x/blobs/{digest_of(b'other')}").response()
    assert status == 502 and b"BLOB_UNKNOWN" in body


@pytest_twisted.ensureDeferred
async def test_threaded_fill_writes_in_order_holds_the_upstream_and_verifies(tmp_path):
    """The writer thread stores every byte in order; while more than the high-water mark
    waits for the disk the upstream is paused; the blob is verified and committed."""
    import os

    from twisted.internet import reactor, task

    data = os.urandom(12 * 1024 * 1024)
    store = BlobStore(tmp_path)
    fill = Fill(store, digest_of(data), len(data), reactor, threaded=True)
    response = FakeResponse(200, body=data, auto=False)
    response.deliverBody(fill)
    for i in range(0, len(data), 65536):
        fill.dataReceived(data[i:i + 65536])
    assert response.transport.paused, "12 MiB waiting for the disk did not pause the upstream"
    response.end()
    for _ in range(500):
        if fill.state is not State.RUNNING:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert fill.state is State.COMPLETE
    assert store.path(fill.digest).read_bytes() == data


def test_accel_redirect_hands_a_stored_blob_to_nginx_and_streams_a_miss(tmp_path):
    """With --accel-redirect a GET of a stored blob is answered with its headers and
    X-Accel-Redirect naming the file under blobs/, and no body; the miss that stored it
    was streamed by docxy itself, and a HEAD is answered by docxy."""
    data = b"layer bytes " * 1000
    digest = digest_of(data)
    config = hub_config(cache_dir=str(tmp_path / "cache"), accel_redirect="/_docxy_blobs")
    site, _, _ = make_site(config, FakeUpstream(lambda m, u, h, b: FakeResponse(200, body=data)),
                           with_cache=True)
    status, headers, body = get(site, f"/v2/x/blobs/{digest}").response()
    assert status == 200 and body == data and b"x-accel-redirect" not in headers
    status, headers, body = get(site, f"/v2/x/blobs/{digest}").response()
    hex_part = digest.partition(":")[2]
    assert status == 200 and body == b""
    assert headers[b"x-accel-redirect"] == [f"/_docxy_blobs/sha256/{hex_part[:2]}/{hex_part}".encode()]
    assert headers[b"docker-content-digest"] == [digest.encode()]
    assert headers[b"content-type"] == [b"application/octet-stream"]
    assert (tmp_path / "cache" / "blobs" / "sha256" / hex_part[:2] / hex_part).read_bytes() == data
    ex = Exchange(site)
    ex.send("HEAD", f"/v2/x/blobs/{digest}")
    status, headers, _ = ex.response()
    assert status == 200 and b"x-accel-redirect" not in headers
    assert headers[b"content-length"] == [b"%d" % len(data)]
