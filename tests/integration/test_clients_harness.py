"""The client drivers (harness.clients) pull real images with the real clients.

Each test runs dockerd, containerd/ctr, podman or skopeo against a throwaway distribution
registry started here (plain HTTP, TLS with a test CA, TLS with htpasswd auth), the registry
standing in for a mirror, and checks the digest, then that nothing was left behind.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import bcrypt
import pytest
from harness import images
from harness.clients import (
    ClientError,
    Containerd,
    DockerDaemon,
    Podman,
    Skopeo,
    mounts_under,
)
from harness.pki import CertificateAuthority
from harness.procs import ManagedProcess, free_port, poll_until, wait_for_port
from harness.registry import Registry, RegistrySettings, registry_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USER, PASSWORD = "carol", "s3cret-pw"
_URI = re.compile(r'http\.request\.uri=(?:"([^"]*)"|(\S+))')


@dataclass
class Registries:
    plain: Registry          # http, no auth
    tls: Registry            # https with the test CA, no auth
    auth_url: str            # https with the test CA and htpasswd auth
    tls6_url: str | None     # https with the test CA on [::1] (None without IPv6)
    ca_path: Path
    alpine: images.Image     # library/alpine:latest, docker v2
    multiarch: images.Image  # library/multiarch:latest, docker manifest list
    private: images.Image    # private/secret:latest
    app: images.Image        # org/app:1.0 (OCI), also pushed as ghcr/org/app for prefixes

    @property
    def auth_host(self) -> str:
        return self.auth_url.split("://", 1)[1]

    def requests(self, registry: str) -> list[str]:
        """Request URIs in a registry's log, in order."""
        log = {"plain": self.plain.log_path, "tls": self.tls.log_path}[registry]
        uris = []
        for line in log.read_text(errors="replace").splitlines():
            match = _URI.search(line)
            if match and "response completed" in line:
                uris.append(match.group(1) or match.group(2))
        return uris


def _bcrypt(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=8)).decode()


