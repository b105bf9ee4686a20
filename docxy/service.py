"""The daemon's services, built from one `Config`: the upstream proxies, the cache, who may
use the mirror, the sites and their listeners, certificate reload and the graceful stop.
`docxy.tap` reads the command line and calls `build_service`; nothing here reads options.
"""
from __future__ import annotations

import re
import resource
from urllib.parse import urlsplit

from twisted.application import service, strports
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from docxy.admission.networks import NetworkPolicy, is_local_endpoint, parse_networks
from docxy.admission.policy import ClientPolicy
from docxy.admission.ratelimit import RateLimiter
from docxy.admission.tokens import TokenIssuer
from docxy.admission.users import Htpasswd, HtpasswdError
from docxy.cache.blobs import BlobCache
from docxy.cache.manifests import ManifestCache, cache_key
from docxy.cache.referrers import ReferrersCache
from docxy.cache.sources import BlobSources
from docxy.cache.store import BlobStore
from docxy.cluster.node import ClusterParts, ClusterService
from docxy.cluster.secret import derive
from docxy.config import Config
from docxy.ops.activation import adopted_port
from docxy.ops.certreload import CertificateReloader, CurrentCertificate
from docxy.ops.lifecycle import GracefulStop
from docxy.ops.logs import DocxyService, log_observer
from docxy.ops.metrics import Metrics
from docxy.ops.tls import ServerTLS, upstream_trust
from docxy.registry.selection import UpstreamTable
from docxy.upstream.auth import UpstreamAuth, read_credentials
from docxy.upstream.client import UpstreamClient
from docxy.upstream.measured import MeasuredClient
from docxy.upstream.proxy import RegistryProxy
from docxy.web.resources._base import Context
from docxy.web.site import (
    DocxySite,
    admin_resource,
    api_resource,
    metrics_resource_tree,
    node_resource,
    redirect_resource,
)

log = Logger()


class CacheConfigError(Exception):
    """A cache directory that cannot be used; the message is shown as it is."""

def endpoint_port(description: str) -> int | None:
    """The port of a strports description (`tcp:5443:interface=...`, `tcp:port=5443`,
    `5443`), or None when it has none (unix:, systemd:)."""
    parts = re.split(r"(?<!\\):", description)
    if len(parts) == 1 and parts[0].isdigit():
        return int(parts[0])
    if parts[0] not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port=") and part[5:].isdigit():
            return int(part[5:])
    return None


class _ClosePools(service.Service):
    """Closes the upstream connection pools when the daemon stops."""

    def __init__(self, clients: list[UpstreamClient]) -> None:
        self._clients = clients

    def stopService(self):
        super().stopService()
        return defer.gatherResults([c.close() for c in self._clients])


def _proxies(
    config: Config, reactor, metrics: Metrics
) -> tuple[dict[str, RegistryProxy], list[UpstreamClient]]:
    """One RegistryProxy per upstream; upstreams trusting the same CAs share a client (and
    its connection pool), each proxy seeing it through its registry's metrics.  Raises
    TLSConfigError or CredentialsError."""
    clients: dict[str | None, UpstreamClient] = {}
    proxies = {}
    for upstream in config.upstreams:
        client = clients.get(upstream.ca)
        if client is None:
            client = clients[upstream.ca] = UpstreamClient(
                reactor,
                upstream_trust(upstream.ca),
                connect_timeout=config.connect_timeout,
                header_timeout=config.header_timeout,
                max_redirects=config.max_redirects,
                pool_size=config.pool_size,
                connections=config.upstream_connections,
            )
        credentials = read_credentials(upstream.credentials) if upstream.credentials else None
        auth = UpstreamAuth(upstream, client, reactor, credentials)
        measured = MeasuredClient(client, metrics, upstream.name, reactor)
        proxies[upstream.name] = RegistryProxy(
            upstream, measured, auth, reactor, resume_attempts=config.resume_attempts,
            on_resume=lambda registry=upstream.name: metrics.upstream_resumed(registry))
    return proxies, list(clients.values())


class ClusterConfigError(Exception):
    """Store or cluster settings that cannot be used (credentials, secret, Redis URL)."""


