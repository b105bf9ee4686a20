"""Several registries behind one docxy, in memory: where each request goes, what the
client is told, what is refused without a word upstream, and one shared cache."""
import hashlib
import json
from urllib.parse import urlsplit

import pytest

from docxy.admission.networks import NetworkPolicy
from docxy.admission.policy import ClientPolicy
from docxy.config import Config
from docxy.registry.presets import Upstream

from .fakes import Exchange, FakeResponse, FakeUpstream, hub, make_site

LAYER = b"layer bytes shared by both registries"
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()

HUB_CHALLENGE = 'Bearer realm="https://auth.hub.test/token",service="hub.test"'
GHCR_CHALLENGE = 'Bearer realm="https://ghcr.test/token",service="ghcr.test"'


def config(tmp_path=None, **ghcr):
    ghcr_upstream = Upstream(
        "ghcr.io", "https://ghcr.test", prefixes=("ghcr",), hosts=("ghcr.mirror.example",),
        **ghcr,
    )
    return Config(
        upstreams=(hub("https://hub.test"), ghcr_upstream),
        cache_dir=str(tmp_path / "cache") if tmp_path else None,
    )


def registries(method, url, headers, body):
    """Two registries, each with its own challenge and token service, holding the same
    layer and manifest; a request needs a Bearer token."""
    parts = urlsplit(url)
    challenge = HUB_CHALLENGE if parts.hostname.endswith("hub.test") else GHCR_CHALLENGE
    if parts.path == "/token":
        return FakeResponse(200, {b"content-type": b"application/json"},
                            json.dumps({"token": f"t-{parts.hostname}"}).encode())
    if not headers.getRawHeaders(b"authorization"):
        scope = 'scope="repository:org/app:pull"'
        return FakeResponse(401, {b"www-authenticate": f"{challenge},{scope}".encode()}, b"{}")
    if "/manifests/" in parts.path:
        return FakeResponse(200, {b"content-type": b"application/vnd.oci.image.manifest.v1+json",
                                  b"docker-content-digest": MANIFEST_DIGEST.encode()},
                            b"" if method == b"HEAD" else MANIFEST,
                            length=len(MANIFEST))
    if "/blobs/" in parts.path:
        return FakeResponse(200, {}, b"" if method == b"HEAD" else LAYER, length=len(LAYER))
    return FakeResponse(404)


def send(site, path, headers=(), method="GET", host=None):
    ex = Exchange(site)
    ex.send(method, path, ([("Host", host)] if host else []) + list(headers))
    return ex.response()


BEARER = [("Authorization", "Bearer client-token")]


def test_ns_selects_the_upstream_and_is_echoed():
    """containerd's ns= picks the registry; library/ is added for docker.io only; the
    answer carries OCI-Namespace."""
    site, upstream, _ = make_site(config(), FakeUpstream(registries))
    status, headers, _ = send(site, "/v2/org/app/manifests/1?ns=ghcr.io", BEARER)
    assert status == 200 and headers[b"oci-namespace"] == [b"ghcr.io"]
    status, headers, _ = send(site, "/v2/alpine/manifests/1?ns=docker.io", BEARER)
    assert status == 200 and headers[b"oci-namespace"] == [b"docker.io"]
    assert upstream.urls() == [
        "https://ghcr.test/v2/org/app/manifests/1",
        "https://hub.test/v2/library/alpine/manifests/1",
    ]


def test_prefix_host_and_default_select_too():
    site, upstream, _ = make_site(config(), FakeUpstream(registries))
    assert send(site, "/v2/ghcr.io/org/app/manifests/1", BEARER)[0] == 200
    assert send(site, "/v2/ghcr/org/app/manifests/2", BEARER)[0] == 200
    assert send(site, "/v2/org/app/manifests/3", BEARER, host="ghcr.mirror.example")[0] == 200
    assert send(site, "/v2/docker.io/alpine/manifests/4", BEARER)[0] == 200
    assert send(site, "/v2/alpine/manifests/5", BEARER)[0] == 200
    assert upstream.urls() == [
        "https://ghcr.test/v2/org/app/manifests/1",
        "https://ghcr.test/v2/org/app/manifests/2",
        "https://ghcr.test/v2/org/app/manifests/3",
        "https://hub.test/v2/library/alpine/manifests/4",
        "https://hub.test/v2/library/alpine/manifests/5",
    ]


