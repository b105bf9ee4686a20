"""Upstream faults in memory: a CDN refusing an expired signed URL (docxy asks the registry
once more), a token service that is down (clear errors, cached public content still
served), and token requests no pull would make (refused before anything goes upstream)."""
import hashlib
import json

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from docxy.upstream.bodies import discard
from docxy.upstream.client import UpstreamClient
from docxy.upstream.errors import UpstreamError

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site

REGISTRY = "https://registry.test"
CDN = "https://cdn.test"
BLOB = "/v2/library/x/blobs/sha256:" + "a" * 64


# --- an expired signed URL ----------------------------------------------------------------

class ScriptedUpstream(Resource):
    """The registry and its CDN in memory, under the real client (its redirect following,
    slots and agent) through treq's RequestTraversalAgent: `script[url]` is the list of
    answers (code, headers, body) to that URL, in turn."""

    isLeaf = True

    def __init__(self, script: dict[str, list]) -> None:
        super().__init__()
        self.script = script
        self.calls: list[tuple[bytes, str, bool]] = []

    def render(self, request) -> bytes:
        scheme = "https" if request.isSecure() else "http"
        url = f"{scheme}://{request.getHeader(b'host').decode()}{request.uri.decode()}"
        self.calls.append((request.method, url, request.requestHeaders.hasHeader(b"authorization")))
        code, headers, body = self.script[url].pop(0)
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


def scripted(script: dict[str, list]) -> tuple[UpstreamClient, ScriptedUpstream]:
    """The real client over a ScriptedUpstream, and that upstream."""
    upstream = ScriptedUpstream(script)
    client = UpstreamClient(Clock(), None, connect_timeout=1, header_timeout=1,
                            max_redirects=5, pool_size=1, agent=RequestTraversalAgent(upstream))
    return client, upstream


def redirect(n: int) -> tuple[int, dict, bytes]:
    return 307, {b"location": f"{CDN}/blob?sig={n}".encode()}, b""


def cdn(code: int, headers=None) -> tuple[int, dict, bytes]:
    return code, headers or {}, b"<Error>expired</Error>" if code != 200 else b"data"


def _run(coro):
    from twisted.internet import defer

    results = []
    defer.ensureDeferred(coro).addBoth(results.append)
    assert results, "the request did not finish"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _get(client, method=b"GET"):
    from twisted.web.http_headers import Headers

    return _run(client.request(method, REGISTRY + BLOB, Headers({b"authorization": [b"Bearer t"]})))


def test_expired_cdn_url_makes_docxy_ask_the_registry_once_more():
    """CDN 403 to the first signed URL: the registry is asked again and its fresh URL followed."""
    client, upstream = scripted({REGISTRY + BLOB: [redirect(1), redirect(2)],
                                 f"{CDN}/blob?sig=1": [cdn(403)], f"{CDN}/blob?sig=2": [cdn(200)]})
    response = _get(client)
    assert response.code == 200
    assert [url for _, url, _ in upstream.calls] == [
        REGISTRY + BLOB, f"{CDN}/blob?sig=1", REGISTRY + BLOB, f"{CDN}/blob?sig=2"]
    assert [auth for _, _, auth in upstream.calls] == [True, False, True, False]


def test_every_hop_gives_its_connection_slot_back():
    """Redirects and refused downloads free their slot as they are dropped; the answer
    holds one until its body has been read."""
    client, _ = scripted({REGISTRY + BLOB: [redirect(1), redirect(2)],
                          f"{CDN}/blob?sig=1": [cdn(403)], f"{CDN}/blob?sig=2": [cdn(200)]})
    response = _get(client)
    assert client.slots.in_use(("https", "registry.test", 443)) == 0
    assert client.slots.in_use(("https", "cdn.test", 443)) == 1
    discard(response)
    assert client.slots.in_use(("https", "cdn.test", 443)) == 0


@pytest.mark.parametrize("code", [400, 401, 403, 410])
def test_a_cdn_refusing_twice_is_a_clear_error_not_a_loop(code):
    client, upstream = scripted({REGISTRY + BLOB: [redirect(1), redirect(2)],
                                 f"{CDN}/blob?sig=1": [cdn(code)], f"{CDN}/blob?sig=2": [cdn(code)]})
    with pytest.raises(UpstreamError) as raised:
        _get(client)
    assert raised.value.status == 502 and raised.value.code == "UNAVAILABLE"
    assert len(upstream.calls) == 4


