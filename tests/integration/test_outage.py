"""A second pull never leaves the box: after an image was pulled twice, the upstream
registry, its CDN and its token service are stopped, and a fresh dockerd and skopeo still
pull it through docxy with the upstream's digests."""
from __future__ import annotations

import pytest
from harness.clients import ClientError, DockerDaemon, Skopeo
from harness.daemon import Docxy
from harness.upstream import Upstream

pytestmark = pytest.mark.integration


def test_cached_images_pull_with_the_upstream_down(short_tmp):
    """docker pull (fresh data root) and skopeo copy succeed with the whole upstream
    stopped; an image never pulled fails instead of hanging."""
    up = Upstream.start(short_tmp / "up", large_layer_size=4 << 20)
    try:
        args = ["--upstream", up.registry_url, "--upstream-ca", str(up.ca_path), "--library",
                "--header-timeout", "10", "--connect-timeout", "5"]
        with Docxy(short_tmp / "docxy", args) as docxy:
            images = up.images
            with DockerDaemon(short_tmp / "d1", mirrors=[docxy.url]) as docker:
                assert docker.pull("alpine:latest").digest == images.alpine.digest
            with Skopeo(short_tmp / "s1", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{docxy.host}/alpine:latest").digest == images.alpine.digest
                for _ in range(2):
                    copied = skopeo.copy(f"{docxy.host}/{images.namespaced.ref}")
                    assert copied.digest == images.namespaced.digest

            up.stop_registry()
            up.cdn.stop()
            up.token_server.stop()

            with DockerDaemon(short_tmp / "d2", mirrors=[docxy.url]) as docker:
                try:
                    pulled = docker.pull("alpine:latest")
                except ClientError as e:
                    raise AssertionError(f"{e}\n--- docxy:\n{docxy.log()[-4000:]}") from None
                assert pulled.digest == images.alpine.digest
            with Skopeo(short_tmp / "s2", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{docxy.host}/alpine:latest").digest == images.alpine.digest
                assert skopeo.copy(f"{docxy.host}/{images.namespaced.ref}").digest == images.namespaced.digest
                with pytest.raises(ClientError):
                    skopeo.copy(f"{docxy.host}/{images.nested.ref}", timeout=120)
            assert "stale" in docxy.log()
    finally:
        up.stop()