@pytest.mark.parametrize(
    "path, host",
    [
        ("/v2/org/app/manifests/1?ns=evil.example", None),
        ("/v2/quay.io/org/app/manifests/1", None),
        ("/v2/org/app/blobs/" + LAYER_DIGEST + "?ns=quay.io", None),
        ("/v2/?ns=evil.example", None),
        ("/v2/org/app/manifests/1", "evil.example"),
        ("/auth/token/evil.example?scope=repository:x/y:pull", None),
        ("/auth/token?scope=repository:quay.io/x/y:pull", None),
    ],
)
def test_unconfigured_registries_are_refused_and_nothing_is_sent(path, host):
    """An unknown ns, prefix, Host or token realm gets a registry JSON error, and no
    request leaves docxy."""
    seen = {}

    def policy(metrics, clock):
        seen["metrics"] = metrics
        return ClientPolicy(NetworkPolicy(), metrics)

    site, upstream, _ = make_site(config(), FakeUpstream(registries),
                                  own_hosts=("mirror.example",), policy=policy)
    status, headers, body = send(site, path, BEARER, host=host)
    assert status == 404 and headers[b"content-type"] == [b"application/json"]
    assert [e["code"] for e in json.loads(body)["errors"]] == ["NAME_UNKNOWN"]
    assert upstream.calls == []
    assert seen["metrics"].registry.get_sample_value(
        "docxy_refusals_total", {"reason": "not_mirrored"}) == 1


def test_challenges_point_at_the_token_endpoint_of_the_selection():
    """ns and Host get /auth/token/<name>; a prefixed name keeps /auth/token, with the
    prefix in the scope so the client asks for a token in its own names."""
    site, _, _ = make_site(config(), FakeUpstream(registries))
    realms = {}
    for key, path, host in [
        ("ns", "/v2/org/app/manifests/1?ns=ghcr.io", None),
        ("host", "/v2/org/app/manifests/1", "ghcr.mirror.example"),
        ("prefix", "/v2/ghcr/org/app/manifests/1", None),
        ("ping", "/v2/?ns=ghcr.io", None),
    ]:
        status, headers, _ = send(site, path, host=host)
        assert status == 401
        realms[key] = headers[b"www-authenticate"][0].decode()
    assert realms["ns"] == (
        'Bearer realm="http://127.0.0.1:5000/auth/token/ghcr.io",service="ghcr.test",'
        'scope="repository:org/app:pull"'
    )
    assert 'realm="http://127.0.0.1:5000/auth/token/ghcr.io"' in realms["host"]
    assert realms["prefix"] == (
        'Bearer realm="http://127.0.0.1:5000/auth/token",service="ghcr.test",'
        'scope="repository:ghcr/org/app:pull"'
    )
    assert 'realm="http://127.0.0.1:5000/auth/token/ghcr.io"' in realms["ping"]


@pytest.mark.parametrize(
    "path, token_url",
    [
        ("/auth/token/ghcr.io?service=x&scope=repository:org/app:pull",
         "https://ghcr.test/token?service=ghcr.test&scope=repository%3Aorg%2Fapp%3Apull"),
        ("/auth/token?service=x&scope=repository:ghcr/org/app:pull",
         "https://ghcr.test/token?service=ghcr.test&scope=repository%3Aorg%2Fapp%3Apull"),
        ("/auth/token?service=x&scope=repository:docker.io/alpine:pull",
         "https://auth.hub.test/token?service=hub.test&scope=repository%3Alibrary%2Falpine%3Apull"),
        ("/auth/token?service=x&scope=repository:alpine:pull",
         "https://auth.hub.test/token?service=hub.test&scope=repository%3Alibrary%2Falpine%3Apull"),
    ],
)
def test_token_requests_reach_the_selected_token_service(path, token_url):
    """Each upstream's own realm and service, learned from its challenge; scopes in the
    upstream's names."""
    site, upstream, _ = make_site(config(), FakeUpstream(registries))
    status, _, _ = send(site, path)
    assert status == 200
    assert upstream.urls()[-1] == token_url