@pytest.mark.parametrize("script, code, calls", [
    # a challenge from another host is for the client to answer, not an expired URL
    ({REGISTRY + BLOB: [redirect(1)],
      f"{CDN}/blob?sig=1": [cdn(401, {b"www-authenticate": b'Bearer realm="x"'})]}, 401, 2),
    # the registry's own refusal is relayed
    ({REGISTRY + BLOB: [cdn(403)]}, 403, 1),
    # a blob the CDN does not have is not an expired URL
    ({REGISTRY + BLOB: [redirect(1)], f"{CDN}/blob?sig=1": [cdn(404)]}, 404, 2),
], ids=["challenge", "registry-403", "cdn-404"])
def test_other_refusals_are_not_retried(script, code, calls):
    client, upstream = scripted(script)
    response = _get(client)
    assert response.code == code
    assert len(upstream.calls) == calls


# --- the token service is down ------------------------------------------------------------

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()
MTYPE = b"application/vnd.oci.image.manifest.v1+json"
LAYER = b"layer bytes" * 100


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def token_site(tmp_path):
    """A registry whose every request needs a token from https://auth.test/token; `down`
    (a list) makes the token service unreachable while it holds anything."""
    down: list = []
    challenge = b'Bearer realm="https://auth.test/token",service="registry.test"'

    def respond(method, url, headers, body):
        if url.startswith("https://auth.test/token"):
            if down:
                return UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
            return FakeResponse(200, {b"content-type": b"application/json"},
                                body=json.dumps({"token": "tok", "expires_in": 300}).encode())
        if not headers.getRawHeaders(b"authorization"):
            return FakeResponse(401, {b"www-authenticate": challenge, b"content-type": b"application/json"},
                                body=b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}')
        if url.endswith("/v2/"):
            return FakeResponse(200, body=b"{}")
        if "/manifests/t" in url or "/manifests/sha256:" in url:
            hdrs = {b"content-type": MTYPE, b"docker-content-digest": digest_of(MANIFEST).encode(),
                    b"content-length": str(len(MANIFEST)).encode()}
            return FakeResponse(200, hdrs, length=0) if method == b"HEAD" else FakeResponse(200, hdrs, MANIFEST)
        if url.endswith(f"/blobs/{digest_of(LAYER)}"):
            return FakeResponse(200, body=LAYER)
        return FakeResponse(404, body=b"{}")

    site, upstream, clock = make_site(hub_config(cache_dir=str(tmp_path / "cache")),
                                      FakeUpstream(respond), with_cache=True)
    return site, upstream, clock, down


def get(site, path, headers=()):
    ex = Exchange(site)
    ex.send("GET", path, headers)
    return ex.response()


def test_token_service_down_clear_errors_and_cached_public_content(tmp_path):
    """Token service down: a token request gets docxy's offline token (good for nothing
    upstream), /v2/ lets clients in, a cached public tag and blob are served with or
    without that token, an uncached tag gets a 503 naming the token service; once the
    service is back, /v2/ challenges again and tokens are the upstream's."""
    site, upstream, clock, down = token_site(tmp_path)
    status, _, body = get(site, "/auth/token?scope=repository:x:pull")
    assert status == 200 and json.loads(body)["token"] == "tok"
    auth = [("Authorization", "Bearer tok")]
    assert get(site, "/v2/x/manifests/t", auth)[2] == MANIFEST
    assert get(site, f"/v2/x/blobs/{digest_of(LAYER)}", auth)[2] == LAYER

    down.append(True)
    status, headers, body = get(site, "/auth/token?scope=repository:x:pull")
    assert status == 200 and headers[b"content-type"] == [b"application/json"]
    offline = json.loads(body)["token"]
    assert offline != "tok" and json.loads(body)["expires_in"] > 0
    offline_auth = [("Authorization", f"Bearer {offline}")]

    assert get(site, "/v2/")[0] == 200
    for headers in ((), offline_auth):
        status, _, body = get(site, "/v2/x/manifests/t", headers)
        assert status == 200 and body == MANIFEST
        status, _, body = get(site, f"/v2/x/blobs/{digest_of(LAYER)}", headers)
        assert status == 200 and body == LAYER
    status, _, body = get(site, "/v2/x/manifests/never-seen", offline_auth)
    assert status == 503 and b"token service" in body
    sent = [c[2].getRawHeaders(b"authorization", [b""])[0] for c in upstream.calls]
    assert not [a for a in sent if offline.encode() in a], "the offline token went upstream"

    # An hour later the public probe cannot get a token either: the earlier yes stands.
    down.clear()
    clock.advance(3601)
    down.append(True)
    status, _, body = get(site, f"/v2/x/blobs/{digest_of(LAYER)}")
    assert status == 200 and body == LAYER

    down.clear()
    clock.advance(31)
    status, headers, _ = get(site, "/v2/")
    assert status == 401 and b"/auth/token" in headers[b"www-authenticate"][0]
    status, _, body = get(site, "/auth/token?scope=repository:x:pull")
    assert status == 200 and json.loads(body)["token"] == "tok"


