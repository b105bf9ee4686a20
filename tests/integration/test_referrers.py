"""Signatures through docxy: the OCI 1.1 referrers API relayed and cached, the referrers tag
schema served as tags are, and the signature manifests and blobs fetched by digest, so that
notation and cosign verify images pulled through the mirror, also while the upstream is down.

Two upstreams stand behind one docxy (cache on): `ghcr.io`'s role is played by the harness
registry with the referrers API in front of it (harness.referrers: distribution 2.8 has
none), `docker.io`'s by the plain harness registry, which answers 404 for referrers as every
registry without the API does.  Each holds `org/app` and `library/alpine`, signed as notation
and cosign sign them (harness.signatures); the plain one also has the tags those tools push
where there is no API (`sha256-<hex>` and `sha256-<hex>.sig`).

Neither cosign, notation nor oras can be installed here (no Debian package; the Go module
proxy is not reachable; PyPI's `oras` has no referrers discovery), so `OciClient` below calls
the registry as they do (oras-go's Referrers with its tag-schema fallback, the digests of
every manifest and blob checked, the signatures verified with the key).  A real client of
signatures runs too: skopeo (containers/image) with `use-sigstore-attachments` fetches
cosign's `sha256-<hex>.sig` signatures through docxy (Debian's build cannot verify them:
that is done here on what it fetched).
"""
from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlencode

import pytest
from harness.clients import ClientError, Skopeo
from harness.daemon import Docxy
from harness.images import OCI_INDEX, OCI_MANIFEST
from harness.procs import poll_until
from harness.signatures import (
    COSIGN_ARTIFACT,
    EMPTY,
    JWS,
    NOTATION_ARTIFACT,
    SIMPLE_SIGNING,
    Signed,
    Signer,
    cosign_tag,
    push_signatures,
    referrer_descriptor,
    referrers_tag,
    verify_cosign,
    verify_notation,
)
from harness.upstream import Upstream

pytestmark = pytest.mark.integration

SIGNED_AT = "registry.example"  # the registry name cosign's payloads give (skopeo remaps it)
GHCR_HOST = "ghcr.mirror.test"  # the Host that selects ghcr.io
MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST,
                            "application/vnd.docker.distribution.manifest.list.v2+json",
                            "application/vnd.docker.distribution.manifest.v2+json"])


# -- a client that calls a registry as oras-go (notation) and cosign do -------------------