def _free_port6() -> int | None:
    """A free port on [::1], or None when there is no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return int(s.getsockname()[1])
    except OSError:
        return None


def _wait_for_port6(port: int, process: ManagedProcess, timeout: float = 30.0) -> None:
    def up() -> bool:
        if not process.running():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            socket.create_connection(("::1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    poll_until(up, timeout=timeout)


def _serve(work: Path, name: str, settings: RegistrySettings, addr: str,
           auth: dict[str, object] | None = None) -> ManagedProcess:
    """`docker-registry serve` from a config Registry cannot express (IPv6, htpasswd)."""
    config = registry_config(settings)
    config["http"]["addr"] = addr
    if auth:
        config["auth"] = auth
    (work / f"{name}.yml").write_text(json.dumps(config))
    return ManagedProcess(name, ["docker-registry", "serve", str(work / f"{name}.yml")],
                          work / f"{name}.log")


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    """`docker-registry serve` processes on one storage holding the test images."""
    work = tmp_path_factory.mktemp("client-registries")
    ca = CertificateAuthority.create_root(work / "pki")
    cert = ca.issue_server("registry", ["127.0.0.1", "::1", "localhost"])
    storage = work / "storage"
    tls_settings = RegistrySettings(storage_dir=storage, tls_cert_path=cert.chain_path,
                                    tls_key_path=cert.key_path)
    plain = Registry(RegistrySettings(storage_dir=storage), work, "plain")
    tls = Registry(tls_settings, work, "tls")
    (work / "htpasswd").write_text(f"{USER}:{_bcrypt(PASSWORD)}\n")
    auth_port = free_port()
    auth = _serve(work, "auth", tls_settings, f"127.0.0.1:{auth_port}", {
        "htpasswd": {"realm": "test", "path": str(work / "htpasswd")}})
    tls6_port = _free_port6()
    tls6 = None if tls6_port is None else _serve(work, "tls6", tls_settings,
                                                 f"[::1]:{tls6_port}")
    alpine = images.Image("library/alpine", ("latest",), images.simple_image("library/alpine"))
    multiarch = images.Image("library/multiarch", ("latest",), images.make_index(
        [images.simple_image("library/multiarch"),
         images.simple_image("library/multiarch", "arm64", "v8")]))
    private = images.Image("private/secret", ("latest",), images.simple_image("private/secret"),
                           private=True)
    app = images.Image("org/app", ("1.0",), images.simple_image("org/app", oci=True))
    try:
        plain.start()
        with images.RegistryClient(plain.url) as client:
            for image in (alpine, multiarch, private, app,
                          images.Image("ghcr/org/app", app.tags, app.manifest)):
                client.push_image(image)
        tls.start()
        auth.start()
        wait_for_port("127.0.0.1", auth_port, 30, auth)
        if tls6 is not None and tls6_port is not None:
            tls6.start()
            _wait_for_port6(tls6_port, tls6)
        yield Registries(plain, tls, f"https://127.0.0.1:{auth_port}",
                         f"https://[::1]:{tls6_port}" if tls6 else None,
                         cert.ca_path, alpine, multiarch, private, app)
    finally:
        if tls6 is not None:
            tls6.stop()
        auth.stop()
        tls.stop()
        plain.stop()


# Paths the clients write by default and the drivers must keep them away from. (The
# podman/skopeo blob-info cache under /var/lib/containers/cache is checked the other way
# round, by finding it in the driver's private directory: any skopeo run elsewhere on the
# machine writes the system one.)
_SYSTEM_PATHS = ["/etc/docker/key.json", "/etc/docker/certs.d", "/run/docker", "/run/mount",
                 "/opt/containerd", "/root/.docker", "/var/lib/containerd", "/run/containerd",
                 "/var/lib/docker", "/var/lib/containers/storage", "/run/containers",
                 "/run/libpod"]
BLOB_INFO_CACHE = "cache/blob-info-cache-v1.boltdb"


def _snapshot() -> dict[str, float | None]:
    return {p: (os.stat(p).st_mtime if os.path.exists(p) else None) for p in _SYSTEM_PATHS}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture
def clean(short_tmp: Path) -> Iterator[Path]:
    """A work dir; afterwards no process runs from it, nothing is mounted below it and the
    clients' system-wide default paths are untouched.  Short: containerd's socket paths
    must stay under 104 bytes, which pytest's numbered tmp_path can exceed."""
    before = _snapshot()
    yield short_tmp
    assert _processes_mentioning(str(short_tmp)) == []
    assert mounts_under(short_tmp) == []
    assert _snapshot() == before


def _config_digest(image: images.Image, arch: str = "amd64") -> str:
    manifest = image.manifest.child_for(arch) if image.manifest.is_index else image.manifest
    assert manifest.config is not None
    return manifest.config.digest


def test_docker_pulls_through_plain_http_mirror(registries: Registries, clean: Path) -> None:
    """dockerd sends `docker pull alpine` to its registry-mirrors entry over plain HTTP."""
    with DockerDaemon(clean / "docker", mirrors=[registries.plain.url]) as docker:
        result = docker.pull("alpine")
        assert (docker.etc_dir / "key.json").exists()  # not /etc/docker/key.json
    assert result.digest == registries.alpine.digest
    assert result.image_id == _config_digest(registries.alpine)
    assert f"/v2/library/alpine/manifests/{registries.alpine.digest}" in \
        registries.requests("plain")


def test_docker_pulls_through_tls_mirror(registries: Registries, clean: Path) -> None:
    """dockerd pulls a manifest list from an https mirror on 127.0.0.1."""
    with DockerDaemon(clean / "docker", mirrors=[registries.tls.url],
                      ca_path=registries.ca_path) as docker:
        result = docker.pull("library/multiarch")
    assert result.digest == registries.multiarch.digest
    assert result.image_id == _config_digest(registries.multiarch)


