"""Fixtures for the integration tests: real processes on 127.0.0.1, started and stopped here.

`upstream` is one Docker-Hub-like upstream (tests/harness) for the whole session; the size
of its large layer comes from $DOCXY_TEST_LARGE_MB (default 300).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

# tests/ has no __init__.py: make `harness` importable the way bench/ imports it.
_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from harness.upstream import Upstream  # noqa: E402


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A running test upstream (registry, token service, CDN) with the test images pushed."""
    size_mb = int(os.environ.get("DOCXY_TEST_LARGE_MB", "300"))
    up = Upstream.start(tmp_path_factory.mktemp("upstream"), large_layer_size=size_mb << 20)
    try:
        yield up
    finally:
        up.stop()


from harness.daemon import Docxy, mirror_args  # noqa: E402


def _running(daemon: Docxy) -> Iterator[Docxy]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def docxy_tls(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docxy]:
    """docxy over TLS (a leaf from the upstream's intermediate CA, sent with its chain) in
    front of the test upstream, pass-through auth; its plain port only redirects."""
    workdir = tmp_path_factory.mktemp("docxy-tls")
    cert = upstream.intermediate_ca.issue_server("docxy", ["127.0.0.1", "localhost"])
    yield from _running(Docxy(workdir, mirror_args(upstream), tls=(cert.chain_path, cert.key_path)))


@pytest.fixture(scope="session")
def docxy_plain(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docxy]:
    """docxy over plain HTTP in front of the test upstream, pass-through auth."""
    yield from _running(Docxy(tmp_path_factory.mktemp("docxy-plain"), mirror_args(upstream)))


@pytest.fixture(scope="session")
def docxy_mirror(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docxy]:
    """docxy in mirror mode over plain HTTP, holding the upstream account `alice` itself."""
    workdir = tmp_path_factory.mktemp("docxy-mirror")
    user, password = upstream.user
    credentials = workdir / "upstream-credentials"
    credentials.write_text(f"{user}:{password}\n")
    credentials.chmod(0o600)
    args = mirror_args(upstream) + ["--mirror-mode", "--upstream-credentials", str(credentials)]
    yield from _running(Docxy(workdir, args))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short scratch directory: containerd's unix socket paths must stay under 104 bytes,
    which pytest's own tmp_path (named after the test) can exceed."""
    path = Path(tempfile.mkdtemp(prefix="dx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


from harness.redisd import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server on 127.0.0.1 for the session (tests that stop Redis start
    their own with RedisServer.start)."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


from harness.ceph import Rgw  # noqa: E402


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rgw]:
    """One real Ceph RGW (S3) on 127.0.0.1 for the session: a monitor, a bluestore OSD on a
    sparse file and radosgw, with one S3 user (`access_key`, `secret_key`)."""
    server = Rgw.start(tmp_path_factory.mktemp("rgw"))
    try:
        yield server
    finally:
        server.stop()
