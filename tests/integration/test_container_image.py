"""The project's Dockerfile, built with buildah and run with podman on this machine: the
image runs docxy as the unprivileged `docxy` user from DOCXY_* variables, answers /health
and its HEALTHCHECK, stops cleanly on SIGTERM, and skopeo pulls through the container.

The public python:3.11-slim cannot be fetched here, so the build gets a base made by the
suite (harness.baseimage: Debian 12 with Python 3.11, cached between runs) through the
Dockerfile's BASE argument; harness.imagebuild says what building and running needed.
"""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from harness.baseimage import base_rootfs
from harness.clients import Skopeo
from harness.daemon import cached_blob
from harness.imagebuild import ImageEngine, pip_home
from harness.procs import free_port, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CHECKOUT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/docxy:test"
DOCXY_UID = 10001
CACHE = Path("/var/cache/docxy")  # the image's DOCXY_CACHE_DIR and volume


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageEngine]:
    with ImageEngine(tmp_path_factory.mktemp("engine")) as engine:
        yield engine


@pytest.fixture(scope="module")
def base(engine: ImageEngine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The suite's stand-in for python:3.11-slim, in the engine's store."""
    tarball = base_rootfs(log=tmp_path_factory.mktemp("base") / "mmdebstrap.log")
    name = f"localhost/docxy-test-base:{tarball.stem.rsplit('-', 1)[-1]}"
    engine.import_rootfs(tarball, name)
    return name


@pytest.fixture(scope="module")
def image(engine: ImageEngine, base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Dockerfile built from the checkout, FROM the suite's base image, with this
    machine's way to PyPI mounted over /root for the RUN steps."""
    work = tmp_path_factory.mktemp("build")
    result = engine.build(CHECKOUT, IMAGE, build_args={"BASE": base},
                          volumes=[f"{pip_home(work / 'home')}:/root"])
    (work / "build.log").write_text(result.stdout + result.stderr)
    return IMAGE


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return r.status


def _start(engine: ImageEngine, name: str, env: dict[str, str],
           volumes: Sequence[str] = ()) -> int:
    """Run the image on a free loopback port; wait until /health answers; return the port."""
    port = free_port()
    engine.run(IMAGE, name, env={"DOCXY_LISTEN": f"tcp:{port}:interface=127.0.0.1",
                                 "HEALTHCHECK_URL": f"http://127.0.0.1:{port}/health", **env},
               volumes=volumes)

    def healthy() -> bool:
        if not engine.inspect(name)["State"]["Running"]:
            raise AssertionError(f"the container exited:\n{engine.logs(name)}")
        try:
            return _health(port) == 200
        except OSError:
            return False

    try:
        poll_until(healthy, timeout=60, interval=0.2)
    except TimeoutError:
        raise AssertionError(f"no /health within 60 s:\n{engine.logs(name)}") from None
    return port


@pytest.fixture(scope="module")
def mirror(engine: ImageEngine, image: str, upstream) -> Iterator[tuple[str, int]]:
    """The image running as the mirror of the test upstream (docker.io's role), its CA
    mounted read-only; (container name, port)."""
    name = "docxy-mirror"
    port = _start(engine, name, {"DOCXY_UPSTREAM": upstream.registry_url,
                                 "DOCXY_UPSTREAM_CA": "/etc/docxy/upstream-ca.crt",
                                 "DOCXY_LIBRARY": "1"},
                  volumes=[f"{upstream.ca_path}:/etc/docxy/upstream-ca.crt:ro"])
    yield name, port
    engine.remove(name)


def test_image_keeps_the_dockerfile_settings(engine: ImageEngine, image: str) -> None:
    """The built image says what the Dockerfile says: user docxy, twistd in the foreground,
    the cache volume, both ports and the /health HEALTHCHECK."""
    config = engine.image_config(image)
    assert config["User"] == "docxy"
    assert config["Cmd"] == ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "docxy"]
    assert list(config["Volumes"]) == [str(CACHE)]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "8443/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    assert "HEALTHCHECK_URL" in " ".join(config["Healthcheck"]["Test"])


def test_build_settings_stay_out_of_the_image(engine: ImageEngine, base: str,
                                              image: str) -> None:
    """What the build borrowed from this machine (pip's config and CA bundle over /root)
    left nothing behind: /root is as in the base, and there is no /etc/pip.conf."""
    with engine.mounted_image(base) as root:
        base_home = sorted(p.name for p in (root / "root").iterdir())
    with engine.mounted_image(image) as root:
        assert sorted(p.name for p in (root / "root").iterdir()) == base_home
        assert not (root / "etc" / "pip.conf").exists()
        assert (root / "opt" / "docxy" / "bin" / "twistd").exists()


def test_container_runs_docxy_as_the_docxy_user(engine: ImageEngine, mirror) -> None:
    """The container's first process is twistd, running as uid 10001 (`docxy`), not root."""
    name, port = mirror
    pid = engine.inspect(name)["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(DOCXY_UID)] * 4
    assert b"twistd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert engine.exec(name, "id", "-un").stdout.strip() == "docxy"
    assert _health(port) == 200


def test_healthcheck_passes(engine: ImageEngine, mirror) -> None:
    """The image's own HEALTHCHECK (Python's urllib against $HEALTHCHECK_URL) succeeds."""
    name, _ = mirror
    result = engine.podman("healthcheck", "run", name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert engine.inspect(name)["State"]["Health"]["Status"] == "healthy"


def test_skopeo_pulls_through_the_container(engine: ImageEngine, mirror, upstream,
                                            tmp_path: Path) -> None:
    """skopeo copies `alpine` (library/ added from DOCXY_LIBRARY) through the container: the
    digest is the upstream's, and every blob lands in the cache volume, owned by docxy."""
    name, port = mirror
    alpine = upstream.images.alpine
    with Skopeo(tmp_path / "skopeo", tls_verify=False) as skopeo:
        copied = skopeo.copy(f"127.0.0.1:{port}/{alpine.short_name}:{alpine.tag}")
    assert copied.digest == alpine.digest
    assert set(copied.blobs) == {b.digest for b in alpine.blobs}
    for blob in alpine.blobs:
        path = cached_blob(CACHE, blob.digest)
        poll_until(lambda: engine.exec(name, "test", "-f", str(path), check=False)
                   .returncode == 0, timeout=10)
        owner = engine.exec(name, "stat", "-c", "%u", str(path)).stdout.strip()
        assert owner == str(DOCXY_UID)


def test_sigterm_stops_the_container_cleanly(engine: ImageEngine, image: str) -> None:
    """`podman stop` (SIGTERM, the image's STOPSIGNAL) ends docxy at once with status 0."""
    name = "docxy-stop"
    _start(engine, name, {})
    started = time.monotonic()
    engine.podman("stop", "--time", "40", name, timeout=60)
    elapsed = time.monotonic() - started
    state = engine.inspect(name)["State"]
    assert state["ExitCode"] == 0, engine.logs(name)
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    engine.remove(name)
