"""Several registries behind one docxy, with real upstreams and real clients.

Two upstreams run on loopback, each a distribution registry with its own token service,
service name, CA and CDN: `upstream` stands in for Docker Hub (docker.io) and `ghcr` for
ghcr.io.  Both hold the same test images (the same digests), so a pull that reaches the
wrong registry would still succeed: every test checks which registry's log saw it.
"""
from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Iterator

import pytest
from harness.clients import Containerd, DockerDaemon, Podman, Skopeo
from harness.daemon import Docxy
from harness.upstream import Upstream

pytestmark = pytest.mark.integration

GHCR_HOST = "ghcr.mirror.test"  # the Host that selects ghcr.io (clients resolve it privately)


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """The second upstream: ghcr.io's role, with its own service name and challenge."""
    up = Upstream.start(tmp_path_factory.mktemp("ghcr"), large_layer_size=1 << 20,
                        service="ghcr.test", issuer="ghcr-test-issuer")
    try:
        yield up
    finally:
        up.stop()


def _config_file(path: Path, upstream: Upstream, ghcr: Upstream) -> Path:
    path.write_text(f'''
[upstream."docker.io"]
url = "{upstream.registry_url}"
ca = "{upstream.ca_path}"

[upstream."ghcr.io"]
url = "{ghcr.registry_url}"
ca = "{ghcr.ca_path}"
hosts = ["{GHCR_HOST}"]
''')
    return path


def _multi(upstream: Upstream, ghcr: Upstream, workdir: Path) -> Docxy:
    workdir.mkdir(parents=True, exist_ok=True)
    cert = upstream.intermediate_ca.issue_server("docxy-multi", ["127.0.0.1", "localhost", GHCR_HOST])
    config = _config_file(workdir / "docxy.toml", upstream, ghcr)
    return Docxy(workdir, ["--config", str(config)], tls=(cert.chain_path, cert.key_path))


