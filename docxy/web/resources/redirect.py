"""The plain-HTTP listener when TLS is on: everything but `/health` is sent to HTTPS, to a
URL built from configuration (never from a forged `Host`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource

from docxy.registry.publicurl import https_redirect_base
from docxy.web.answers import arrival

if TYPE_CHECKING:
    from docxy.web.site import DocxyRequest  # the site imports the resources


class HTTPSRedirectResource(Resource):
    """Every path and method, redirected to the same URI on the HTTPS side."""

    isLeaf = True

    def __init__(self, public_url: str | None, names: tuple[str, ...], https_port: int) -> None:
        super().__init__()
        self._public_url = public_url
        self._names = names
        self._https_port = https_port

    def render(self, request: DocxyRequest) -> bytes:
        request.docxy_what = ("redirect", "")
        base = https_redirect_base(self._public_url, self._names, arrival(request), self._https_port)
        uri = request.uri if request.uri.startswith(b"/") else b"/"
        target = base.encode("ascii", "replace") + uri
        # 308 keeps the method and body (a token POST); GET and HEAD get the classic 301.
        request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
        request.setHeader(b"location", target)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = b"use " + target + b"\n"
        request.setHeader(b"content-length", b"%d" % len(body))
        return body
