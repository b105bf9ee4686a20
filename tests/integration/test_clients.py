"""The real clients pull through docxy: dockerd through `registry-mirrors` (plain HTTP,
TLS verified on [::1], mirror mode, and `docker login` to docxy for a private repository),
containerd's ctr through a hosts directory (it adds `?ns=docker.io`), and podman through a
registries.conf mirror.  Hub is unreachable here, so a pull that succeeds came through
docxy; every digest must equal the upstream's."""
from __future__ import annotations

import pytest
from harness.clients import Containerd, DockerDaemon, Podman
from harness.daemon import Docxy

pytestmark = pytest.mark.integration


@pytest.fixture
def short_tmp(short_tmp):
    return short_tmp


def test_docker_pulls_through_plain_http_mirror(upstream, docxy_plain, short_tmp):
    """`docker pull` of a small image, a multi-arch list and the large layer via
    registry-mirrors = docxy over plain HTTP."""
    images = upstream.images
    with DockerDaemon(short_tmp / "docker", mirrors=[docxy_plain.url]) as docker:
        assert docker.pull("alpine:latest").digest == images.alpine.digest
        assert docker.pull(f"multiarch:{images.multiarch.tag}").digest == images.multiarch.digest
        assert docker.pull(f"large:{images.large.tag}").digest == images.large.digest
        assert docker.pull(f"org/app:{images.namespaced.tag}").digest == images.namespaced.digest
    scopes = [s for e in upstream.token_log_entries() for s in e.get("scopes", [])]
    assert "repository:library/large:pull" in scopes


def test_docker_pulls_through_tls_mirror(upstream, short_tmp):
    """dockerd verifies docxy's certificate chain (on [::1]; it never verifies 127/8) and
    pulls through it."""
    cert = upstream.intermediate_ca.issue_server("docxy6", ["::1", "localhost"])
    args = ["--upstream", upstream.registry_url, "--upstream-ca", str(upstream.ca_path), "--library"]
    with Docxy(short_tmp / "docxy", args, tls=(cert.chain_path, cert.key_path), tls_host="::1") as docxy:
        with DockerDaemon(short_tmp / "docker", mirrors=[docxy.url], ca_path=upstream.ca_path) as docker:
            assert docker.pull("alpine:latest").digest == upstream.images.alpine.digest
        # and without the CA dockerd refuses docxy (so the pull above really used TLS)
        with DockerDaemon(short_tmp / "noca", mirrors=[docxy.url]) as docker:
            with pytest.raises(Exception):
                docker.pull("alpine:latest", timeout=120)


def test_docker_login_to_docxy_pulls_private_repo(upstream, docxy_plain, short_tmp):
    """`docker login` against docxy (its /v2/ challenge, its token endpoint, Basic passed
    through) and a pull of the private repository with docxy as the registry."""
    image = upstream.images.private
    user, password = upstream.user
    with DockerDaemon(short_tmp / "docker", insecure_registries=[docxy_plain.host]) as docker:
        with pytest.raises(Exception):
            docker.pull(f"{docxy_plain.host}/{image.ref}")
        docker.login(docxy_plain.host, user, password)
        assert docker.pull(f"{docxy_plain.host}/{image.ref}").digest == image.digest


def test_docker_pulls_through_mirror_mode(upstream, docxy_mirror, short_tmp):
    """In mirror mode dockerd is never challenged and still pulls."""
    with DockerDaemon(short_tmp / "docker", mirrors=[docxy_mirror.url]) as docker:
        assert docker.pull("alpine:latest").digest == upstream.images.alpine.digest


def test_ctr_pulls_through_hosts_dir(upstream, docxy_plain, short_tmp):
    """ctr pulls (and unpacks) an image and an OCI index through docxy; the `ns` parameter
    containerd adds never reaches the upstream."""
    before = len(upstream.registry_log_entries())
    with Containerd(short_tmp / "containerd", mirrors={"docker.io": [docxy_plain.url]}) as ctr:
        alpine = ctr.pull("docker.io/library/alpine:latest")
        assert alpine.digest == upstream.images.alpine.digest
        index = upstream.images.oci_index
        assert ctr.pull(f"docker.io/{index.ref}").digest == index.digest
    new = upstream.registry_log_entries()[before:]
    assert new, "nothing reached the upstream"
    assert not any("ns=" in e["uri"] for e in new)


def test_podman_pulls_through_registries_conf_mirror(upstream, docxy_plain, short_tmp):
    """podman pulls through a [[registry.mirror]] entry pointing at docxy."""
    with Podman(short_tmp / "podman", mirrors={"docker.io": [docxy_plain.url]}) as podman:
        result = podman.pull(f"docker.io/{upstream.images.nested.ref}")
        assert result.digest == upstream.images.nested.digest