class OciClient:
    """Fresh state each time (no token, no knowledge of the registry), like a new client
    process.  `query` (`ns=ghcr.io`), `prefix` (`ghcr.io/`) and `host` select the registry
    the way containerd, podman and a Host-named mirror do."""

    def __init__(self, base: str, query: str = "", prefix: str = "", host: str | None = None):
        self.base = base
        self.query = query
        self.prefix = prefix
        self.host = host
        self.tokens: dict[str, str] = {}

    def request(self, path: str, accept: str | None = None, method: str = "GET",
                extra: str = "") -> tuple[int, dict[str, str], bytes]:
        """`path` below /v2/<prefix>; a challenge is answered with a token from its realm."""
        query = "&".join(q for q in (extra, self.query) if q)
        url = f"{self.base}/v2/{self.prefix}{path}" + (f"?{query}" if query else "")
        for attempt in (1, 2):
            headers = {"Accept": accept} if accept else {}
            if self.host:
                headers["Host"] = self.host
            scope = self._scope(path)
            if scope in self.tokens:
                headers["Authorization"] = f"Bearer {self.tokens[scope]}"
            status, answer, body = _http(method, url, headers)
            if status != 401 or attempt == 2:
                return status, answer, body
            self.tokens[scope] = self._token(answer["www-authenticate"])
        raise AssertionError("unreachable")

    def _scope(self, path: str) -> str:
        name = path.rsplit("/", 2)[0]
        return f"repository:{self.prefix}{name}:pull"

    def _token(self, challenge: str) -> str:
        assert challenge.startswith("Bearer "), challenge
        params = dict(part.split("=", 1) for part in _split_challenge(challenge[7:]))
        realm = params.pop("realm")
        query = urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        headers = {"Host": self.host} if self.host else {}
        status, _, body = _http("GET", f"{realm}?{query}", headers)
        assert status == 200, (status, body)
        return json.loads(body)["token"]

    def resolve(self, repository: str, tag: str) -> str:
        """A tag's digest, by HEAD (oras-go's Resolve, notation's first step)."""
        status, headers, _ = self.request(f"{repository}/manifests/{tag}", MANIFEST_TYPES, "HEAD")
        assert status == 200, status
        return headers["docker-content-digest"]

    def manifest(self, repository: str, reference: str, digest: str | None = None) -> tuple[dict, bytes]:
        """A manifest, its digest checked (against `reference` when it is one)."""
        status, headers, body = self.request(f"{repository}/manifests/{reference}", MANIFEST_TYPES)
        assert status == 200, (status, body[:300])
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        assert headers["docker-content-digest"] == got
        assert got == (digest or (reference if ":" in reference else got))
        return json.loads(body), body

    def blob(self, repository: str, descriptor: dict) -> bytes:
        status, _, body = self.request(f"{repository}/blobs/{descriptor['digest']}")
        assert status == 200, status
        assert "sha256:" + hashlib.sha256(body).hexdigest() == descriptor["digest"]
        assert len(body) == descriptor["size"]
        return body

    def referrers_api(self, repository: str, digest: str, artifact_type: str | None = None
                      ) -> tuple[int, list[dict] | None, bool]:
        """(status, descriptors, filtered by the registry) from the referrers API; the
        descriptors are None when the registry has no API (404, or no index answered)."""
        extra = f"artifactType={quote(artifact_type, safe='')}" if artifact_type else ""
        status, headers, body = self.request(f"{repository}/referrers/{digest}", OCI_INDEX, extra=extra)
        if status == 404 or headers.get("content-type") != OCI_INDEX:
            return status, None, False
        assert status == 200, (status, body[:300])
        filtered = "artifactType" in headers.get("oci-filters-applied", "")
        return status, json.loads(body)["manifests"], filtered

    def referrers(self, repository: str, digest: str, artifact_type: str | None = None
                  ) -> tuple[list[dict], str]:
        """oras-go's Referrers: the API; on 404 the tag schema (`sha256-<hex>`, none if
        that is 404 too); filtered here when the registry did not.  Returns the
        descriptors and which way they came ("api" or "tag schema")."""
        _, found, filtered = self.referrers_api(repository, digest, artifact_type)
        how = "api"
        if found is None:
            how = "tag schema"
            status, _, body = self.request(f"{repository}/manifests/{referrers_tag(digest)}", OCI_INDEX)
            found = json.loads(body)["manifests"] if status == 200 else []
        if artifact_type and not filtered:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return found, how


def _split_challenge(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()] if current.strip() else parts


