"""Pulls through docxy from the Hub-like test upstream, with skopeo and raw HTTP: every test
image over TLS and plain HTTP with digests equal to the upstream's, pass-through auth,
private repositories, mirror mode, redirects and headers."""
from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness.clients import ClientError, CopyResult, Skopeo
from harness.daemon import Docxy
from harness.images import ALL_MANIFEST_TYPES, Image
from harness.upstream import Upstream

pytestmark = pytest.mark.integration

def copy_through(docxy: Docxy, upstream: Upstream, ref: str, workdir: Path, *,
                 all: bool = False, creds: tuple[str, str] | None = None) -> CopyResult:
    """skopeo copy of `ref` through docxy into a dir: layout (the manifest bytes kept)."""
    with Skopeo(workdir, ca_path=upstream.ca_path, tls_verify=bool(docxy.tls_port),
                keep_data=True) as client:
        return client.copy(f"{docxy.host}/{ref}", workdir / "out", all=all, creds=creds)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_copied(copied: CopyResult, image: Image) -> None:
    """The copied manifest is byte-for-byte the upstream's, and every blob (config and
    layers) is there and matches its digest."""
    assert copied.digest == image.digest
    assert {b.digest for b in image.blobs} <= set(copied.blobs)
    for digest in copied.blobs:
        assert sha256_file(copied.blob_path(digest)) == digest


def _name_through_mirror(image: Image) -> str:
    """How a user names the image: official images without library/."""
    return f"{image.short_name}:{image.tag}"


PUBLIC_ROLES = ["alpine", "multiarch", "oci_index", "namespaced", "nested", "paginated", "large"]


@pytest.mark.parametrize("role", PUBLIC_ROLES)
@pytest.mark.parametrize("mode", ["tls", "plain"])
def test_skopeo_copies_every_image_with_upstream_digests(role, mode, upstream, docxy_tls, docxy_plain, tmp_path):
    """skopeo copies each test image through docxy (TLS and plain HTTP), anonymously, and
    gets the upstream's manifest digest and intact blobs."""
    docxy = docxy_tls if mode == "tls" else docxy_plain
    image = getattr(upstream.images, role)
    copied = copy_through(docxy, upstream, _name_through_mirror(image), tmp_path,
                          all=image.manifest.is_index)
    check_copied(copied, image)
    if image.manifest.is_index:
        assert set(copied.children) == {c.digest for c in image.manifest.children}
        for child in image.manifest.children:
            child_file = copied.path / f"{child.digest.split(':')[1]}.manifest.json"
            assert sha256_file(child_file) == child.digest


def test_private_repo_needs_credentials_and_they_pass_through(upstream, docxy_tls, tmp_path):
    """Anonymous pulls of a private repository fail; with the user's credentials (sent by
    skopeo to docxy's token endpoint and passed on) they succeed with the right digest."""
    image = upstream.images.private
    with pytest.raises(ClientError):
        copy_through(docxy_tls, upstream, image.ref, tmp_path / "anon")
    user, password = upstream.user
    copied = copy_through(docxy_tls, upstream, image.ref, tmp_path / "creds", creds=(user, password))
    check_copied(copied, image)
    entries = [e for e in upstream.token_log_entries() if e.get("sub") == user]
    assert entries, "the credentialed token request never reached the token service"


def test_mirror_mode_pulls_private_repo_without_client_credentials(upstream, docxy_mirror, tmp_path):
    """In mirror mode the client is never challenged; docxy's own account reads the
    private repository."""
    ping = urllib.request.urlopen(f"{docxy_mirror.url}/v2/", timeout=30)
    assert ping.status == 200 and ping.headers.get("WWW-Authenticate") is None
    image = upstream.images.private
    check_copied(copy_through(docxy_mirror, upstream, image.ref, tmp_path / "private"), image)
    before = len(upstream.token_log_entries())
    for n in range(2):
        alpine = copy_through(docxy_mirror, upstream, "alpine:latest", tmp_path / f"alpine{n}")
        check_copied(alpine, upstream.images.alpine)
    asked = [e for e in upstream.token_log_entries()[before:]
             if "repository:library/alpine:pull" in e.get("scopes", [])]
    assert len(asked) <= 1, "mirror mode did not reuse its cached token"
    assert all(e.get("sub") == upstream.user[0] for e in asked)


