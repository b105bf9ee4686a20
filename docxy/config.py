"""The one immutable configuration object that everything else is built from.

`docxy.tap` turns the command line and environment into a `Config`; nothing below it reads
options, environment variables or globals.
"""
from __future__ import annotations

from urllib.parse import urlsplit

import attrs

DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
HUB_REALM = "https://auth.docker.io/token"
HUB_SERVICE = "registry.docker.io"


@attrs.frozen
class Config:
    listen: tuple[str, ...] = ()
    tls: tuple[str, ...] = ()
    cert_path: str | None = None
    key_path: str | None = None
    public_url: str | None = None
    server_names: tuple[str, ...] = ()
    upstream: str = "https://registry-1.docker.io"
    upstream_ca: str | None = None
    auth_realm: str | None = None
    auth_service: str | None = None
    # None: decided by the upstream (on for Docker Hub, off elsewhere).
    library: bool | None = None
    mirror_mode: bool = False
    upstream_credentials: str | None = None
    connect_timeout: float = 10.0
    header_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_token_body: int = 64 * 1024
    max_redirects: int = 5
    pool_size: int = 32
    cache_dir: str | None = None
    cache_max_size: int | None = None
    tag_ttl: float = 0.0

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).hostname or ""

    @property
    def is_docker_hub(self) -> bool:
        return self.upstream_host in DOCKER_HUB_HOSTS

    @property
    def add_library(self) -> bool:
        return self.is_docker_hub if self.library is None else self.library

    @property
    def upstream_base(self) -> str:
        return self.upstream.rstrip("/")