def build_cluster(config: Config, reactor) -> ClusterParts:
    """The shared store and the cluster's pieces (docxy.cluster.node), as configured.
    Raises ClusterConfigError."""
    parts = ClusterParts()
    if config.store:
        from docxy.cache.bucket import Bucket
        from docxy.s3.client import S3Client
        from docxy.s3.location import (
            S3ConfigError,
            parse_store_url,
            read_s3_credentials,
        )

        bucket_name, prefix = parse_store_url(config.store)
        try:
            access, secret = read_s3_credentials(config.s3_credentials, dict(config.environ))
        except S3ConfigError as e:
            raise ClusterConfigError(str(e)) from None
        parts.s3 = S3Client(reactor, bucket_name, access, secret, endpoint=config.s3_endpoint,
                            region=config.s3_region)
        parts.bucket = Bucket(parts.s3, prefix, reactor)
    if config.cluster:
        from docxy.cluster.leases import Leases
        from docxy.cluster.link import RedisLink
        from docxy.cluster.members import Membership
        from docxy.cluster.peers import PeerClient
        from docxy.cluster.secret import (
            ClusterSecretError,
            NodeAuth,
            derive,
            read_cluster_secret,
        )
        from docxy.cluster.state import SharedState

        try:
            secret = read_cluster_secret(config.cluster_secret)
            parts.link = RedisLink(config.cluster, reactor)
        except (ClusterSecretError, ValueError) as e:
            raise ClusterConfigError(str(e)) from None
        parts.node_url = config.node_url
        parts.leases = Leases(parts.link, config.node_url, reactor, ttl=config.lease_ttl)
        parts.members = Membership(parts.link, config.node_url, reactor)
        parts.peers = PeerClient(reactor, NodeAuth(derive(secret, "node-requests"), reactor))
        parts.secret = secret
        parts.state = SharedState(parts.link)
        if config.store_max_size and parts.bucket is not None:
            from docxy.cluster.bound import SharedBound

            parts.bound = SharedBound(parts.link, parts.bucket, parts.leases, reactor,
                                      config.store_max_size, config.node_url)
    return parts


class AccessConfigError(Exception):
    """Access settings that would make an open relay, or a users file that cannot be used."""


def _client_policy(config: Config, metrics: Metrics, reactor,
                   parts: ClusterParts | None = None) -> ClientPolicy:
    """Who may use the mirror.  Refuses to start an open relay: without a users file docxy
    serves only loopback listeners, unless the operator said --allow-anonymous."""
    if not config.htpasswd and not config.allow_anonymous:
        public = [d for d in config.listen + config.tls if not is_local_endpoint(d)]
        if public:
            raise AccessConfigError(
                f"{' '.join(public)} is not a loopback address, and without --htpasswd anyone "
                "who reaches it pulls through docxy (an open mirror): give --htpasswd FILE, "
                "listen on 127.0.0.1, or accept it with --allow-anonymous"
            )
    networks = NetworkPolicy(
        allow=parse_networks(config.allow_networks, "--allow-net"),
        deny=parse_networks(config.deny_networks, "--deny-net"),
        trusted_proxies=parse_networks(config.trusted_proxies, "--trusted-proxy"),
    )
    users = issuer = None
    if config.htpasswd:
        try:
            users = Htpasswd(config.htpasswd, threads.deferToThread)
        except HtpasswdError as e:
            raise AccessConfigError(str(e)) from None
        # In a cluster every node signs with the same key, so a token from one works on
        # all of them, and after restarts.
        key = derive(parts.secret, "client-tokens") if parts and parts.link else None
        issuer = TokenIssuer(reactor, key=key)
    limiter = RateLimiter(*config.rate_limit, reactor) if config.rate_limit else None
    if limiter is not None and parts is not None and parts.link is not None:
        from docxy.cluster.ratelimit import SharedRateLimiter

        limiter = SharedRateLimiter(parts.link, *config.rate_limit, local=limiter)
    return ClientPolicy(networks, metrics, users, issuer, limiter)