def _get(url: str, headers: dict | None = None, method: str = "GET", context=None):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        return urllib.request.urlopen(request, timeout=60, context=context)
    except urllib.error.HTTPError as e:
        return e


def _token(docxy: Docxy, scope: str, context=None) -> str:
    response = _get(f"{docxy.url}/auth/token?service=ignored&scope={scope}", context=context)
    assert response.status == 200
    return json.loads(response.read())["token"]


def test_challenge_points_at_mirror_and_token_scopes_get_library(upstream, docxy_plain):
    """A manifest 401 carries docxy's realm and the upstream's service; a token for a bare
    name is asked for as library/NAME, and works for the pull."""
    response = _get(f"{docxy_plain.url}/v2/alpine/manifests/latest")
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert f'realm="{docxy_plain.url}/auth/token"' in challenge
    assert f'service="{upstream.service}"' in challenge
    token = _token(docxy_plain, "repository:alpine:pull")
    last = upstream.token_log_entries()[-1]
    assert last["scopes"] == ["repository:library/alpine:pull"]
    assert last["service"] == upstream.service
    accept = ", ".join(ALL_MANIFEST_TYPES)
    ok = _get(f"{docxy_plain.url}/v2/alpine/manifests/latest",
              {"Authorization": f"Bearer {token}", "Accept": accept})
    assert ok.status == 200
    assert ok.headers["Docker-Content-Digest"] == upstream.images.alpine.digest
    assert hashlib.sha256(ok.read()).hexdigest() == upstream.images.alpine.digest.split(":")[1]


def test_head_manifest_keeps_length_and_digest(upstream, docxy_plain):
    """HEAD through docxy answers with the upstream's Content-Length and digest, no body."""
    token = _token(docxy_plain, "repository:org/app:pull")
    image = upstream.images.namespaced
    response = _get(f"{docxy_plain.url}/v2/org/app/manifests/{image.tag}",
                    {"Authorization": f"Bearer {token}", "Accept": ", ".join(ALL_MANIFEST_TYPES)}, "HEAD")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == image.manifest.size
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["Content-Type"] == image.media_type
    heads = [e for e in upstream.registry_log_entries() if f"/org/app/manifests/{image.tag}" in e["uri"]]
    assert heads and heads[-1]["method"] == "HEAD", "HEAD became a GET upstream"


def test_blob_redirect_is_followed_without_authorization(upstream, tmp_path):
    """A blob GET that the registry redirects to the CDN is served by docxy itself (200,
    no Location); the CDN never sees the client's Authorization."""
    args = ["--upstream", upstream.registry_url, "--upstream-ca", str(upstream.ca_path), "--library", "--no-cache"]
    with Docxy(tmp_path / "docxy", args) as docxy:
        _check_redirect_followed(upstream, docxy)


def _check_redirect_followed(upstream, docxy_plain):
    image = upstream.images.alpine
    token = _token(docxy_plain, "repository:alpine:pull")
    layer = image.manifest.layers[0]
    before = len(upstream.cdn_log_entries())
    response = _get(f"{docxy_plain.url}/v2/alpine/blobs/{layer.digest}", {"Authorization": f"Bearer {token}"})
    assert response.status == 200 and response.headers.get("Location") is None
    body = response.read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    assert int(response.headers["Content-Length"]) == layer.size
    from harness.procs import poll_until

    poll_until(lambda: len(upstream.cdn_log_entries()) > before, 10)
    new = upstream.cdn_log_entries()[before:]
    assert new and all(e["auth"] == "no" for e in new)


def test_range_is_forwarded(upstream, docxy_plain):
    """containerd resumes with Range: the partial answer comes back as 206."""
    token = _token(docxy_plain, "repository:large:pull")
    layer = upstream.images.large.manifest.layers[0]
    response = _get(f"{docxy_plain.url}/v2/large/blobs/{layer.digest}",
                    {"Authorization": f"Bearer {token}", "Range": f"bytes={layer.size - 100}-"})
    assert response.status == 206
    assert len(response.read()) == 100


