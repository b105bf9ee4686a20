"""What every docxy resource shares: the collaborators it is built with, and the rule that
HEAD is answered by its own method (twisted.web would otherwise run GET for a HEAD)."""
from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from docxy.admission.networks import NetworkPolicy
from docxy.admission.policy import ClientPolicy
from docxy.config import Config
from docxy.ops.metrics import Metrics
from docxy.ops.readiness import Readiness
from docxy.registry.selection import Selection, UpstreamTable
from docxy.upstream.proxy import RegistryProxy

if TYPE_CHECKING:
    # Annotations only: docxy.cache imports docxy.web.answers and the site imports the
    # resources, so importing either here at run time would make an import cycle.
    from docxy.cache.blobs import BlobCache
    from docxy.cache.manifests import ManifestCache
    from docxy.web.site import DocxyRequest


@attrs.frozen
class Context:
    """The collaborators a request needs: one per daemon, built by docxy.service."""

    config: Config
    table: UpstreamTable
    proxies: dict[str, RegistryProxy]  # by upstream name
    reactor: IReactorTime  # seconds() and callLater() are all a request needs of it
    server_names: tuple[str, ...]
    blobs: BlobCache | None = None  # None when the cache is off
    manifests: ManifestCache | None = None  # likewise
    metrics: Metrics = attrs.field(factory=Metrics)
    cluster: object | None = None  # docxy.cluster.node.ClusterParts: the bucket, Redis
    # who may use the mirror; by default every network, no login, no rate limit
    policy: ClientPolicy = attrs.field(
        default=attrs.Factory(lambda self: ClientPolicy(NetworkPolicy(), self.metrics), takes_self=True)
    )
    # /ready and /health?deep=1: one shared check of the upstreams and the cache directory
    readiness: Readiness = attrs.field(
        default=attrs.Factory(
            lambda self: Readiness(self.proxies, self.config.cache_dir, self.reactor,
                                   cluster=self.cluster),
            takes_self=True,
        )
    )

    def select(self, request: Request, path: bytes) -> tuple[Selection, RegistryProxy]:
        """The upstream `request` is for (raises docxy.registry.selection.NotMirrored).  A request
        that chose it by containerd's `ns=` gets the namespace echoed in `OCI-Namespace`."""
        ns = next((v for k, v in query_pairs(request) if k == "ns"), None)
        host = request.getHeader(b"host")
        selection = self.table.select(path, ns, host.decode("latin-1") if host else None)
        if selection.via == "ns":
            request.setHeader(b"oci-namespace", ns.encode("latin-1"))
        return selection, self.proxies[selection.upstream.name]


def query_pairs(request: Request) -> list[tuple[str, str]]:
    """The query string in its order, repeated keys kept (request.args loses the order)."""
    _, _, query = request.uri.partition(b"?")
    return parse_qsl(query.decode("latin-1"), keep_blank_values=True)


class LeafResource(Resource):
    """A resource answering every path below it, built with the daemon's Context."""

    isLeaf = True

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context


class PullResource(LeafResource):
    """A resource whose HEAD is answered by the same code as its GET: HEAD stays HEAD
    upstream, so it never costs a download."""

    def render_GET(self, request: DocxyRequest) -> bytes | int:
        return self.answer(request)

    def render_HEAD(self, request: DocxyRequest) -> bytes | int:
        return self.answer(request)

    def answer(self, request: DocxyRequest) -> bytes | int:
        """The answer to a GET or a HEAD (`request.method` says which): a body, or
        NOT_DONE_YET."""
        raise NotImplementedError
