"""A mirror that is not an open relay, with real clients: docxy's own users log in to it
(`docker login`, containerd's password grant, podman), the upstream account stays docxy's,
and refused networks and clients over their rate get registry errors."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import bcrypt
import pytest
from harness.clients import ClientError, Containerd, DockerDaemon, Podman
from harness.daemon import Docxy, mirror_args
from harness.procs import free_port
from harness.upstream import Upstream

pytestmark = pytest.mark.integration

USER, PASSWORD = "carol", "mirror-password"


def _users_file(path: Path) -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=8)).decode()
    path.write_text(f"# docxy's own users\n{USER}:{hashed}\n")
    return path


@pytest.fixture(scope="module")
def docxy_users(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docxy]:
    """docxy with a users file, holding the upstream account `alice` itself (plain HTTP on
    loopback, as behind a TLS proxy)."""
    workdir = tmp_path_factory.mktemp("docxy-users")
    user, password = upstream.user
    credentials = workdir / "upstream-credentials"
    credentials.write_text(f"{user}:{password}\n")
    args = mirror_args(upstream, "--htpasswd", str(_users_file(workdir / "users")),
                       "--upstream-credentials", str(credentials), "--mirror-mode")
    daemon = Docxy(workdir, args)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_docker_login_then_pull_and_nothing_without_it(
        upstream: Upstream, docxy_users: Docxy, short_tmp: Path) -> None:
    """`docker pull` through docxy fails before `docker login` and works after it; the
    private repository pulls with docxy's upstream account, and the client's password
    never reaches the upstream's token service."""
    image = upstream.images.private
    tokens_before = len(upstream.token_log_entries())
    with DockerDaemon(short_tmp / "docker", insecure_registries=[docxy_users.host]) as docker:
        with pytest.raises(ClientError, match="(?i)unauthorized|authentication required"):
            docker.pull(f"{docxy_users.host}/{image.ref}", timeout=120)
        with pytest.raises(ClientError):
            docker.login(docxy_users.host, USER, "wrong-password")
        docker.login(docxy_users.host, USER, PASSWORD)
        assert docker.pull(f"{docxy_users.host}/{image.ref}").digest == image.digest
    entries = upstream.token_log_entries()[tokens_before:]
    assert entries and all(e.get("account") in (None, upstream.user[0]) for e in entries)
    assert PASSWORD not in json.dumps(entries)
    assert PASSWORD not in docxy_users.log()


def test_ctr_and_podman_log_in_to_docxy(upstream: Upstream, docxy_users: Docxy, short_tmp: Path) -> None:
    """containerd (password grant, POST) and podman (Basic on GET) get docxy tokens."""
    with Containerd(short_tmp / "ctr", mirrors={"docker.io": [docxy_users.url]}) as ctr:
        with pytest.raises(ClientError):
            ctr.pull(f"docker.io/{upstream.images.alpine.ref}")
        result = ctr.pull(f"docker.io/{upstream.images.alpine.ref}", user=(USER, PASSWORD))
        assert result.digest == upstream.images.alpine.digest
    with Podman(short_tmp / "podman") as podman:
        podman.login(docxy_users.host, USER, PASSWORD, tls_verify=False)
        result = podman.pull(f"{docxy_users.host}/{upstream.images.nested.ref}", tls_verify=False)
        assert result.digest == upstream.images.nested.digest


def test_refused_networks_and_rates(upstream: Upstream, tmp_path: Path) -> None:
    """A denied network gets 403 DENIED everywhere but /health; past --rate-limit a client
    gets 429 with Retry-After; both are counted, and docxy keeps serving."""
    args = mirror_args(upstream, "--htpasswd", str(_users_file(tmp_path / "users")),
                       "--rate-limit", "3/h")
    with Docxy(tmp_path / "limited", args) as docxy:
        status, _, body = _get(f"{docxy.url}/auth/token?service=docxy", _basic(USER, PASSWORD))
        assert status == 200
        bearer = {"Authorization": f"Bearer {json.loads(body)['token']}",
                  "Accept": upstream.images.alpine.media_type}
        manifest = f"{docxy.url}/v2/{upstream.images.alpine.repository}/manifests/latest"
        statuses = [_get(manifest, bearer)[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, headers, body = _get(manifest, bearer)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        metrics = _get(f"{docxy.url}/metrics")[2].decode()
        assert 'docxy_refusals_total{reason="rate"} 2.0' in metrics
    metrics_port = free_port()
    with Docxy(tmp_path / "denied", args + ["--deny-net", "127.0.0.0/8", "--metrics-listen",
                                            f"tcp:{metrics_port}:interface=127.0.0.1"]) as docxy:
        status, _, body = _get(f"{docxy.url}/v2/")
        assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
        assert _get(f"{docxy.url}/auth/token?service=docxy", _basic(USER, PASSWORD))[0] == 403
        assert _get(f"{docxy.url}/health")[0] == 200
        metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")[2].decode()
        assert 'docxy_refusals_total{reason="network"} 2.0' in metrics
