"""Builds the twisted.web sites from a Config: the resource tree, the router and the
request log.  No globals: everything a request needs hangs off the Context built here."""
from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from docxy.cluster.peers import PEER_PATH
from docxy.config import Config
from docxy.ops.lifecycle import ActiveRequests
from docxy.ops.logs import access_fields, access_format
from docxy.ops.metrics import Metrics, metrics_resource
from docxy.web.answers import json_error
from docxy.web.channel import DocxyChannel
from docxy.web.resources._base import Context
from docxy.web.resources.challenge import ChallengeResource
from docxy.web.resources.health import HealthResource, ReadyResource
from docxy.web.resources.redirect import HTTPSRedirectResource
from docxy.web.resources.registry import RegistryResource
from docxy.web.resources.token import TokenResource

log = Logger(namespace="docxy.access")


class Router(Resource):
    """Routes on the raw request path (`request.path`), never on decoded segments, so an
    encoded slash or dot segment cannot select another resource."""

    isLeaf = True

    def __init__(
        self,
        routes: dict[bytes, Resource],
        prefixes: dict[bytes, Resource],
        fallback: Resource | None = None,
        admit: Callable[[DocxyRequest], bool] | None = None,
        open_paths: frozenset[bytes] = frozenset(),
    ) -> None:
        super().__init__()
        self._routes = routes
        self._prefixes = prefixes
        self._fallback = fallback
        # admit(request) -> bool answers a refused request itself (client networks);
        # liveness and readiness probes in `open_paths` are never refused.
        self._admit = admit
        self._open_paths = open_paths

    def _target(self, path: bytes) -> Resource | None:
        found = self._routes.get(path)
        if found is None:
            found = next((r for p, r in self._prefixes.items() if path.startswith(p)), None)
        return found or self._fallback

    def render(self, request: DocxyRequest) -> bytes | int:
        if self._admit is not None and request.path not in self._open_paths:
            if not self._admit(request):
                return NOT_DONE_YET  # answered
        target = self._target(request.path)
        if target is None:
            request.docxy_what = ("-", "")
            return json_error(request, 404, "NOT_FOUND", "no such endpoint")
        method = request.method.decode("ascii", "replace")
        if type(target).render is Resource.render and not hasattr(target, f"render_{method}"):
            request.docxy_what = ("-", "")
            request.setHeader(b"allow", b"GET, HEAD")
            return json_error(request, 405, "UNSUPPORTED", f"method {method} not allowed")
        return target.render(request)


class DocxyRequest(Request):
    """A twisted.web request with what docxy learns about it on its way, for the request
    log (docxy.ops.logs) and the admission policy.  Every such attribute is declared here
    with its default, so no reader needs getattr."""

    # Registry answers carry their own Content-Type; never invent text/html.
    defaultContentType = None

    # (what, reference) for the log: ("docker.io/library/alpine", "latest"), ("/v2/", "").
    docxy_what: tuple[str, str] = ("-", "")
    # The registry error code the request was answered with (DENIED, ...); "" for none.
    docxy_status: str = ""
    # Where the body came from: "local" until it comes from the "cache" or "upstream".
    docxy_source: str = "local"
    # The client's address, behind trusted proxies; worked out once by ClientPolicy.client.
    docxy_client: str | None = None
    # The docxy user (--htpasswd) whose token or password came with it; None for none.
    docxy_user: str | None = None
    # reactor.seconds() when the site began to route it, for the log's duration.
    started: float | None = None
    # Made by a warm-up (docxy.admin.local), not a client: not counted as a pull.
    docxy_warm: bool = False

    def connectionLost(self, reason) -> None:
        # twisted.web logs only finished requests; a pull cut short is logged here.
        finished = self.finished
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if not finished and isinstance(site, DocxySite):
            site.log(self)