def test_repository_patterns_refuse_without_asking():
    """A repository outside an upstream's patterns is DENIED (403) for pulls and tokens,
    and nothing goes upstream."""
    seen = {}

    def policy(m, clock):
        seen["m"] = m
        return ClientPolicy(NetworkPolicy(), m)

    site, upstream, _ = make_site(config(repositories=("org/*",)), FakeUpstream(registries),
                                  policy=policy)
    metrics = seen["m"].registry
    assert send(site, "/v2/org/app/manifests/1?ns=ghcr.io", BEARER)[0] == 200
    calls = len(upstream.calls)
    for path in ("/v2/other/app/manifests/1?ns=ghcr.io",
                 "/v2/ghcr/other/app/blobs/" + LAYER_DIGEST,
                 "/auth/token/ghcr.io?scope=repository:other/app:pull",
                 "/auth/token?scope=repository:ghcr/org/app:pull%20repository:ghcr/other/x:pull"):
        status, _, body = send(site, path, BEARER)
        assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED", path
    assert len(upstream.calls) == calls
    assert metrics.get_sample_value("docxy_refusals_total", {"reason": "repository"}) == 4


def test_a_blob_is_stored_once_whichever_registry_it_came_from(tmp_path):
    """docker.io's pull stores the layer; ghcr.io's pull of the same digest is served from
    that copy after ghcr.io confirms (HEAD) the client may have it there."""
    site, upstream, _ = make_site(config(tmp_path), FakeUpstream(registries), with_cache=True)
    status, _, body = send(site, f"/v2/org/app/blobs/{LAYER_DIGEST}?ns=docker.io", BEARER)
    assert status == 200 and body == LAYER
    status, _, body = send(site, f"/v2/org/app/blobs/{LAYER_DIGEST}?ns=ghcr.io", BEARER)
    assert status == 200 and body == LAYER
    ghcr_calls = [(m, u) for m, u, _, _ in upstream.calls if u.startswith("https://ghcr.test/v2/")]
    assert ghcr_calls == [(b"HEAD", f"https://ghcr.test/v2/org/app/blobs/{LAYER_DIGEST}")]
    stored = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.read_bytes() == LAYER]
    assert len(stored) == 1


def test_tags_are_remembered_per_upstream(tmp_path):
    """The same repository and tag on two registries are two different tags."""
    site, _, _ = make_site(config(tmp_path), FakeUpstream(registries), with_cache=True)
    for ns in ("docker.io", "ghcr.io"):
        assert send(site, f"/v2/org/app/manifests/1?ns={ns}", BEARER)[0] == 200
    tags = sorted(p.relative_to(tmp_path / "cache" / "tags").as_posix()
                  for p in (tmp_path / "cache" / "tags").rglob("1"))
    assert tags == ["docker.io/org/app/1", "ghcr.io/org/app/1"]


def test_a_refused_blob_of_another_registry_is_not_served(tmp_path):
    """Stored through docker.io, asked through ghcr.io by a client ghcr.io refuses: the
    refusal is answered, the stored copy is not."""

    def respond(method, url, headers, body):
        if url.startswith("https://ghcr.test/v2/"):
            return FakeResponse(401, {b"www-authenticate": GHCR_CHALLENGE.encode()}, b"{}")
        return registries(method, url, headers, body)

    site, _, _ = make_site(config(tmp_path), FakeUpstream(respond), with_cache=True)
    assert send(site, f"/v2/org/app/blobs/{LAYER_DIGEST}", BEARER)[0] == 200
    status, headers, body = send(site, f"/v2/org/app/blobs/{LAYER_DIGEST}?ns=ghcr.io", BEARER)
    assert status == 401 and LAYER not in body
    assert b"/auth/token/ghcr.io" in headers[b"www-authenticate"][0]


def test_health_lists_the_registries():
    """/health says which registries are mirrored and which is the default."""
    site, upstream, _ = make_site(config(), FakeUpstream(registries))
    status, _, body = send(site, "/health")
    report = json.loads(body)
    assert status == 200 and report["status"] == "ok"
    assert report["registries"] == ["docker.io", "ghcr.io"]
    assert report["default_registry"] == "docker.io"
    assert upstream.calls == []
