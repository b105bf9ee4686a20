"""The resource tree in memory: what goes upstream and what the client gets back."""
import json

import pytest

from docxy.upstream.errors import UpstreamError

from ..fakes import Exchange, FakeResponse, FakeUpstream, hub_config, make_site

DIGEST = "sha256:" + "ab" * 32
MANIFEST = b'{"schemaVersion":2}'
CHALLENGE = (
    'Bearer realm="https://auth.registry.test/token",service="registry.test",'
    'scope="repository:library/redis:pull,push"'
)


def errors_of(body):
    return [e["code"] for e in json.loads(body)["errors"]]


def test_manifest_get_forwards_and_relays():
    """Name gets library/, every Accept line and Authorization go up; type, digest and
    length come back with the body."""
    upstream = FakeUpstream(
        lambda m, u, h, b: FakeResponse(
            200,
            {
                b"content-type": b"application/vnd.oci.image.index.v1+json",
                b"docker-content-digest": DIGEST.encode(),
                b"location": b"https://cdn.example/secret",
            },
            MANIFEST,
        )
    )
    site, upstream, _ = make_site(upstream=upstream)
    ex = Exchange(site)
    ex.send(
        "GET",
        "/v2/redis/manifests/latest?ns=docker.io",
        [
            ("Accept", "application/vnd.oci.image.index.v1+json"),
            ("Accept", "application/vnd.docker.distribution.manifest.v2+json"),
            ("Authorization", "Bearer abc"),
        ],
    )
    method, url, headers, _ = upstream.calls[0]
    assert (method, url) == (b"GET", "https://registry.test/v2/library/redis/manifests/latest")
    assert headers.getRawHeaders(b"accept") == [
        b"application/vnd.oci.image.index.v1+json",
        b"application/vnd.docker.distribution.manifest.v2+json",
    ]
    assert headers.getRawHeaders(b"authorization") == [b"Bearer abc"]
    status, hdrs, body = ex.response()
    assert status == 200 and body == MANIFEST
    assert hdrs[b"content-type"] == [b"application/vnd.oci.image.index.v1+json"]
    assert hdrs[b"docker-content-digest"] == [DIGEST.encode()]
    assert hdrs[b"content-length"] == [str(len(MANIFEST)).encode()]
    assert b"location" not in hdrs and b"transfer-encoding" not in hdrs


def test_head_stays_head_and_keeps_length():
    """HEAD is HEAD upstream, and the answer carries the upstream Content-Length."""
    upstream = FakeUpstream(
        lambda m, u, h, b: FakeResponse(
            200,
            {b"content-length": b"123456", b"docker-content-digest": DIGEST.encode()},
            length=0,
        )
    )
    site, upstream, _ = make_site(upstream=upstream)
    ex = Exchange(site)
    ex.send("HEAD", f"/v2/org/app/blobs/{DIGEST}")
    assert upstream.calls[0][0] == b"HEAD"
    assert upstream.calls[0][1] == f"https://registry.test/v2/org/app/blobs/{DIGEST}"
    status, hdrs, body = ex.response()
    assert status == 200 and body == b""
    assert hdrs[b"content-length"] == [b"123456"]
    assert hdrs[b"docker-content-digest"] == [DIGEST.encode()]


def test_every_401_gets_the_mirror_realm():
    """A 401 from a manifest (containerd skips /v2/) points at the mirror's token endpoint."""
    upstream = FakeUpstream(
        lambda m, u, h, b: FakeResponse(
            401, {b"www-authenticate": CHALLENGE.encode(), b"content-type": b"application/json"}, b"{}"
        )
    )
    site, _, _ = make_site(upstream=upstream)
    ex = Exchange(site)
    ex.send("GET", "/v2/redis/manifests/latest")
    status, hdrs, _ = ex.response()
    assert status == 401
    assert hdrs[b"www-authenticate"] == [
        b'Bearer realm="http://127.0.0.1:5000/auth/token",service="registry.test",'
        b'scope="repository:library/redis:pull,push"'
    ]


def test_forged_host_never_reaches_the_realm():
    """A Host naming another site is ignored; the realm uses the server's own address."""
    upstream = FakeUpstream(lambda m, u, h, b: FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}))
    site, _, _ = make_site(upstream=upstream)
    ex = Exchange(site)
    raw = (
        b"GET /v2/ HTTP/1.1\r\nHost: evil.example.net\r\nX-Forwarded-Host: evil.example.net\r\n\r\n"
    )
    ex.channel.dataReceived(raw)
    _, hdrs, _ = ex.response()
    assert b"evil" not in hdrs[b"www-authenticate"][0]
    assert b'realm="http://127.0.0.1:5000/auth/token"' in hdrs[b"www-authenticate"][0]