def build_cache(config: Config, reactor, proxies: dict[str, RegistryProxy],
                threaded_fills: bool = True,
                parts: ClusterParts | None = None) -> tuple[BlobCache, ManifestCache]:
    """The cache in `config.cache_dir`, with what a restart must not forget read back (so
    that cached images still pull when docxy restarts during an outage).  Raises
    CacheConfigError."""
    try:
        store = BlobStore(config.cache_dir, config.cache_max_size)
    except OSError as e:
        raise CacheConfigError(f"cannot use cache directory {config.cache_dir}: {e}") from None
    sources = None
    if parts is not None and (parts.bucket is not None or parts.leases is not None):
        sources = BlobSources(reactor, parts.bucket, parts.leases, parts.peers, parts.node_url)
        sources.bound = parts.bound
    blobs = BlobCache(store, reactor, config.idle_timeout, threaded_fills,
                      accel_redirect=config.accel_redirect, sources=sources)
    manifests = ManifestCache(store, reactor, config.tag_ttl, config.idle_timeout,
                              bucket=parts.bucket if parts is not None else None)
    manifests.referrers = ReferrersCache(store.root / "referrers", reactor, config.idle_timeout)
    for name, proxy in proxies.items():
        proxy.access.remember_in(store.root / "access" / cache_key(name))
        if parts is not None and parts.state is not None:
            proxy.access.shared = parts.state
    if parts is not None:
        manifests.shared = parts.state
    manifests.restore_links(proxies)
    return blobs, manifests


def build_service(config: Config, reactor) -> service.MultiService:
    """Everything the daemon runs, from one Config.  Raises TLSConfigError,
    CredentialsError or CacheConfigError for files that cannot be used."""
    server_tls = ServerTLS(config.cert_path, config.key_path) if config.tls else None
    own = config.server_names + (server_tls.names() if server_tls else ())
    if config.public_url:
        own += (urlsplit(config.public_url).hostname or "",)
    table = UpstreamTable(config.upstreams, config.default_upstream, own)
    # A Host naming an upstream is one of ours too: realms may be built from it.
    names = tuple(dict.fromkeys(own + tuple(h for u in config.upstreams for h in u.hosts)))
    metrics = Metrics()
    proxies, clients = _proxies(config, reactor, metrics)
    metrics.watch_upstreams(proxies)
    parts = build_cluster(config, reactor)
    for proxy in proxies.values():
        proxy.auth.shared = parts.state  # mirror-mode tokens: one request per cluster
    blobs = manifests = None
    if config.cache_dir:
        blobs, manifests = build_cache(config, reactor, proxies, parts=parts)
        metrics.watch_cache(blobs, manifests)
        metrics.watch_cluster(parts, blobs)
    context = Context(
        config=config,
        table=table,
        proxies=proxies,
        reactor=reactor,
        server_names=names,
        blobs=blobs,
        manifests=manifests,
        metrics=metrics,
        policy=_client_policy(config, metrics, reactor, parts),
        cluster=parts,
    )
    top = DocxyService(log_observer(config.log_format))
    api_site = DocxySite(api_resource(context), reactor, metrics, config.request_timeout)
    # Every HTTPS listener asks `certificate` per connection: a reload reaches new ones.
    certificate = CurrentCertificate(server_tls) if server_tls else None
    tls_listeners = []
    for description in config.tls:
        factory = TLSMemoryBIOFactory(certificate, False, api_site)
        tls_listeners.append(strports.service(description, factory, reactor=reactor))
        tls_listeners[-1].setServiceParent(top)
    if config.tls:
        https_port = (endpoint_port(config.tls[0])
                      or adopted_port(tls_listeners[0].endpoint) or 443)
        plain_site = DocxySite(redirect_resource(config, names, https_port, context), reactor,
                               metrics, config.request_timeout)
    else:
        plain_site = api_site
    for description in config.listen:
        strports.service(description, plain_site, reactor=reactor).setServiceParent(top)
    if config.metrics_listen:
        metrics_site = DocxySite(metrics_resource_tree(context), reactor, metrics,
                                 config.request_timeout)
        strports.service(config.metrics_listen, metrics_site, reactor=reactor).setServiceParent(top)
    _ClosePools(clients).setServiceParent(top)
    ClusterService(parts).setServiceParent(top)
    tools, inventory = build_admin(config, context, reactor)
    tools.setServiceParent(top)
    if config.node_listen and blobs is not None:
        node_site = DocxySite(node_resource(blobs, parts, reactor, inventory), reactor, metrics,
                              config.request_timeout)
        strports.service(config.node_listen, node_site, reactor=reactor).setServiceParent(top)
        log.info("docxy: node {url} of the cluster {redis}; peers stream from {listen}",
                 url=config.node_url, redis=redacted_url(config.cluster),
                 listen=config.node_listen)
    if config.store:
        log.info("docxy: shared store {store} at {endpoint}", store=config.store,
                 endpoint=config.s3_endpoint or "AWS")
    if certificate is not None:
        CertificateReloader(certificate, config.cert_path, config.key_path, reactor,
                            config.cert_check_interval).setServiceParent(top)
    sites = (api_site,) if plain_site is api_site else (api_site, plain_site)
    GracefulStop([site.active for site in sites], reactor,
                 config.stop_timeout).setServiceParent(top)
    for upstream in config.upstreams:
        log.info(
            "docxy: mirroring {name} from {url}{default}",
            name=upstream.name,
            url=upstream.url,
            default=" (default)" if upstream.name == config.default_upstream else "",
        )
    log.info(
        "docxy: listening on {listen} (plain) {tls} (TLS); /metrics on {metrics}",
        listen=" ".join(config.listen) or "-",
        tls=" ".join(config.tls) or "-",
        metrics=config.metrics_listen or "the API's endpoints",
    )
    return top


