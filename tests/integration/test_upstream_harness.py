"""The test upstream itself behaves like Docker Hub, checked without any mirror in between.

Token service, registry, CDN redirect, private repositories, tag pagination, and real
clients (skopeo) against it. If these fail, mirror tests built on the harness mean nothing.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import subprocess
from pathlib import Path
from typing import Mapping
from urllib.parse import urlencode, urljoin, urlsplit

import jwt
import pytest
from cryptography import x509
from harness.images import ALL_MANIFEST_TYPES, Blob
from harness.procs import poll_until
from harness.upstream import Upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)


def request(url: str, ctx: ssl.SSLContext, method: str = "GET",
            headers: Mapping[str, str] | None = None, body: bytes | None = None,
            sha256: bool = False) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request, no redirect following. With `sha256`, the body is hashed while read and
    the hex digest returned instead of the body."""
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname or "127.0.0.1", u.port, context=ctx,
                                       timeout=120)
    try:
        conn.request(method, u.path + ("?" + u.query if u.query else ""), body=body,
                     headers=dict(headers or {}))
        resp = conn.getresponse()
        if sha256:
            h = hashlib.sha256()
            while chunk := resp.read(1 << 20):
                h.update(chunk)
            return resp.status, resp.headers, h.hexdigest().encode()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": ACCEPT}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_registry_challenges_with_token_realm(upstream: Upstream) -> None:
    """`/v2/` without a token answers 401 naming the token service's realm and service."""
    status, headers, _ = request(upstream.registry_url + "/v2/", upstream.ssl_context())
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{upstream.token_url}"' in challenge
    assert f'service="{upstream.service}"' in challenge


def test_anonymous_token_pulls_public_manifest(upstream: Upstream) -> None:
    """An anonymous token for a public repo gets the manifest with the right digest."""
    image = upstream.images.alpine
    token = upstream.fetch_token([f"repository:{image.repository}:pull"])
    header = jwt.get_unverified_header(token)
    signer = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    claims = jwt.decode(token, signer.public_key(), algorithms=["RS256"],  # type: ignore[arg-type]
                        audience=upstream.service, issuer=upstream.issuer)
    assert claims["access"] == [{"type": "repository", "name": image.repository,
                                 "actions": ["pull"]}]
    assert claims["sub"] == ""
    assert {"exp", "nbf", "iat", "jti"} <= set(claims)

    url = f"{upstream.registry_url}/v2/{image.repository}/manifests/{image.tag}"
    ctx = upstream.ssl_context()
    status, headers, body = request(url, ctx, headers=bearer(token))
    assert status == 200
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Type"] == image.media_type
    assert body == image.manifest.body
    assert headers["ratelimit-limit"]

    status, headers, body = request(url, ctx, method="HEAD", headers=bearer(token))
    assert status == 200 and body == b""
    assert headers["Docker-Content-Digest"] == image.digest
    assert int(headers["Content-Length"]) == image.manifest.size

    last = upstream.token_log_entries()[-1]
    assert last["auth"] is False and last["scopes"] == [f"repository:{image.repository}:pull"]


def test_multiple_scopes_in_one_token_request(upstream: Upstream) -> None:
    """Repeated and space-separated scopes are all honoured and logged in order."""
    q = urlencode([("service", upstream.service),
                   ("scope", "repository:library/alpine:pull repository:org/app:pull"),
                   ("scope", "repository:private/secret:pull")])
    status, _, body = request(f"{upstream.token_url}?{q}", upstream.ssl_context())
    assert status == 200
    answer = json.loads(body)
    assert answer["expires_in"] == 300 and answer["token"] == answer["access_token"]
    assert answer["issued_at"]
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert [a["name"] for a in claims["access"]] == ["library/alpine", "org/app"]
    assert upstream.token_log_entries()[-1]["scopes"] == [
        "repository:library/alpine:pull", "repository:org/app:pull",
        "repository:private/secret:pull"]