def test_docker_verifies_mirror_certificate_on_ipv6_loopback(registries: Registries,
                                                             clean: Path) -> None:
    """On [::1] dockerd checks the mirror's certificate: it pulls with the CA in the private
    certs.d and fails without it (127.0.0.0/8 is insecure by default and never checked)."""
    if registries.tls6_url is None:
        pytest.skip("no IPv6 loopback")
    with DockerDaemon(clean / "untrusted", mirrors=[registries.tls6_url]) as docker:
        with pytest.raises(ClientError):
            docker.pull("alpine", timeout=60)
        assert "x509: certificate signed by unknown authority" in docker.log_text()
    with DockerDaemon(clean / "docker", mirrors=[registries.tls6_url],
                      ca_path=registries.ca_path) as docker:
        result = docker.pull("alpine")
    assert result.digest == registries.alpine.digest


def test_docker_login_then_pull_private_repo(registries: Registries, clean: Path) -> None:
    """docker login stores credentials in the private CLI config; the private repo pulls
    straight from the registry only after it."""
    host = registries.auth_host
    ref = f"{host}/{registries.private.ref}"
    with DockerDaemon(clean / "docker", tls_registries=[host],
                      ca_path=registries.ca_path) as docker:
        with pytest.raises(ClientError):
            docker.pull(ref, timeout=60)
        with pytest.raises(ClientError):
            docker.login(host, USER, "wrong-password")
        assert "Login Succeeded" in docker.login(host, USER, PASSWORD)
        assert host in json.loads((docker.cli_config / "config.json").read_text())["auths"]
        result = docker.pull(ref)
    assert result.digest == registries.private.digest
    assert f"{host}/private/secret@{registries.private.digest}" in result.repo_digests


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_ctr_pulls_through_hosts_dir_mirror(registries: Registries, clean: Path,
                                            scheme: str) -> None:
    """ctr with a hosts.toml mirror pulls and unpacks docker.io and ghcr.io images, adding
    ?ns=<registry> to what it sends the mirror."""
    registry = registries.plain if scheme == "http" else registries.tls
    mirrors = {"docker.io": [registry.url], "ghcr.io": [registry.url]}
    with Containerd(clean / "containerd", mirrors=mirrors, ca_path=registries.ca_path) as ctr:
        result = ctr.pull("docker.io/library/multiarch:latest")
        alpine = ctr.pull("docker.io/library/alpine:latest")
        app = ctr.pull("ghcr.io/org/app:1.0")
    assert result.digest == registries.multiarch.digest
    assert alpine.digest == registries.alpine.digest
    assert app.digest == registries.app.digest
    seen = registries.requests("plain" if scheme == "http" else "tls")
    assert "/v2/library/alpine/manifests/latest?ns=docker.io" in seen
    assert "/v2/org/app/manifests/1.0?ns=ghcr.io" in seen


def test_ctr_checks_mirror_certificate(registries: Registries, clean: Path) -> None:
    """Without the test CA in hosts.toml the TLS mirror is refused and the pull fails."""
    with Containerd(clean / "containerd", mirrors={"docker.io": [registries.tls.url]}) as ctr:
        with pytest.raises(ClientError, match="certificate signed by unknown authority"):
            ctr.pull("docker.io/library/alpine:latest", timeout=60)


def test_ctr_pulls_private_repo_with_user(registries: Registries, clean: Path) -> None:
    """ctr --user sends credentials to a registry named in tls_registries (with its CA)."""
    host = registries.auth_host
    ref = f"{host}/{registries.private.ref}"
    with Containerd(clean / "containerd", tls_registries=[host],
                    ca_path=registries.ca_path) as ctr:
        with pytest.raises(ClientError):
            ctr.pull(ref, timeout=60)
        result = ctr.pull(ref, user=(USER, PASSWORD))
    assert result.digest == registries.private.digest


