"""The one immutable configuration object that everything else is built from.

`docxy.tap` turns the command line, the environment and the configuration file into a
`Config`; nothing below it reads options, environment variables or globals.
"""
from __future__ import annotations

import attrs

from docxy.registry.presets import DEFAULT_UPSTREAM, PRESETS, Upstream, WarmSchedule


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
    request_timeout: float = 30.0  # a client's whole request (docxy.web.channel)
    max_token_body: int = 64 * 1024
    max_redirects: int = 5
    pool_size: int = 32
    upstream_connections: int = 32  # requests at once per upstream host; more wait
    resume_attempts: int = 5  # asks in a row, without a byte gained, to resume a cut blob
    cache_dir: str | None = None
    cache_max_size: int | None = None
    accel_redirect: str | None = None  # nginx serves cache hits: X-Accel-Redirect prefix
    tag_ttl: float = 0.0
    # observability (docxy.ops.metrics, docxy.ops.logs)
    metrics_listen: str | None = None  # /metrics on its own endpoint, not on the API's
    log_format: str = "text"  # or "json"
    # lifecycle (docxy.ops.certreload, docxy.ops.lifecycle)
    cert_check_interval: float = 60.0
    stop_timeout: float = 30.0
    # who may use the mirror (docxy.admission.policy)
    htpasswd: str | None = None
    allow_anonymous: bool = False
    allow_networks: tuple[str, ...] = ()
    deny_networks: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    rate_limit: tuple[int, float] | None = None  # (requests, per seconds)
    # the shared store and the cluster (docxy.cache.bucket, docxy.cluster)
    store: str | None = None  # s3://bucket/prefix
    s3_endpoint: str | None = None  # None: AWS
    s3_credentials: str | None = None  # a file of access_key:secret_key, else AWS_* variables
    s3_region: str = "us-east-1"
    cluster: str | None = None  # redis://host:port/db
    cluster_secret: str | None = None  # a file, the same on every node
    node_listen: str | None = None  # strports: where peers reach this node
    node_url: str | None = None  # the URL peers use for it
    lease_ttl: float = 5.0  # seconds a dead leader's lease outlives it
    store_max_size: int | None = None  # the bucket's bound, kept by the cluster
    environ: tuple[tuple[str, str], ...] = ()  # AWS_* variables for the S3 credentials
    # operators' tools (docxy.admin, docxy.web.resources.admin)
    admin_listen: str | None = None  # strports: the admin API and the status page
    admin_htpasswd: str | None = None  # its users (Basic auth); needed off loopback
    warm: tuple[WarmSchedule, ...] = ()  # [[warm]] tables of the TOML file
    retention_interval: float = 3600.0  # seconds between retention sweeps

    @property
    def default(self) -> Upstream:
        return next(u for u in self.upstreams if u.name == self.default_upstream)
