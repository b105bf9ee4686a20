"""Several docxy nodes acting as one mirror, as an operator runs them: each with its own
local cache directory and node listener, all on one bucket of a real Ceph RGW and one
Redis database, the same cluster secret.  Nodes can be killed (SIGKILL), stopped and
restarted with an empty disk."""
from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Sequence

from harness.daemon import Docxy, mirror_args
from harness.procs import free_port

_DATABASES = itertools.count(1)  # one Redis database per cluster of the session (0 is spare)


class Cluster:
    def __init__(self, workdir: Path, upstream, rgw, redis, count: int = 3,
                 extra: Sequence[str] = (), tls: tuple[Path, Path] | None = None,
                 coordinated: bool = True) -> None:
        """`coordinated` False: the nodes share the bucket but no Redis (no --cluster)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.rgw = rgw
        self.redis = redis
        self.database = next(_DATABASES) % 16 or 1
        self.bucket = f"docxy-{secrets.token_hex(4)}"
        self.prefix = "mirror"
        self.secret_path = self.workdir / "cluster-key"
        self.secret_path.write_text(secrets.token_hex(32) + "\n")
        os.chmod(self.secret_path, 0o600)
        self.credentials = rgw.credentials_file(self.workdir / "s3-credentials")
        self.extra = list(extra)
        self.tls = tls
        self.coordinated = coordinated
        self.node_ports = [free_port() for _ in range(count)]
        self.nodes: list[Docxy] = [self._node(i) for i in range(count)]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{self.database}"

    def node_args(self, index: int) -> list[str]:
        port = self.node_ports[index]
        cluster = [
            "--cluster", self.redis_url,
            "--cluster-secret", str(self.secret_path),
            "--node-listen", f"tcp:{port}:interface=127.0.0.1",
            "--node-url", f"http://127.0.0.1:{port}",
        ] if self.coordinated else []
        return mirror_args(
            self.upstream,
            "--cache-dir", str(self.cache_dir(index)),
            "--store", f"s3://{self.bucket}/{self.prefix}",
            "--s3-endpoint", self.rgw.endpoint,
            "--s3-credentials", str(self.credentials),
            *cluster,
            *self.extra,
        )

    def cache_dir(self, index: int) -> Path:
        return self.workdir / f"node{index}" / "cache"

    def _node(self, index: int) -> Docxy:
        return Docxy(self.workdir / f"node{index}", self.node_args(index), tls=self.tls,
                     name=f"node{index}")

    def add_args(self, *args: str) -> None:
        """More options for every node (before `start`), e.g. a --public-url naming one."""
        for node in self.nodes:
            node.process.argv.extend(args)

    def start(self) -> "Cluster":
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL: the node dies as a crashed machine would, holding what it holds."""
        self.nodes[index].process.stop(timeout=0.1, sig=signal.SIGKILL)

    def restart(self, index: int, empty_disk: bool = False) -> Docxy:
        """Stop the node (if it runs) and start it again, same ports, same node URL;
        `empty_disk`: with its local cache directory gone, as on a new machine."""
        node = self.nodes[index]
        node.stop()
        if empty_disk:
            shutil.rmtree(self.cache_dir(index), ignore_errors=True)
        return node.start()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