def test_private_repo_needs_credentials(upstream: Upstream) -> None:
    """Anonymous tokens are refused on the private repo; a user's token is accepted."""
    image = upstream.images.private
    scope = f"repository:{image.repository}:pull"
    url = f"{upstream.registry_url}/v2/{image.repository}/manifests/{image.tag}"
    ctx = upstream.ssl_context()

    anonymous = upstream.fetch_token([scope])
    status, headers, body = request(url, ctx, headers=bearer(anonymous))
    assert status in (401, 403), body
    assert json.loads(body)["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")

    user, password = upstream.user
    q = urlencode({"service": upstream.service, "scope": scope})
    status, _, _ = request(f"{upstream.token_url}?{q}", ctx,
                           headers={"Authorization": basic(user, "wrong")})
    assert status == 401
    entry = upstream.token_log_entries()[-1]
    assert entry["auth"] is True and entry["status"] == 401
    assert "wrong" not in json.dumps(entry)

    token = upstream.fetch_token([scope], credentials=(user, password))
    status, headers, _ = request(url, ctx, headers=bearer(token))
    assert status == 200
    assert headers["Docker-Content-Digest"] == image.digest


def test_token_post_form_flow(upstream: Upstream) -> None:
    """containerd's POST flow: password grant gives a refresh token that can be used."""
    user, password = upstream.user
    ctx = upstream.ssl_context()
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    scope = f"repository:{upstream.images.private.repository}:pull"
    body = urlencode({"grant_type": "password", "username": user, "password": password,
                      "service": upstream.service, "scope": scope,
                      "client_id": "containerd-client"}).encode()
    status, _, answer = request(upstream.token_url, ctx, "POST", form, body)
    assert status == 200
    first = json.loads(answer)
    assert first["access_token"] and first["refresh_token"]

    body = urlencode({"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                      "service": upstream.service, "scope": scope}).encode()
    status, _, answer = request(upstream.token_url, ctx, "POST", form, body)
    assert status == 200
    claims = jwt.decode(json.loads(answer)["access_token"],
                        options={"verify_signature": False})
    assert claims["sub"] == user and claims["access"][0]["actions"] == ["pull"]

    body = urlencode({"grant_type": "password", "username": user, "password": "nope",
                      "service": upstream.service, "scope": scope}).encode()
    status, _, _ = request(upstream.token_url, ctx, "POST", form, body)
    assert status == 401
    assert all("nope" not in line for line in upstream.token_log_lines())


def test_foreign_service_token_is_rejected_by_registry(upstream: Upstream) -> None:
    """A token issued for another service (audience) does not open the registry."""
    image = upstream.images.alpine
    token = upstream.fetch_token([f"repository:{image.repository}:pull"],
                                 service="registry.docker.io")
    status, _, _ = request(f"{upstream.registry_url}/v2/{image.repository}/manifests/latest",
                           upstream.ssl_context(), headers=bearer(token))
    assert status == 401


def _follow_blob(upstream: Upstream, repository: str, blob: Blob) -> str:
    """GET the blob from the registry (expect 307 to the CDN), then from the CDN without
    Authorization; returns the CDN URL after checking the bytes' sha256."""
    ctx = upstream.ssl_context()
    token = upstream.fetch_token([f"repository:{repository}:pull"])
    url = f"{upstream.registry_url}/v2/{repository}/blobs/{blob.digest}"
    status, headers, _ = request(url, ctx, headers=bearer(token))
    assert status == 307
    location = urljoin(url, headers["Location"])
    assert location.startswith(upstream.cdn_url + "/docker/")
    assert urlsplit(location).hostname != urlsplit(upstream.registry_url).hostname

    status, headers, _ = request(url, ctx, "HEAD", headers=bearer(token))
    assert status == 307 and headers["Location"] == location

    status, headers, digest = request(location, ctx, sha256=True)
    assert status == 200
    assert int(headers["Content-Length"]) == blob.size
    assert "sha256:" + digest.decode() == blob.digest
    return location


def test_blob_get_redirects_to_cdn(upstream: Upstream) -> None:
    """Blob GET/HEAD answer 307 to another host; the CDN serves the exact bytes."""
    image = upstream.images.alpine
    layer = image.manifest.layers[0]
    location = _follow_blob(upstream, image.repository, layer)
    path = urlsplit(location).path
    served = poll_until(lambda: [e for e in upstream.cdn_log_entries() if e["uri"] == path])
    assert all(e["auth"] == "no" for e in served)
    assert served[-1]["status"] == 200 and served[-1]["body_bytes_sent"] == layer.size

    status, _, body = request(location, upstream.ssl_context(),
                              headers={"Range": "bytes=0-9"})
    assert status == 206 and len(body) == 10


def test_large_layer_is_served_whole(upstream: Upstream) -> None:
    """The large layer comes out of the CDN with its digest intact."""
    image = upstream.images.large
    big = max(image.manifest.layers, key=lambda b: b.size)
    _follow_blob(upstream, image.repository, big)


def test_tag_list_paginates_with_link(upstream: Upstream) -> None:
    """`n=` pages through all 120 tags in order, with a Link header to the next page."""
    image = upstream.images.paginated
    ctx = upstream.ssl_context()
    token = upstream.fetch_token([f"repository:{image.repository}:pull"])
    url = f"{upstream.registry_url}/v2/{image.repository}/tags/list?n=50"
    seen: list[str] = []
    pages = 0
    while url:
        status, headers, body = request(url, ctx, headers=bearer(token))
        assert status == 200
        data = json.loads(body)
        assert data["name"] == image.repository
        seen += data["tags"]
        pages += 1
        link = headers.get("Link")
        if link:
            assert link.endswith('>; rel="next"')
            url = urljoin(url, link[1:link.index(">")])
        else:
            url = ""
    assert pages == 3
    assert seen == sorted(image.tags)

    status, headers, body = request(
        f"{upstream.registry_url}/v2/{image.repository}/tags/list", ctx, headers=bearer(token))
    assert status == 200 and "Link" not in headers
    assert len(json.loads(body)["tags"]) == len(image.tags)

    status, _, _ = request(f"{upstream.registry_url}/v2/{image.repository}/tags/list?n=5",
                           ctx)
    assert status == 401


def test_index_manifests_and_children(upstream: Upstream) -> None:
    """Manifest list and OCI index come back as pushed; their children resolve by digest."""
    ctx = upstream.ssl_context()
    for image in (upstream.images.multiarch, upstream.images.oci_index):
        token = upstream.fetch_token([f"repository:{image.repository}:pull"])
        base = f"{upstream.registry_url}/v2/{image.repository}/manifests/"
        status, headers, body = request(base + image.tag, ctx, headers=bearer(token))
        assert status == 200 and headers["Content-Type"] == image.media_type
        assert hashlib.sha256(body).hexdigest() == image.digest.removeprefix("sha256:")
        child = image.manifest.child_for("amd64")
        status, headers, body = request(base + child.digest, ctx, headers=bearer(token))
        assert status == 200 and headers["Content-Type"] == child.media_type
        assert body == child.body


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300)


def test_skopeo_against_upstream(upstream: Upstream, tmp_path: Path) -> None:
    """skopeo inspects and copies public images anonymously and the private one with creds."""
    certs = str(upstream.cert_dir)
    host = upstream.registry_host
    alpine = upstream.images.alpine
    raw = _skopeo("inspect", "--raw", "--no-creds", "--cert-dir", certs,
                  f"docker://{host}/{alpine.ref}")
    assert raw.returncode == 0, raw.stderr
    assert hashlib.sha256(raw.stdout.encode()).hexdigest() == alpine.digest[7:]

    out = tmp_path / "alpine"
    copied = _skopeo("copy", "--src-no-creds", "--src-cert-dir", certs,
                     f"docker://{host}/{alpine.ref}", f"dir:{out}")
    assert copied.returncode == 0, copied.stderr
    for blob in alpine.blobs:
        data = (out / blob.digest.removeprefix("sha256:")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == blob.digest[7:]

    multi = upstream.images.multiarch
    out = tmp_path / "multi"
    copied = _skopeo("copy", "--src-no-creds", "--src-cert-dir", certs,
                     "--override-arch", "amd64", "--override-os", "linux",
                     f"docker://{host}/{multi.ref}", f"dir:{out}")
    assert copied.returncode == 0, copied.stderr
    amd64 = multi.manifest.child_for("amd64")
    assert (out / "manifest.json").read_bytes() == amd64.body

    private = upstream.images.private
    denied = _skopeo("inspect", "--raw", "--no-creds", "--cert-dir", certs,
                     f"docker://{host}/{private.ref}")
    assert denied.returncode != 0
    user, password = upstream.user
    out = tmp_path / "private"
    copied = _skopeo("copy", "--src-creds", f"{user}:{password}", "--src-cert-dir", certs,
                     f"docker://{host}/{private.ref}", f"dir:{out}")
    assert copied.returncode == 0, copied.stderr
    assert (out / "manifest.json").read_bytes() == private.manifest.body
