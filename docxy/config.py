"""The one immutable configuration object that everything else is built from.

`docxy.tap` turns the command line, the environment and the configuration file into a
`Config`; nothing below it reads options, environment variables or globals.
"""
from __future__ import annotations

import attrs

from docxy.upstreams import DEFAULT_UPSTREAM, PRESETS, Upstream


@attrs.frozen
class Config:
    listen: tuple[str, ...] = ()
    tls: tuple[str, ...] = ()
    cert_path: str | None = None
    key_path: str | None = None
    public_url: str | None = None
    server_names: tuple[str, ...] = ()
    upstreams: tuple[Upstream, ...] = (PRESETS[DEFAULT_UPSTREAM],)
    default_upstream: str = DEFAULT_UPSTREAM
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
    def default(self) -> Upstream:
        return next(u for u in self.upstreams if u.name == self.default_upstream)
