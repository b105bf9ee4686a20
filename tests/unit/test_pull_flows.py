"""Pull flows as real clients run them, in memory: tags resolved by HEAD then fetched by
digest (dockerd, containerd), a manifest cut mid-body, blob downloads resumed after a cut,
connection slots per host, a restart during an outage.  (The first client leaving before
the upstream answers: test_cache.py.)"""
from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet import defer

from docxy.upstream.errors import UpstreamError
from docxy.upstream.slots import HostSlots, hold_until_body_ends

from .fakes import FakeResponse, FakeUpstream, blob_upstream, get, hub_config, make_site

INDEX = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
ITYPE = b"application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _registry(tmp_path, modes: dict, body: bytes = INDEX, **config):
    """An upstream with tag `t` of `library/x` naming `body`; `modes["now"]` is "up",
    "down" (unreachable), "429" or "cut" (a GET sends half the manifest and closes)."""
    digest = digest_of(body)

    def respond(method, url, headers, _body):
        mode = modes["now"]
        if mode == "down":
            return UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if mode == "429":
            return FakeResponse(429, {b"retry-after": b"42"}, b'{"errors":[]}')
        if "/manifests/" not in url:
            return FakeResponse(404, length=0)
        if mode == "cut":  # no Docker-Content-Digest, a Content-Length it does not keep
            hdrs = {b"content-type": ITYPE, b"content-length": str(len(body)).encode()}
            if method == b"HEAD":
                return FakeResponse(200, hdrs, length=0)
            response = FakeResponse(200, hdrs, body=b"", length=len(body), auto=False)
            half = body[: len(body) // 2]
            response.deliverBody = _cut_after(response, half)
            return response
        hdrs = {b"content-type": ITYPE, b"docker-content-digest": digest.encode(),
                b"content-length": str(len(body)).encode()}
        if method == b"HEAD":
            return FakeResponse(200, hdrs, length=0)
        return FakeResponse(200, hdrs, body)

    site, upstream, clock = make_site(
        hub_config(cache_dir=str(tmp_path / "cache"), **config), FakeUpstream(respond),
        with_cache=True)
    return site, upstream, digest, clock


def _cut_after(response: FakeResponse, half: bytes):
    def deliver(protocol) -> None:
        response.protocol = protocol
        protocol.makeConnection(response.transport)
        protocol.dataReceived(half)
        response.cut()
    return deliver


def _gets(upstream, part: str) -> int:
    from docxy.registry.headers import MANIFEST_ACCEPT

    return len([c for c in upstream.calls if c[0] == b"GET" and part in c[1]
                and c[2].getRawHeaders(b"accept") != [MANIFEST_ACCEPT]])


def _head(site, path: str):
    from .fakes import Exchange

    ex = Exchange(site)
    ex.send("HEAD", path)
    return ex.response()


def test_a_tag_resolved_by_head_then_fetched_by_digest_is_served_in_an_outage(tmp_path):
    """dockerd's and containerd's way, once: HEAD the tag, GET the digest.  Then the
    upstream goes down: the tag is served (HEAD and GET) from the cache."""
    modes = {"now": "up"}
    site, upstream, digest, _ = _registry(tmp_path, modes)
    status, headers, _ = _head(site, "/v2/x/manifests/t")
    assert status == 200 and headers[b"docker-content-digest"] == [digest.encode()]
    assert get(site, f"/v2/x/manifests/{digest}").response()[2] == INDEX
    gets = _gets(upstream, "/manifests/")
    modes["now"] = "down"
    status, headers, _ = _head(site, "/v2/x/manifests/t")
    assert status == 200 and headers[b"docker-content-digest"] == [digest.encode()]
    assert headers[b"content-length"] == [str(len(INDEX)).encode()]
    status, headers, body = get(site, "/v2/x/manifests/t").response()
    assert status == 200 and body == INDEX and headers[b"content-type"] == [ITYPE]
    assert _gets(upstream, "/manifests/") == gets, "learning the tag cost a GET upstream"


def test_a_tag_resolved_by_head_is_served_while_the_upstream_answers_429(tmp_path):
    modes = {"now": "up"}
    site, _, digest, _ = _registry(tmp_path, modes)
    _head(site, "/v2/x/manifests/t")
    get(site, f"/v2/x/manifests/{digest}").response()
    modes["now"] = "429"
    status, headers, _ = _head(site, "/v2/x/manifests/t")
    assert status == 200 and headers[b"docker-content-digest"] == [digest.encode()]


def test_a_head_alone_remembers_no_tag(tmp_path):
    """A HEAD whose digest is never fetched leaves nothing to serve in an outage."""
    modes = {"now": "up"}
    site, _, _, _ = _registry(tmp_path, modes)
    assert _head(site, "/v2/x/manifests/t")[0] == 200
    modes["now"] = "down"
    assert _head(site, "/v2/x/manifests/t")[0] == 502
    assert list((tmp_path / "cache" / "tags").rglob("t")) == []


def test_a_manifest_cut_mid_body_is_an_error_and_never_stored(tmp_path):
    """Half of a promised manifest, no digest header, fetched by tag: 502, and the next
    request asks the upstream again instead of serving the half."""
    modes = {"now": "cut"}
    site, upstream, _, _ = _registry(tmp_path, modes)
    for attempt in (1, 2):
        status, _, body = get(site, "/v2/x/manifests/t").response()
        assert status == 502 and INDEX[: len(INDEX) // 2] not in body
        assert _gets(upstream, "/manifests/t") == attempt
    assert list((tmp_path / "cache" / "tags").rglob("t")) == []


BLOB = bytes(range(256)) * 40


def _cut_download(tmp_path, cache: bool, at: int, attempts: int = 5):
    """A client GET of BLOB whose upstream body breaks after `at` bytes; every Range GET
    gets a hand-driven 206 of the rest."""
    upstream, responses = blob_upstream(BLOB, auto=False)
    config = (hub_config(cache_dir=str(tmp_path / "cache"), resume_attempts=attempts)
              if cache else hub_config(resume_attempts=attempts))
    site, _, clock = make_site(config, upstream, with_cache=cache)
    ex = get(site, f"/v2/x/blobs/{digest_of(BLOB)}")
    responses[0].protocol.dataReceived(BLOB[:at])
    responses[0].cut()
    clock.advance(0)
    return ex, upstream, responses, clock


def test_a_cache_download_cut_mid_body_is_resumed_and_verified(tmp_path):
    """The upstream breaks after 3000 bytes: docxy asks for the rest with Range and
    If-Range, the client gets the whole blob, and it enters the cache."""
    ex, upstream, responses, _ = _cut_download(tmp_path, cache=True, at=3000)
    assert len(responses) == 2
    resumed = upstream.calls[-1][2]
    assert resumed.getRawHeaders(b"range") == [b"bytes=3000-10239"]
    assert resumed.getRawHeaders(b"if-range") == [b'"e1"']
    responses[1].protocol.dataReceived(BLOB[3000:])
    responses[1].end()
    status, _, body = ex.response()
    assert status == 200 and body == BLOB
    digest = digest_of(BLOB)
    assert (tmp_path / "cache" / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes() == BLOB


def test_a_resumed_download_that_does_not_add_up_is_discarded(tmp_path):
    """Resumed bytes that make another blob: the digest check fails, the client is
    aborted and nothing is cached."""
    ex, _, responses, _ = _cut_download(tmp_path, cache=True, at=3000)
    responses[1].protocol.dataReceived(b"x" * (len(BLOB) - 3000))
    responses[1].end()
    assert ex.transport.disconnected
    assert not list((tmp_path / "cache" / "blobs").rglob(digest_of(BLOB)[7:]))


def test_an_uncached_relay_resumes_from_the_byte_the_client_has(tmp_path):
    """--no-cache: a cut relay asks for the rest; the client sees one whole body."""
    ex, upstream, responses, _ = _cut_download(tmp_path, cache=False, at=4096)
    assert upstream.calls[-1][2].getRawHeaders(b"range") == [b"bytes=4096-10239"]
    responses[1].protocol.dataReceived(BLOB[4096:])
    responses[1].end()
    status, headers, body = ex.response()
    assert status == 200 and body == BLOB
    assert headers[b"content-length"] == [str(len(BLOB)).encode()]
    assert not ex.transport.disconnected


def test_a_relay_that_cannot_be_resumed_aborts_the_client(tmp_path):
    """Every resume fails: after the attempts the client's connection is aborted."""
    ex, _, responses, clock = _cut_download(tmp_path, cache=False, at=100, attempts=2)
    for _ in range(2):
        responses[-1].cut()
        clock.advance(10)
    assert len(responses) == 3
    assert ex.transport.disconnected


@pytest_twisted.ensureDeferred
async def test_host_slots_queue_requests_beyond_the_limit():
    """Two slots: the third request waits until a body ends; a cancelled wait leaves."""
    slots = HostSlots(2)
    first = await slots.acquire("cdn")
    await slots.acquire("cdn")
    third = defer.ensureDeferred(slots.acquire("cdn"))
    fourth = defer.ensureDeferred(slots.acquire("cdn"))
    assert not third.called and slots.waiting("cdn") == 2
    fourth.cancel()
    fourth.addErrback(lambda failure: failure.trap(defer.CancelledError))
    assert slots.waiting("cdn") == 1
    response = hold_until_body_ends(FakeResponse(200, body=b"abc"), first)
    assert not third.called
    response.deliverBody(_Nothing())
    assert third.called and slots.in_use("cdn") == 2
    assert slots.in_use("registry") == 0


def test_a_response_without_body_gives_its_slot_back_at_once():
    released = []
    hold_until_body_ends(FakeResponse(200, length=0), lambda: released.append(1))
    assert released == [1]


class _Nothing:
    def makeConnection(self, transport) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass


def test_a_restart_during_an_outage_still_serves_what_was_pulled(tmp_path):
    """Pulled once (HEAD tag, GET index by digest, GET blob), then docxy restarts while the
    upstream is down: the new daemon serves the tag, the index and the blob, because the
    repositories anyone may pull and the digests their tags name were kept on disk."""
    layer = b"layer bytes" * 100
    index = (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
             b'"config":{"digest":"' + digest_of(b"{}").encode() + b'","size":2},'
             b'"layers":[{"digest":"' + digest_of(layer).encode() + b'","size":1100}]}')
    modes = {"now": "up"}

    def respond(method, url, headers, _body):
        if modes["now"] == "down":
            return UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if "/manifests/" in url:
            hdrs = {b"content-type": ITYPE, b"docker-content-digest": digest_of(index).encode(),
                    b"content-length": str(len(index)).encode()}
            return FakeResponse(200, hdrs, length=0) if method == b"HEAD" else \
                FakeResponse(200, hdrs, index)
        if method == b"HEAD":
            return FakeResponse(200, {b"content-length": b"1100"}, length=0)
        return FakeResponse(200, body=layer)

    config = hub_config(cache_dir=str(tmp_path / "cache"))
    site, _, _ = make_site(config, FakeUpstream(respond), with_cache=True)
    assert _head(site, "/v2/x/manifests/t")[0] == 200
    assert get(site, f"/v2/x/manifests/{digest_of(index)}").response()[2] == index
    assert get(site, f"/v2/x/blobs/{digest_of(layer)}").response()[2] == layer
    modes["now"] = "down"
    restarted, _, _ = make_site(config, FakeUpstream(respond), with_cache=True)
    status, headers, _ = _head(restarted, "/v2/x/manifests/t")
    assert status == 200 and headers[b"docker-content-digest"] == [digest_of(index).encode()]
    assert get(restarted, f"/v2/x/manifests/{digest_of(index)}").response()[2] == index
    assert get(restarted, f"/v2/x/blobs/{digest_of(layer)}").response()[2] == layer
    # ...but only through the repository whose tag named it
    assert get(restarted, f"/v2/y/blobs/{digest_of(layer)}").response()[0] == 502


def _schema1() -> tuple[bytes, str]:
    """A signed schema 1 manifest as distribution 2.x makes it, and its digest (the
    SHA-256 of the payload without the signatures)."""
    import base64
    import json

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = b'{\n   "schemaVersion": 1,\n   "name": "library/x",\n   "tag": "t"\n}'
    length, tail = len(payload) - 2, payload[-2:]
    protected = b64url(json.dumps({"formatLength": length, "formatTail": b64url(tail)}).encode())
    body = (payload[:length] + b',\n   "signatures": [{"protected": "' + protected.encode()
            + b'", "signature": "c2ln"}]' + tail)
    return body, digest_of(payload)


def test_a_signed_schema1_manifest_is_verified_over_its_payload(tmp_path):
    """distribution 2.8 answers a client that accepts no v2 type (the OCI conformance
    suite asks with the OCI type only) with a signed schema 1 manifest, named by the
    digest of its payload: docxy checks that digest, serves the signed bytes, stores them."""
    from docxy.cache.manifests import SCHEMA1_SIGNED, manifest_digest

    body, digest = _schema1()
    assert manifest_digest(body, SCHEMA1_SIGNED) == digest
    assert manifest_digest(body, "application/json") == digest_of(body)

    def respond(method, url, headers, _body):
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        hdrs = {b"content-type": SCHEMA1_SIGNED.encode(), b"docker-content-digest": digest.encode(),
                b"content-length": str(len(body)).encode()}
        return FakeResponse(200, hdrs, length=0) if method == b"HEAD" else FakeResponse(200, hdrs, body)

    site, _, _ = make_site(hub_config(cache_dir=str(tmp_path / "cache")), FakeUpstream(respond),
                           with_cache=True)
    status, headers, got = get(site, "/v2/x/manifests/t").response()
    assert status == 200 and got == body and headers[b"docker-content-digest"] == [digest.encode()]
    status, _, got = get(site, f"/v2/x/manifests/{digest}").response()
    assert status == 200 and got == body


def test_a_token_request_with_empty_basic_credentials_goes_upstream_anonymous():
    """Some clients send `Authorization: Basic Og==` (no user) for no credentials; the
    token service would refuse it, so it is not forwarded."""
    site, upstream, _ = make_site(hub_config(upstream={"auth_realm": "https://a.test/t",
                                                       "auth_service": "svc"}))
    get(site, "/auth/token?scope=repository:x:pull", [("Authorization", "Basic Og==")])
    get(site, "/auth/token?scope=repository:x:pull", [("Authorization", "Basic dTpw")])
    sent = [c[2].getRawHeaders(b"authorization") for c in upstream.calls]
    assert sent == [None, [b"Basic dTpw"]]