def _http(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# -- what notation and cosign do to verify -------------------------------------------------

def notation_verifies(client: OciClient, signer: Signer, signed: Signed, how: str,
                      name: str | None = None) -> None:
    """notation verify: resolve the tag, list the referrers of type notary signature, fetch
    each signature manifest and its envelope by digest, verify the envelope.  `name` is the
    repository as the client names it (`alpine` for docker.io's `library/alpine`)."""
    image = signed.image
    name = name or image.repository
    digest = client.resolve(name, image.tag)
    assert digest == image.digest
    found, way = client.referrers(name, digest, NOTATION_ARTIFACT)
    assert way == how
    assert found == [referrer_descriptor(signed.notation)]
    doc, body = client.manifest(name, found[0]["digest"])
    assert body == signed.notation.body
    assert doc["subject"]["digest"] == digest and doc["artifactType"] == NOTATION_ARTIFACT
    assert doc["config"]["mediaType"] == EMPTY and client.blob(name, doc["config"]) == b"{}"
    (layer,) = doc["layers"]
    assert layer["mediaType"] == JWS
    verify_notation(signer.public_key, client.blob(name, layer), digest)


def cosign_verifies(client: OciClient, signer: Signer, signed: Signed, classic: bool,
                    name: str | None = None) -> None:
    """cosign verify --key: GET the image manifest, then its signature: the referrer of
    cosign's artifact type (OCI 1.1 mode), or the `sha256-<hex>.sig` tag (classic); the
    payload blobs fetched by digest and verified."""
    image = signed.image
    name = name or image.repository
    client.manifest(name, image.tag, image.digest)
    if classic:
        doc, sig_body = client.manifest(name, cosign_tag(image.digest))
        assert sig_body == signed.cosign_tagged.body
    else:
        found, way = client.referrers(name, image.digest, COSIGN_ARTIFACT)
        assert way == "api" and found == [referrer_descriptor(signed.cosign)]
        doc, sig_body = client.manifest(name, found[0]["digest"])
        assert sig_body == signed.cosign.body and doc["subject"]["digest"] == image.digest
    client.blob(name, doc["config"])
    payloads = {layer["digest"]: client.blob(name, layer)
                for layer in doc["layers"] if layer["mediaType"] == SIMPLE_SIGNING}
    verify_cosign(signer.public_key, doc, payloads, image.digest)


def skopeo_gets_cosign_signatures(workdir: Path, docxy: Docxy, signer: Signer,
                                  signed: Signed, unsigned=None) -> None:
    """skopeo (containers/image) with `use-sigstore-attachments` copies an image through
    docxy with cosign's signatures, which it finds under `sha256-<hex>.sig`; what it stored
    verifies with the key.  An `unsigned` image copies with none.  (Debian builds skopeo
    with sigstore policy checks disabled, "Debian-local change: sigstore disabled", so the
    verification of what skopeo fetched is done here.)"""
    registries_d = workdir / "registries.d"
    registries_d.mkdir(parents=True, exist_ok=True)
    (registries_d / "docxy.yaml").write_text(
        f"docker:\n  {docxy.host}:\n    use-sigstore-attachments: true\n")
    with Skopeo(workdir / "skopeo", tls_verify=False) as skopeo:
        def copy(image) -> list[dict]:
            dest = workdir / image.repository.replace("/", "_")
            skopeo.skopeo(f"--registries.d={registries_d}", "copy", "--retry-times=0",
                          "--src-tls-verify=false",
                          f"docker://{docxy.host}/{image.repository}@{image.digest}", f"dir:{dest}")
            manifest = (dest / "manifest.json").read_bytes()
            assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image.digest
            header = b"\x00sigstore-json\n"  # containers/image's form of a sigstore signature
            found = []
            for path in sorted(dest.glob("signature-*")):
                data = path.read_bytes()
                assert data.startswith(header), data[:40]
                found.append(json.loads(data[len(header):]))
            return found

        (signature,) = copy(signed.image)
        assert signature["mimeType"] == SIMPLE_SIGNING
        payload = base64.b64decode(signature["payload"])
        digest = "sha256:" + hashlib.sha256(payload).hexdigest()
        layer = {"mediaType": SIMPLE_SIGNING, "digest": digest,
                 "annotations": signature["annotations"]}
        verify_cosign(signer.public_key, {"layers": [layer]}, {digest: payload}, signed.image.digest)
        if unsigned is not None:
            assert copy(unsigned) == []


# -- the stage ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.create()


def _start(workdir: Path, signer: Signer, api: bool, **options) -> Upstream:
    """An upstream with org/app and library/alpine signed; `api`: the referrers API in
    front (ghcr.io's role), else none and the tag schema's tags (docker.io's)."""
    def prepare(client, images) -> dict[str, Signed]:
        return {image.repository: push_signatures(client, image, signer,
                                                  f"{SIGNED_AT}/{image.repository}", not api)
                for image in (images.namespaced, images.alpine)}

    return Upstream.start(workdir, large_layer_size=1 << 20, referrers_api=api,
                          prepare=prepare, **options)


def _docxy(workdir: Path, hub: Upstream, ghcr: Upstream) -> Docxy:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "docxy.toml"
    config.write_text(f'''
[upstream."docker.io"]
url = "{hub.registry_url}"
ca = "{hub.ca_path}"

[upstream."ghcr.io"]
url = "{ghcr.registry_url}"
ca = "{ghcr.ca_path}"
hosts = ["{GHCR_HOST}"]
''')
    return Docxy(workdir, ["--config", str(config), "--cache-dir", str(workdir / "cache"),
                           "--header-timeout", "10", "--connect-timeout", "5"])


@pytest.fixture(scope="module")
def stage(tmp_path_factory, signer) -> Iterator[tuple[Upstream, Upstream, Docxy]]:
    """(docker.io without the API, ghcr.io with it, docxy in front of both), for the tests
    that leave the upstreams running."""
    hub = _start(tmp_path_factory.mktemp("hub"), signer, api=False)
    try:
        ghcr = _start(tmp_path_factory.mktemp("ghcr"), signer, api=True, service="ghcr.test",
                      issuer="ghcr-test-issuer")
        try:
            with _docxy(tmp_path_factory.mktemp("docxy"), hub, ghcr) as docxy:
                yield hub, ghcr, docxy
        finally:
            ghcr.stop()
    finally:
        hub.stop()


def _clients(docxy: Docxy) -> dict[str, OciClient]:
    """Fresh clients naming ghcr.io in each of the three ways, and one for docker.io."""
    return {"ns": OciClient(docxy.url, query="ns=ghcr.io"),
            "prefix": OciClient(docxy.url, prefix="ghcr.io/"),
            "host": OciClient(docxy.url, host=GHCR_HOST),
            "hub": OciClient(docxy.url)}


# -- the tests ---------------------------------------------------------------------------

def test_referrers_are_listed_and_filtered_by_the_upstream(stage):
    """All referrers of an image, and those of one artifactType (the upstream's filter,
    OCI-Filters-Applied relayed), whichever way ghcr.io is named."""
    _, ghcr, docxy = stage
    app, alpine = (ghcr.prepared[n] for n in ("org/app", "library/alpine"))
    for way, client in _clients(docxy).items():
        if way == "hub":
            continue
        status, found, filtered = client.referrers_api("org/app", app.image.digest)
        assert status == 200 and not filtered
        assert sorted(found, key=lambda d: d["digest"]) == sorted(
            (referrer_descriptor(m) for m in app.referrers), key=lambda d: d["digest"])
        status, found, filtered = client.referrers_api("library/alpine", alpine.image.digest,
                                                       COSIGN_ARTIFACT)
        assert status == 200 and filtered and found == [referrer_descriptor(alpine.cosign)]
    status, found, filtered = _clients(docxy)["ns"].referrers_api(
        "org/app", app.image.digest, "application/spdx+json")
    assert (status, found, filtered) == (200, [], True)
    sent = poll_until(lambda: [e["uri"] for e in ghcr.registry_log_entries()
                               if "spdx" in e["uri"] and e["status"] == 200])
    assert sent == [f"/v2/org/app/referrers/{app.image.digest}?artifactType=application%2Fspdx%2Bjson"]


def test_bad_subjects_and_filters_never_reach_the_upstream(stage):
    """A subject that is no digest is 400 DIGEST_INVALID, a filter that is no media type
    400, both JSON errors answered by docxy alone."""
    _, ghcr, docxy = stage
    app = ghcr.prepared["org/app"].image
    bads = ("sha256:abc", "latest", "sha256:" + "A" * 64, referrers_tag(app.digest))
    for bad in bads:
        status, headers, body = _http("GET", f"{docxy.url}/v2/org/app/referrers/{bad}?ns=ghcr.io", {})
        assert status == 400 and headers["content-type"] == "application/json"
        assert json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
    status, _, body = _http(
        "GET", f"{docxy.url}/v2/org/app/referrers/{app.digest}?ns=ghcr.io&artifactType=x", {})
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    marker = "application/x.marker"
    OciClient(docxy.url, query="ns=ghcr.io").referrers_api("org/app", app.digest, marker)
    seen = poll_until(lambda: (lambda uris: uris if any("marker" in u for u in uris) else None)(
        [e["uri"] for e in ghcr.registry_log_entries() if "/referrers/" in e["uri"]]))
    # the marker went after the bad requests, and its line is there: theirs would be too
    assert not [u for u in seen if u.split("/referrers/")[1].split("?")[0] in bads], seen
    assert not [u for u in seen if u.endswith("artifactType=x")], seen


def test_a_referrers_challenge_points_at_docxy(stage):
    """Without a token the upstream's 401 is relayed with docxy's realm for that registry,
    and a token from there opens the referrers."""
    _, ghcr, docxy = stage
    app = ghcr.prepared["org/app"].image
    status, headers, _ = _http("GET", f"{docxy.url}/v2/org/app/referrers/{app.digest}?ns=ghcr.io", {})
    assert status == 401
    challenge = headers["www-authenticate"]
    assert f'realm="{docxy.url}/auth/token/ghcr.io"' in challenge
    assert 'service="ghcr.test"' in challenge and "repository:org/app:pull" in challenge


def test_a_registry_without_the_api_answers_404_and_its_tag_schema_works(stage, signer):
    """docker.io's registry answers 404 for referrers, relayed; the tag schema's index and
    cosign's `.sig` tag are served as tags are, and the signatures verify (alpine by its
    bare name: the library/ rule holds for referrers and the tag schema alike)."""
    hub, _, docxy = stage
    client = OciClient(docxy.url)
    for signed, name in ((hub.prepared["org/app"], None), (hub.prepared["library/alpine"], "alpine")):
        status, found, _ = client.referrers_api(name or signed.image.repository, signed.image.digest)
        assert (status, found) == (404, None)
        notation_verifies(client, signer, signed, "tag schema", name)
        cosign_verifies(client, signer, signed, classic=True, name=name)


def test_signatures_verify_through_docxy_and_while_the_upstreams_are_down(tmp_path, signer):
    """One pass of each client (notation and cosign against ghcr.io's referrers API,
    notation, cosign and skopeo against docker.io's tag schema), then both upstreams
    stopped (registry, token service, CDN): fresh clients verify the same signatures from
    the cache, and an index only ever asked for whole is filtered by docxy."""
    hub = _start(tmp_path / "hub", signer, api=False)
    ghcr = None
    try:
        ghcr = _start(tmp_path / "ghcr", signer, api=True, service="ghcr.test",
                      issuer="ghcr-test-issuer")
        with _docxy(tmp_path / "docxy", hub, ghcr) as docxy:
            def one_pass(phase: str) -> None:
                clients = _clients(docxy)
                app, alpine = ghcr.prepared["org/app"], ghcr.prepared["library/alpine"]
                notation_verifies(clients["ns"], signer, app, "api")
                cosign_verifies(clients["prefix"], signer, app, classic=False)
                # a client that pulls alpine and lists all its referrers (no filter)
                clients["host"].manifest("library/alpine", "latest", alpine.image.digest)
                status, found, filtered = clients["host"].referrers_api("library/alpine",
                                                                        alpine.image.digest)
                assert status == 200 and not filtered and len(found) == 2
                hub_app = hub.prepared["org/app"]
                notation_verifies(clients["hub"], signer, hub_app, "tag schema")
                cosign_verifies(clients["hub"], signer, hub_app, classic=True)
                # Only while the upstream is up: the 404 for an unsigned image's `.sig` tag
                # is not kept, so during an outage docxy answers that tag with 502.
                skopeo_gets_cosign_signatures(tmp_path / phase, docxy, signer, hub_app,
                                              hub.images.nested if phase == "up" else None)

            one_pass("up")
            for up in (hub, ghcr):
                up.stop_registry()
                up.token_server.stop()
                up.cdn.stop()
            try:
                one_pass("down")
                # alpine's index was only ever asked for whole: filtered here now
                client = OciClient(docxy.url, host=GHCR_HOST)
                alpine = ghcr.prepared["library/alpine"]
                status, found, filtered = client.referrers_api("library/alpine",
                                                               alpine.image.digest, NOTATION_ARTIFACT)
                assert status == 200 and filtered and found == [referrer_descriptor(alpine.notation)]
                status, found, filtered = client.referrers_api("library/alpine",
                                                               alpine.image.digest,
                                                               "application/spdx+json")
                assert (status, found, filtered) == (200, [], True)
            except (AssertionError, ClientError) as e:
                raise AssertionError(f"{e}\n--- docxy:\n{docxy.log()[-6000:]}") from None
            assert "stale" in docxy.log()
    finally:
        hub.stop()
        if ghcr is not None:
            ghcr.stop()
