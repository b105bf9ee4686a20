"""Builds the twisted.web sites from a Config: the resource tree, the router and the
request log.  No globals: everything a request needs hangs off the Context built here."""
from __future__ import annotations

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from docxy.answers import json_error
from docxy.config import Config
from docxy.resources._base import Context
from docxy.resources.challenge import ChallengeResource
from docxy.resources.health import HealthResource
from docxy.resources.redirect import HTTPSRedirectResource
from docxy.resources.registry import RegistryResource
from docxy.resources.token import TokenResource

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
    ) -> None:
        super().__init__()
        self._routes = routes
        self._prefixes = prefixes
        self._fallback = fallback

    def _target(self, path: bytes) -> Resource | None:
        found = self._routes.get(path)
        if found is None:
            found = next((r for p, r in self._prefixes.items() if path.startswith(p)), None)
        return found or self._fallback

    def render(self, request):
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
    # Registry answers carry their own Content-Type; never invent text/html.
    defaultContentType = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.docxy_what = ("-", "")
        self.docxy_status = ""


class DocxySite(Site):
    requestFactory = DocxyRequest
    displayTracebacks = False

    def __init__(self, resource: Resource, reactor) -> None:
        super().__init__(resource, timeout=120, reactor=reactor)
        self.reactor = reactor

    def log(self, request) -> None:
        """One line per finished request; no header values, so no secret can leak."""
        name, reference = request.docxy_what
        duration = self.reactor.seconds() - request.started if hasattr(request, "started") else 0
        log.info(
            "{client} {method} {name} {reference} {status} {bytes}B {duration:.3f}s",
            client=getattr(request.getClientAddress(), "host", "-"),
            method=request.method.decode("ascii", "replace"),
            name=name,
            reference=reference,
            status=request.code,
            bytes=request.sentLength,
            duration=duration,
        )

    def getResourceFor(self, request):
        request.started = self.reactor.seconds()
        return super().getResourceFor(request)


def api_resource(context: Context) -> Resource:
    token = TokenResource(context)
    return Router(
        {
            b"/v2/": ChallengeResource(context),
            b"/v2": ChallengeResource(context),
            b"/auth/token": token,
            b"/health": HealthResource(context),
        },
        {b"/v2/": RegistryResource(context), b"/auth/token/": token},
    )


def redirect_resource(config: Config, names: tuple[str, ...], https_port: int) -> Resource:
    """The plain-HTTP side when TLS is on: `/health` answers, everything else redirects."""
    return Router(
        {b"/health": HealthResource()},
        {},
        fallback=HTTPSRedirectResource(config.public_url, names, https_port),
    )