class DocxySite(Site):
    requestFactory = DocxyRequest
    displayTracebacks = False
    protocol = DocxyChannel  # an absolute deadline for requests; JSON for bad ones

    def __init__(self, resource: Resource, reactor: IReactorTime, metrics: Metrics | None = None,
                 request_timeout: float = 30.0) -> None:
        super().__init__(resource, timeout=120, reactor=reactor)
        self.reactor = reactor
        self.request_timeout = request_timeout  # see docxy.web.channel
        self.metrics = metrics if metrics is not None else Metrics()
        self.active = ActiveRequests()  # a graceful stop waits for these

    def buildProtocol(self, addr: IAddress | None) -> DocxyChannel:
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        return channel

    def log(self, request: DocxyRequest) -> None:
        """One event per answered (or aborted) request, counted in the metrics; no header
        values, so no secret can leak (see docxy.ops.logs)."""
        fields = access_fields(request, self.reactor.seconds())
        log.info(access_format(fields), **fields)
        self.metrics.count_request(fields["endpoint"], fields["status"], fields["duration"],
                                   fields["bytes"], fields["source"])

    def getResourceFor(self, request: DocxyRequest) -> Resource:
        request.started = self.reactor.seconds()
        self.active.track(request)
        return super().getResourceFor(request)


def api_resource(context: Context, admit: bool = True) -> Resource:
    """The registry API; `admit=False` for docxy's own private socket (docxy.admin.local),
    whose requests the client networks do not apply to."""
    token = TokenResource(context)
    return Router(
        {
            b"/v2/": ChallengeResource(context),
            b"/v2": ChallengeResource(context),
            b"/auth/token": token,
            b"/health": HealthResource(context),
            b"/ready": ReadyResource(context),
            # with --metrics-listen, /metrics is served there instead (metrics_resource_tree)
            **({} if context.config.metrics_listen
               else {b"/metrics": metrics_resource(context.metrics)}),
        },
        {b"/v2/": RegistryResource(context), b"/auth/token/": token},
        admit=context.policy.admit_network if admit else None,
        open_paths=frozenset({b"/health", b"/ready"}),
    )


def redirect_resource(
    config: Config, names: tuple[str, ...], https_port: int, context: Context | None = None
) -> Resource:
    """The plain-HTTP side when TLS is on: `/health` and `/ready` answer (probes speak
    plain HTTP), everything else redirects."""
    probes: dict[bytes, Resource] = {b"/health": HealthResource(context)}
    if context is not None:
        probes[b"/ready"] = ReadyResource(context)
    return Router(
        probes,
        {},
        fallback=HTTPSRedirectResource(config.public_url, names, https_port),
    )


def admin_resource(admin, metrics: Metrics, page: Resource | None = None) -> Resource:
    """The admin listener: the API the `docxy` command uses, /metrics, and the status
    page at / (docxy.web.resources.admin)."""
    from docxy.web.resources import admin as api

    routes: dict[bytes, Resource] = {
        b"/api/v1/cache": api.CacheList(admin),
        b"/api/v1/cache/rm": api.CacheRemove(admin),
        b"/api/v1/cache/gc": api.CacheGC(admin),
        b"/api/v1/warm": api.Warm(admin),
        b"/api/v1/status": api.Status(admin),
        b"/metrics": metrics_resource(metrics),
    }
    if page is not None:
        routes[b"/"] = page
    return Router(routes, {})


def node_resource(blobs, parts, reactor, inventory=None) -> Resource:
    """The node listener: what the other nodes of the cluster ask this one for (a blob;
    to apply a removal, docxy.cache.inventory)."""
    from docxy.cluster.peers import FORGET_PATH
    from docxy.cluster.secret import NodeAuth, derive
    from docxy.web.resources.node import NodeBlobResource, NodeForgetResource

    auth = NodeAuth(derive(parts.secret, "node-requests"), reactor)
    return Router({}, {PEER_PATH: NodeBlobResource(blobs, auth),
                       FORGET_PATH: NodeForgetResource(inventory, auth)})


def metrics_resource_tree(context: Context) -> Resource:
    """The `--metrics-listen` endpoint: `/metrics` only."""
    return Router({b"/metrics": metrics_resource(context.metrics)}, {})