@pytest.fixture(scope="module")
def docxy_multi(upstream: Upstream, ghcr: Upstream,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docxy]:
    """docxy over TLS mirroring docker.io and ghcr.io from one configuration file."""
    daemon = _multi(upstream, ghcr, tmp_path_factory.mktemp("docxy-multi"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


class Seen:
    """What each upstream's registry received from a point on: method and path."""

    def __init__(self, **upstreams: Upstream) -> None:
        self._upstreams = upstreams
        self._start = {k: len(u.registry_log_entries()) for k, u in upstreams.items()}

    def requests(self, which: str) -> list[tuple[str, str]]:
        entries = self._upstreams[which].registry_log_entries()[self._start[which]:]
        return [(e["method"], e["uri"]) for e in entries]

    def paths(self, which: str) -> list[str]:
        return [uri for _, uri in self.requests(which)]


def _https(docxy: Docxy, path: str, upstream: Upstream, host: str | None = None):
    """One request to docxy; returns (status, headers, body)."""
    context = ssl.create_default_context(cafile=str(upstream.ca_path))
    conn = http.client.HTTPSConnection("127.0.0.1", docxy.tls_port, context=context, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or docxy.host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_ctr_pulls_from_two_registries_through_one_hosts_directory(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, short_tmp: Path) -> None:
    """containerd sends `ns=docker.io` and `ns=ghcr.io` to the same mirror; each pull
    reaches its own registry only."""
    seen = Seen(hub=upstream, ghcr=ghcr)
    mirrors = {"docker.io": [docxy_multi.url], "ghcr.io": [docxy_multi.url]}
    with Containerd(short_tmp / "ctr", mirrors=mirrors, ca_path=upstream.ca_path) as ctr:
        hub_pull = ctr.pull(f"docker.io/{upstream.images.multiarch.ref}")
        ghcr_pull = ctr.pull(f"ghcr.io/{ghcr.images.namespaced.ref}")
    assert hub_pull.digest == upstream.images.multiarch.digest
    assert ghcr_pull.digest == ghcr.images.namespaced.digest
    assert any("/v2/library/multiarch/manifests/" in p for p in seen.paths("hub"))
    assert any("/v2/org/app/manifests/" in p for p in seen.paths("ghcr"))
    assert not any("org/app" in p for p in seen.paths("hub"))
    assert not any("multiarch" in p for p in seen.paths("ghcr"))
    assert "OCI-Namespace" not in docxy_multi.log()  # headers are never logged
    # ghcr.io's own token service issued the token, for its own service name
    assert any(e.get("service") == "ghcr.test" for e in ghcr.token_log_entries())


def test_ctr_default_hosts_directory_serves_every_registry(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, short_tmp: Path) -> None:
    """One `_default/hosts.toml` (what the README recommends for Kubernetes nodes) sends
    every registry to docxy, which tells them apart by `ns=`."""
    seen = Seen(hub=upstream, ghcr=ghcr)
    with Containerd(short_tmp / "ctr", mirrors={"_default": [docxy_multi.url]},
                    ca_path=upstream.ca_path) as ctr:
        ghcr_pull = ctr.pull(f"ghcr.io/{ghcr.images.nested.ref}")
        hub_pull = ctr.pull(f"docker.io/{upstream.images.oci_index.ref}")
    assert ghcr_pull.digest == ghcr.images.nested.digest
    assert hub_pull.digest == upstream.images.oci_index.digest
    assert any("/v2/deep/er/nested/name/x/manifests/" in p for p in seen.paths("ghcr"))
    assert not any("nested" in p for p in seen.paths("hub"))
    assert any("/v2/library/ocimulti/manifests/" in p for p in seen.paths("hub"))


def test_podman_pulls_through_a_prefixed_mirror_location(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, short_tmp: Path) -> None:
    """podman's mirror `location = "<docxy>/ghcr.io"` sends `/v2/ghcr.io/org/app/...`;
    its token request names `ghcr.io/org/app`, which docxy takes to ghcr.io's token
    service as `org/app`."""
    seen = Seen(hub=upstream, ghcr=ghcr)
    tokens_before = len(ghcr.token_log_entries())
    mirrors = {"ghcr.io": [f"{docxy_multi.url}/ghcr.io"]}
    with Podman(short_tmp / "podman", mirrors=mirrors, ca_path=upstream.ca_path) as podman:
        result = podman.pull(f"ghcr.io/{ghcr.images.namespaced.ref}")
    assert result.digest == ghcr.images.namespaced.digest
    assert any("/v2/org/app/manifests/" in p for p in seen.paths("ghcr"))
    assert not any("org/app" in p for p in seen.paths("hub"))
    scopes = [s for e in ghcr.token_log_entries()[tokens_before:] for s in e.get("scopes", [])]
    assert "repository:org/app:pull" in scopes, scopes
    assert not any("ghcr.io/" in s for s in scopes)


def test_skopeo_selects_by_host_name(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, short_tmp: Path) -> None:
    """A request sent to `ghcr.mirror.test` goes to ghcr.io (the name resolves to
    127.0.0.1 in skopeo's own /etc/hosts, and docxy's certificate carries it)."""
    seen = Seen(hub=upstream, ghcr=ghcr)
    with Skopeo(short_tmp / "skopeo", ca_path=upstream.ca_path,
                extra_hosts={GHCR_HOST: "127.0.0.1"}) as skopeo:
        result = skopeo.copy(f"{GHCR_HOST}:{docxy_multi.tls_port}/{ghcr.images.alpine.ref}")
    assert result.digest == ghcr.images.alpine.digest
    assert any("/v2/library/alpine/manifests/" in p for p in seen.paths("ghcr"))
    assert not any("alpine" in p for p in seen.paths("hub"))


def test_docker_pulls_docker_io_through_the_multi_registry_mirror(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, short_tmp: Path) -> None:
    """dockerd's registry-mirrors is for docker.io only: the default upstream serves it."""
    seen = Seen(hub=upstream, ghcr=ghcr)
    with DockerDaemon(short_tmp / "docker", mirrors=[docxy_multi.url],
                      ca_path=upstream.ca_path) as docker:
        result = docker.pull(upstream.images.namespaced.ref)
    assert result.digest == upstream.images.namespaced.digest
    assert any("/v2/org/app/manifests/" in p for p in seen.paths("hub"))
    assert not any("org/app" in p for p in seen.paths("ghcr"))


@pytest.mark.parametrize(
    "path, host",
    [
        ("/v2/org/app/manifests/latest?ns=quay.io", None),
        ("/v2/quay.io/org/app/manifests/latest", None),
        ("/v2/?ns=evil.example", None),
        ("/v2/org/app/manifests/latest", "evil.example"),
        ("/auth/token/quay.io?scope=repository:org/app:pull", None),
    ],
)
def test_unconfigured_registries_are_refused_and_nothing_is_sent(
        upstream: Upstream, ghcr: Upstream, docxy_multi: Docxy, path: str, host: str | None
) -> None:
    """An ns, prefix, Host or token realm naming a registry that is not configured gets a
    registry JSON error, and neither upstream, token service nor CDN hears of it."""
    before = [len(u.registry_log_entries()) + len(u.token_log_entries()) + len(u.cdn_log_entries())
              for u in (upstream, ghcr)]
    status, headers, body = _https(docxy_multi, path, upstream, host)
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    after = [len(u.registry_log_entries()) + len(u.token_log_entries()) + len(u.cdn_log_entries())
             for u in (upstream, ghcr)]
    assert after == before
    # docxy keeps serving
    assert _https(docxy_multi, "/v2/", upstream)[0] == 401


def test_the_same_blob_through_two_registries_is_stored_once(
        upstream: Upstream, ghcr: Upstream, tmp_path: Path, short_tmp: Path) -> None:
    """alpine pulled through docker.io, then through ghcr.io (by path prefix): its blobs
    are stored once, and ghcr.io is asked only whether the client may have them (HEAD),
    never for their bytes."""
    image = upstream.images.alpine
    assert [b.digest for b in ghcr.images.alpine.blobs] == [b.digest for b in image.blobs]
    with _multi(upstream, ghcr, tmp_path / "docxy") as docxy:
        with Skopeo(short_tmp / "skopeo", ca_path=upstream.ca_path) as skopeo:
            first = skopeo.copy(f"{docxy.host}/{image.ref}")
            seen = Seen(ghcr=ghcr)
            cdn_before = len(ghcr.cdn_log_entries())
            second = skopeo.copy(f"{docxy.host}/ghcr.io/{image.ref}")
    assert first.digest == second.digest == image.digest
    assert sorted(first.blobs) == sorted(second.blobs) == sorted(b.digest for b in image.blobs)
    blob_requests = [(m, p) for m, p in seen.requests("ghcr") if "/blobs/" in p]
    assert blob_requests and all(m == "HEAD" for m, _ in blob_requests), blob_requests
    assert len(ghcr.cdn_log_entries()) == cdn_before
    stored = [p.name for p in (tmp_path / "docxy" / "cache" / "blobs").rglob("*") if p.is_file()]
    for blob in image.blobs:
        assert stored.count(blob.digest.split(":")[1]) == 1
    assert len(stored) == len(set(stored))