def test_tag_list_paginates_through_docxy(upstream, docxy_plain, tmp_path):
    """The tag list keeps n/last and the Link header to the next page."""
    token = _token(docxy_plain, "repository:manytags:pull")
    response = _get(f"{docxy_plain.url}/v2/manytags/tags/list?n=50", {"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert len(json.loads(response.read())["tags"]) == 50
    assert 'rel="next"' in response.headers["Link"]
    with Skopeo(tmp_path, tls_verify=False) as client:
        tags = client.skopeo("list-tags", "--tls-verify=false", f"docker://{docxy_plain.host}/manytags").stdout
    assert len(json.loads(tags)["Tags"]) == len(upstream.images.paginated.tags)


def test_plain_port_redirects_to_https_except_health(docxy_tls):
    """With TLS on, the plain listener answers /health and sends everything else to HTTPS."""
    health = _get(f"{docxy_tls.plain_url}/health")
    assert health.status == 200

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{docxy_tls.plain_url}/v2/alpine/manifests/latest", timeout=10)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 301
        assert e.headers["Location"] == f"{docxy_tls.url}/v2/alpine/manifests/latest"


def test_tls_sends_the_whole_chain(upstream, docxy_tls):
    """A client that trusts only the root verifies docxy's leaf: the intermediate is sent."""
    context = ssl.create_default_context(cafile=str(upstream.ca_path))
    response = _get(f"{docxy_tls.url}/health", context=context)
    assert response.status == 200


def test_forged_host_does_not_reach_the_realm(docxy_plain):
    """A Host header naming another site changes neither the realm nor the redirects."""
    response = _get(f"{docxy_plain.url}/v2/", {"Host": "evil.example.net", "X-Forwarded-Host": "evil.example.net"})
    assert response.status == 401
    assert "evil" not in response.headers["WWW-Authenticate"]
    assert f'realm="{docxy_plain.url}/auth/token"' in response.headers["WWW-Authenticate"]


def test_bad_names_never_reach_upstream(upstream, docxy_plain):
    """Path tricks get registry errors and the upstream registry never sees them."""
    before = len(upstream.registry_log_entries())
    for path in ["/v2/foo/..%2F..%2Fv2%2F_catalog/manifests/x", "/v2/%2e%2e/manifests/x", "/v2/Foo/manifests/x"]:
        response = _get(f"{docxy_plain.url}{path}")
        assert response.status in (400, 404)
        assert json.loads(response.read())["errors"][0]["code"] == "NAME_INVALID"
    assert len(upstream.registry_log_entries()) == before


def test_plugin_is_found_after_a_non_editable_install(tmp_path):
    """`twistd docxy` comes from the installed package, not from the checkout."""
    from harness.daemon import twistd_path

    out = subprocess.run([twistd_path(), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "docxy" in out.stdout
    where = subprocess.run(
        ["python3", "-c", "import docxy, twisted.plugins.docxy_plugin as p; print(docxy.__file__); print(p.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    ).stdout.split()
    assert all("site-packages" in w for w in where), where


def test_logs_hold_no_secrets(upstream, docxy_tls, docxy_mirror, tmp_path):
    """After credentialed pulls, docxy's logs contain no password, no token and no
    Authorization value."""
    user, password = upstream.user
    copy_through(docxy_tls, upstream, upstream.images.private.ref, tmp_path / "p", creds=(user, password))
    copy_through(docxy_mirror, upstream, upstream.images.private.ref, tmp_path / "m")
    token = upstream.fetch_token(["repository:private/secret:pull"], credentials=(user, password))
    for daemon in (docxy_tls, docxy_mirror):
        log = daemon.log()
        assert "private/secret" in log, "the pulls were not logged at all"
        assert password not in log
        assert "Bearer " not in log and "Basic " not in log
        assert token.split(".")[0] not in log  # every JWT of this issuer starts alike