def test_public_url_builds_the_realm():
    upstream = FakeUpstream(lambda m, u, h, b: FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}))
    config = hub_config(public_url="https://mirror.example.com")
    site, _, _ = make_site(config, upstream)
    ex = Exchange(site)
    ex.send("GET", "/v2/")
    _, hdrs, _ = ex.response()
    assert b'realm="https://mirror.example.com/auth/token"' in hdrs[b"www-authenticate"][0]


@pytest.mark.parametrize(
    "method, path, code",
    [
        ("GET", "/v2/foo/..%2Fbar/manifests/x", "NAME_INVALID"),
        ("GET", "/v2/../../etc/passwd/manifests/x", "NAME_INVALID"),
        ("GET", "/v2/foo/blobs/sha256:nothex", "BLOB_UNKNOWN"),
        ("GET", "/v2/foo/manifests/-x", "MANIFEST_UNKNOWN"),
        ("GET", "/v2/foo/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/foo/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN"),
    ],
)
def test_bad_input_never_goes_upstream(method, path, code):
    """Grammar violations get a registry JSON error (404: nothing by that name can exist)
    and no upstream request."""
    site, upstream, _ = make_site()
    ex = Exchange(site)
    ex.send(method, path)
    status, hdrs, body = ex.response()
    assert status == 404
    if method == "HEAD":
        assert body == b""
        assert upstream.calls == []
        return
    assert hdrs[b"content-type"] == [b"application/json"]
    assert errors_of(body) == [code]
    assert upstream.calls == []


def test_tag_list_keeps_pagination_and_drops_ns():
    """`n` and `last` go upstream; containerd's `ns` and anything else does not."""
    upstream = FakeUpstream(
        lambda m, u, h, b: FakeResponse(200, {b"link": b'</v2/library/x/tags/list?last=b&n=2>; rel="next"'}, b"{}")
    )
    site, upstream, _ = make_site(upstream=upstream)
    ex = Exchange(site)
    ex.send("GET", "/v2/x/tags/list?n=2&last=a&ns=docker.io&evil=1")
    assert upstream.urls() == ["https://registry.test/v2/library/x/tags/list?n=2&last=a"]
    assert ex.response()[1][b"link"] == [b'</v2/library/x/tags/list?last=b&n=2>; rel="next"']


@pytest.mark.parametrize("status, error", [(502, UpstreamError(502, "UNAVAILABLE", "upstream unreachable")),
                                           (504, UpstreamError(504, "UNAVAILABLE", "upstream did not answer in time"))])
def test_upstream_failure_is_a_json_error(status, error):
    """An unreachable or silent upstream gives 502/504 with a registry JSON body."""
    site, _, _ = make_site(upstream=FakeUpstream(lambda m, u, h, b: error))
    ex = Exchange(site)
    ex.send("GET", "/v2/x/manifests/latest")
    got, hdrs, body = ex.response()
    assert got == status and errors_of(body) == ["UNAVAILABLE"]
    # the daemon keeps serving
    ex2 = Exchange(site)
    ex2.send("GET", "/health")
    assert ex2.response()[0] == 200


def test_unexpected_exception_is_a_500_without_traceback():
    site, _, _ = make_site(upstream=FakeUpstream(lambda m, u, h, b: RuntimeError("boom")))
    ex = Exchange(site)
    ex.send("GET", "/v2/x/manifests/latest")
    status, _, body = ex.response()
    assert status == 500 and b"boom" not in body and b"Traceback" not in body


def _token_upstream(token_answer=b'{"token":"t","expires_in":300}'):
    def respond(method, url, headers, body):
        if url.endswith("/v2/"):
            return FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}, b"{}")
        if url.startswith("https://auth.registry.test/token"):
            return FakeResponse(200, {b"content-type": b"application/json"}, token_answer)
        return FakeResponse(200, {b"content-type": b"application/json"}, MANIFEST)

    return FakeUpstream(respond)


def test_token_get_goes_to_upstream_realm_with_scopes_in_order():
    """Service becomes the upstream's, every scope is kept in order with library/ added,
    Basic credentials pass through, and the answer is relayed unchanged."""
    site, upstream, _ = make_site(upstream=_token_upstream())
    ex = Exchange(site)
    ex.send(
        "GET",
        "/auth/token?account=bob&service=mirror&scope=repository:redis:pull"
        "&scope=repository:org/app:pull%20repository:alpine:pull&client_id=docker",
        {"Authorization": "Basic Ym9iOnB3"},
    )
    token_call = upstream.calls[-1]
    assert token_call[1] == (
        "https://auth.registry.test/token?service=registry.test&account=bob"
        "&scope=repository%3Alibrary%2Fredis%3Apull"
        "&scope=repository%3Aorg%2Fapp%3Apull+repository%3Alibrary%2Falpine%3Apull&client_id=docker"
    )
    assert token_call[2].getRawHeaders(b"authorization") == [b"Basic Ym9iOnB3"]
    status, _, body = ex.response()
    assert status == 200 and json.loads(body)["token"] == "t"