def _token_requests(upstream) -> int:
    return len([u for u in upstream.urls() if u.startswith("https://auth.test")])


def test_a_challenge_asks_the_token_service_at_most_once_per_half_minute(tmp_path):
    """/v2/ (with the cache on) makes sure the token service answers before it sends a
    client there, but at most once per TOKEN_SERVICE_TRUST seconds while it answers."""
    site, upstream, clock, down = token_site(tmp_path)
    assert get(site, "/v2/")[0] == 401
    assert _token_requests(upstream) == 1
    for _ in range(5):
        assert get(site, "/v2/")[0] == 401
    assert _token_requests(upstream) == 1
    clock.advance(31)
    assert get(site, "/v2/")[0] == 401
    assert _token_requests(upstream) == 2


def test_a_token_service_down_at_the_first_ping_lets_the_client_in(tmp_path):
    """The token service is down before any client asked for a token: the very first /v2/
    answers 200 (a client sent there would fail its whole pull), and a cached tag is then
    served to it without a token."""
    site, upstream, clock, down = token_site(tmp_path)
    status, _, body = get(site, "/auth/token?scope=repository:x:pull")
    auth = [("Authorization", "Bearer " + json.loads(body)["token"])]
    assert get(site, "/v2/x/manifests/t", auth)[2] == MANIFEST
    clock.advance(31)  # nobody has asked the token service for a while
    down.append(True)
    assert get(site, "/v2/")[0] == 200
    status, _, body = get(site, "/v2/x/manifests/t")
    assert status == 200 and body == MANIFEST


# --- token requests no pull would make ----------------------------------------------------

@pytest.mark.parametrize("query, code", [
    ("&".join(f"scope=repository:a{i}:pull" for i in range(101)), "DENIED"),
    ("scope=" + "%20".join(f"repository:a{i}:pull" for i in range(101)), "DENIED"),
    ("scope=repository:%ff%fe:pull", "NAME_INVALID"),
    ("scope=repository:..%2F..%2Fetc:pull", "NAME_INVALID"),
], ids=["101-scopes", "101-in-one", "not-utf8", "dots"])
def test_token_requests_no_pull_makes_are_refused_locally(query, code):
    site, upstream, _ = make_site()
    ex = Exchange(site)
    ex.send("GET", f"/auth/token?{query}")
    status, _, body = ex.response()
    assert status == 400 and json.loads(body)["errors"][0]["code"] == code
    assert upstream.calls == []


def test_a_hundred_scopes_are_still_forwarded():
    site, upstream, _ = make_site(hub_config(upstream={"auth_realm": "https://a.test/t",
                                                       "auth_service": "svc"}))
    ex = Exchange(site)
    ex.send("POST", "/auth/token", {"Content-Type": "application/x-www-form-urlencoded"},
            "&".join(f"scope=repository:a{i}:pull" for i in range(100)).encode())
    assert upstream.urls() == ["https://a.test/t"]


def test_tls_settings_are_built_once_per_upstream_host():
    """Every connection to one host reuses one TLS context (building one loads the whole
    trust store: per connection, 500 concurrent upstream requests cost 600 MB); hosts
    are kept apart and their number is bounded."""
    from docxy.ops.tls import ReusedContextPolicy, upstream_trust

    policy = ReusedContextPolicy(upstream_trust(None), max_hosts=2)
    first = policy.creatorForNetloc(b"registry-1.docker.io", 443)
    assert policy.creatorForNetloc(b"registry-1.docker.io", 443) is first
    cdn = policy.creatorForNetloc(b"cdn.example", 443)
    assert cdn is not first
    assert policy.creatorForNetloc(b"registry-1.docker.io", 8443) is not first
    # three hosts, room for two: the least recently used one was dropped
    assert policy.creatorForNetloc(b"cdn.example", 443) is cdn
    assert policy.creatorForNetloc(b"registry-1.docker.io", 443) is not first