class AdminConfigError(Exception):
    """Admin settings that cannot be used (its users file)."""


def build_admin(config: Config, context: Context, reactor):
    """The operators' tools: the pull log, warm-ups (on demand and scheduled), retention,
    and the admin listener with its API and status page; returns (their service, the
    cache's Inventory or None).  Raises AdminConfigError."""
    from docxy.admin.local import LocalMirror
    from docxy.admin.retention import RetentionService
    from docxy.admin.schedule import WarmSchedule
    from docxy.admin.warmup import WarmUp
    from docxy.cache.inventory import Inventory
    from docxy.cache.usage import PullLog, PullLogService
    from docxy.ops.history import History
    from docxy.ops.status import StatusSource, read_counters
    from docxy.web.resources.admin import Admin
    from docxy.web.resources.status import StatusPage

    tools = service.MultiService()
    inventory = warmup = pulls = None
    names = {cache_key(u.name): u.name for u in config.upstreams}
    manifests, blobs = context.manifests, context.blobs
    if manifests is not None and blobs is not None:
        pulls = PullLog(manifests.store.root / "usage.json", reactor)
        pulls.shared = context.cluster.state if context.cluster is not None else None
        manifests.pulls = pulls
        PullLogService(pulls, reactor).setServiceParent(tools)
        registries = {n.lower(): cache_key(u.name) for u in config.upstreams for n in u.all_names}
        inventory = Inventory(
            manifests, registries, config.default_upstream,
            {cache_key(u.name): u.library for u in config.upstreams}, names=names)
        inventory.cluster = context.cluster  # a removal is applied by every node
        local = LocalMirror(reactor, api_resource(context, admit=False), context.policy,
                            context.metrics, config.request_timeout,
                            key=str(manifests.store.root.resolve()))
        local.setServiceParent(tools)
        warmup = WarmUp(reactor, local, blobs.store.has)
        RetentionService(inventory, config.upstreams, reactor,
                         config.retention_interval).setServiceParent(tools)
        if config.warm:
            WarmSchedule(config.warm, warmup, inventory, reactor).setServiceParent(tools)
    if config.admin_listen:
        users = None
        if config.admin_htpasswd:
            try:
                users = Htpasswd(config.admin_htpasswd, threads.deferToThread)
            except HtpasswdError as e:
                raise AdminConfigError(f"--admin-htpasswd: {e}") from None
        # The status page plots the last hours from the counters sampled every minute.
        history = History(lambda: read_counters(context.metrics), reactor)
        history.setServiceParent(tools)
        status = StatusSource(context, history, pulls, warmup, names)
        admin = Admin(context, inventory, warmup, users, status=status.document)
        site = DocxySite(admin_resource(admin, context.metrics, StatusPage(admin)), reactor,
                         context.metrics, config.request_timeout)
        strports.service(config.admin_listen, site, reactor=reactor).setServiceParent(tools)
        log.info("docxy: admin API and status page on {listen}", listen=config.admin_listen)
    return tools, inventory


def redacted_url(url: str | None) -> str:
    """A URL fit for the log: a password in it is replaced."""
    if not url:
        return "-"
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def raise_open_files_limit() -> None:
    """Every client and every upstream connection is a file descriptor; the usual soft
    limit of 1024 is reached by a few hundred busy clients.  Raise it to the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warn("could not raise the open files limit: {err}", err=str(e))