def test_token_post_form_is_rewritten():
    """containerd's POST flow: the form gets the upstream service and library/ scopes."""
    site, upstream, _ = make_site(upstream=_token_upstream())
    ex = Exchange(site)
    form = b"grant_type=password&username=u&password=p&service=x&scope=repository%3Aredis%3Apull&client_id=containerd"
    ex.send("POST", "/auth/token", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    method, url, headers, body = upstream.calls[-1]
    assert (method, url) == (b"POST", "https://auth.registry.test/token")
    assert body == (
        b"service=registry.test&grant_type=password&username=u&password=p"
        b"&scope=repository%3Alibrary%2Fredis%3Apull&client_id=containerd"
    )
    assert ex.response()[0] == 200


def test_realm_override_skips_discovery():
    config = hub_config(upstream={"auth_realm": "https://a.test/t", "auth_service": "svc"})
    site, upstream, _ = make_site(config, _token_upstream())
    ex = Exchange(site)
    ex.send("GET", "/auth/token?scope=repository:x/y:pull")
    assert upstream.urls() == ["https://a.test/t?service=svc&scope=repository%3Ax%2Fy%3Apull"]


def test_mirror_mode_never_challenges_and_shares_tokens():
    """In mirror mode /v2/ is 200 locally, pulls carry docxy's own token, and one token
    serves many requests of the same scope."""
    config = hub_config(upstream={"mirror_mode": True})
    site, upstream, _ = make_site(config, _token_upstream())
    for _ in range(3):
        ex = Exchange(site)
        ex.send("GET", "/v2/redis/manifests/latest", {"Authorization": "Bearer from-client"})
        assert ex.response()[0] == 200
    token_calls = [u for u in upstream.urls() if "auth.registry.test" in u]
    assert token_calls == [
        "https://auth.registry.test/token?service=registry.test&scope=repository%3Alibrary%2Fredis%3Apull"
    ]
    pulls = [c for c in upstream.calls if "/manifests/" in c[1]]
    assert all(c[2].getRawHeaders(b"authorization") == [b"Bearer t"] for c in pulls)
    ex = Exchange(site)
    ex.send("GET", "/v2/")
    status, hdrs, body = ex.response()
    assert status == 200 and b"www-authenticate" not in hdrs


def test_mirror_mode_refetches_a_refused_token_once_and_hides_challenge():
    answers = []

    def respond(method, url, headers, body):
        if url.endswith("/v2/"):
            return FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}, b"{}")
        if "auth.registry.test" in url:
            answers.append(url)
            return FakeResponse(200, {}, b'{"access_token":"t%d"}' % len(answers))
        return FakeResponse(401, {b"www-authenticate": CHALLENGE.encode()}, b"{}")

    config = hub_config(upstream={"mirror_mode": True, "library": False})
    site, upstream, _ = make_site(config, FakeUpstream(respond))
    ex = Exchange(site)
    ex.send("GET", "/v2/private/x/manifests/latest")
    status, hdrs, _ = ex.response()
    assert status == 401 and b"www-authenticate" not in hdrs
    assert len(answers) == 2


def test_health_and_unknown_paths():
    site, upstream, _ = make_site()
    ex = Exchange(site)
    ex.send("GET", "/health")
    assert ex.response()[0] == 200
    ex = Exchange(site)
    ex.send("GET", "/nope")
    status, _, body = ex.response()
    assert status == 404 and errors_of(body) == ["NOT_FOUND"]
    ex = Exchange(site)
    ex.send("PUT", "/v2/x/manifests/latest", body=b"{}")
    status, _, body = ex.response()
    assert status == 405 and errors_of(body) == ["UNSUPPORTED"]
    assert upstream.calls == []


def test_blob_from_cdn_gets_its_digest_header():
    """A blob answered by a CDN (no Docker-Content-Digest) carries its digest anyway."""
    site, _, _ = make_site(upstream=FakeUpstream(lambda m, u, h, b: FakeResponse(200, {}, b"xyz")))
    ex = Exchange(site)
    ex.send("GET", f"/v2/x/blobs/{DIGEST}")
    status, hdrs, body = ex.response()
    assert status == 200 and hdrs[b"docker-content-digest"] == [DIGEST.encode()]