def test_podman_pulls_through_registries_conf_mirror(registries: Registries,
                                                     clean: Path) -> None:
    """podman with a private registries.conf pulls docker.io images from an insecure
    (HTTP) mirror and from a TLS mirror whose CA comes through --cert-dir; a mirror location
    with a path is a name prefix (ghcr.io/org/app -> /v2/ghcr/org/app)."""
    mirrors = {"docker.io": [registries.plain.url], "ghcr.io": [registries.plain.url + "/ghcr"]}
    with Podman(clean / "podman", mirrors=mirrors) as podman:
        result = podman.pull("docker.io/library/alpine:latest")
        app = podman.pull("ghcr.io/org/app:1.0")
        assert (podman.var_lib / BLOB_INFO_CACHE).exists()
    assert result.digest == registries.alpine.digest
    assert result.image_id == _config_digest(registries.alpine)
    assert app.digest == registries.app.digest
    assert "/v2/ghcr/org/app/manifests/1.0" in registries.requests("plain")
    assert not podman.runroot.exists()  # the short runroot outside the work dir is gone
    with Podman(clean / "podman-tls", mirrors={"docker.io": [registries.tls.url]},
                ca_path=registries.ca_path) as podman:
        result = podman.pull("docker.io/library/multiarch:latest")
    assert result.digest == registries.multiarch.digest
    assert f"docker.io/library/multiarch@{registries.multiarch.digest}" in result.repo_digests
    with Podman(clean / "podman-untrusted", mirrors={"docker.io": [registries.tls.url]}) as podman:
        with pytest.raises(ClientError, match="certificate signed by unknown authority"):
            podman.pull("docker.io/library/alpine:latest", timeout=60)


def test_podman_login_then_pull_private_repo(registries: Registries, clean: Path) -> None:
    """podman login writes the private auth file, and the private repo pulls with it."""
    host = registries.auth_host
    with Podman(clean / "podman", ca_path=registries.ca_path) as podman:
        with pytest.raises(ClientError):
            podman.pull(f"{host}/{registries.private.ref}", timeout=60)
        podman.login(host, USER, PASSWORD)
        result = podman.pull(f"{host}/{registries.private.ref}")
    assert result.digest == registries.private.digest


def test_skopeo_copies_all_platforms_and_inspects_raw(registries: Registries,
                                                      clean: Path) -> None:
    """skopeo copy --all of a manifest list over TLS keeps the bytes; inspect --raw hashes to
    the same digest; credentials reach a private repo; a mirror works via --registries-conf."""
    mirrors = {"docker.io": [registries.plain.url]}
    with Skopeo(clean / "skopeo", mirrors=mirrors, ca_path=registries.ca_path) as skopeo:
        tls_host = registries.tls.url.split("://", 1)[1]
        copied = skopeo.copy(f"{tls_host}/{registries.multiarch.ref}", all=True)
        raw = skopeo.inspect(f"{tls_host}/{registries.multiarch.ref}", raw=True)
        private = skopeo.copy(f"{registries.auth_host}/{registries.private.ref}",
                              creds=(USER, PASSWORD))
        mirrored = skopeo.copy("docker.io/library/alpine:latest", layout="oci")
        info = skopeo.inspect("docker.io/library/alpine:latest")
        assert (skopeo.var_lib / BLOB_INFO_CACHE).exists()
    expected = registries.multiarch
    assert copied.digest == expected.digest
    assert copied.manifest == expected.manifest.body
    assert set(copied.children) == {c.digest for c in expected.manifest.children}
    assert set(copied.blobs) == {b.digest for b in expected.blobs}
    assert images.sha256_digest(raw) == expected.digest
    assert private.digest == registries.private.digest
    assert set(private.blobs) == {b.digest for b in registries.private.blobs}
    # oci: converts the Docker manifest, so only the layer and config survive unchanged.
    assert set(mirrored.blobs) >= {l.digest for l in registries.alpine.manifest.layers}
    assert info["Digest"] == registries.alpine.digest
