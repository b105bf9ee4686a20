"""How docxy answers a client: registry JSON errors, and upstream responses relayed with
their status, end-to-end headers, `Content-Length` and a streamed body.

Every async answer goes through `answer_later`, which cancels the upstream work when the
client goes away and never writes to a request that is gone.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET

from docxy.registry.challenge import Realm
from docxy.registry.headers import relayed_response_headers
from docxy.registry.names import InvalidRequest
from docxy.registry.publicurl import Arrival, external_base
from docxy.registry.selection import Selection
from docxy.stream.clients import request_gone
from docxy.stream.uncached import send_body
from docxy.upstream.bodies import Resumer, body_length, discard
from docxy.upstream.errors import UpstreamError
from docxy.upstream.pace import RateCap

log = Logger()

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


def json_error(request, status: int, code: str, message: str) -> bytes:
    """Set up a registry-style JSON error answer and return its body."""
    body = error_body(code, message)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(*API_VERSION)
    request.docxy_status = code
    return body


def send_json(request, status: int, document: Any) -> None:
    """Answer with a JSON document of docxy's own."""
    if request_gone(request):
        return
    body = json.dumps(document).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"cache-control", b"no-store")
    request.write(body)
    request.finish()


def send_error(request, status: int, code: str, message: str) -> None:
    if request_gone(request):
        return
    body = json_error(request, status, code, message)
    request.write(body)
    request.finish()


def arrival(request) -> Arrival:
    host = request.getHost()
    return Arrival(
        scheme="https" if request.isSecure() else "http",
        local_host=getattr(host, "host", "127.0.0.1"),
        local_port=getattr(host, "port", 0),
        host_header=(request.getHeader(b"host") or b"").decode("latin-1") or None,
    )


def token_realm(
    request, public_url: str | None, names: tuple[str, ...], selection: Selection
) -> Realm:
    """Where challenges relayed to this request send the client for a token."""
    base = external_base(public_url, names, arrival(request))
    return Realm(base + selection.realm_path, selection.scope_prefix)


def login_realm(request, public_url: str | None, names: tuple[str, ...]) -> str:
    """docxy's own token endpoint, where its users log in (client authentication)."""
    return external_base(public_url, names, arrival(request)) + "/auth/token"


def relay(
    request,
    response: IResponse,
    reactor,
    idle_timeout: float,
    realm: Realm | None,
    resumer: Resumer | None = None,
    cap: RateCap | None = None,
) -> None:
    """Answer `request` with `response`: status, headers and the body, streamed (and,
    with `resumer`, resumed after a cut; with `cap`, within the registry's bandwidth).

    `realm` rewrites a relayed challenge to point at docxy; None strips the challenge
    (mirror mode: clients are never asked to authenticate).
    """
    if request_gone(request):
        discard(response)
        return
    request.setResponseCode(response.code, response.phrase)
    for name, values in relayed_response_headers(response.headers):
        if name == b"www-authenticate":
            if realm is None:
                continue
            values = [realm.rewrite(v.decode("latin-1")).encode("latin-1") for v in values]
        request.responseHeaders.setRawHeaders(name, values)
    length = body_length(response)
    if length is not None and response.code not in (204, 304):
        request.setHeader(b"content-length", b"%d" % length)
    send_body(request, response, reactor, idle_timeout, resumer, cap)


_REFUSAL_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}


def refuse(request, head: IResponse, realm: Realm | None) -> None:
    """Answer a client with the upstream's refusal learned from a HEAD (an access check):
    its status and challenge (pointed at `realm`), and a JSON error body of our own, since
    a HEAD answer has no body to relay."""
    discard(head)
    if request_gone(request):
        return
    for value in head.headers.getRawHeaders(b"www-authenticate", []) if realm else []:
        request.responseHeaders.addRawHeader(
            b"www-authenticate", realm.rewrite(value.decode("latin-1")).encode("latin-1")
        )
    retry = head.headers.getRawHeaders(b"retry-after")
    if retry:
        request.responseHeaders.setRawHeaders(b"retry-after", retry)
    code = _REFUSAL_CODES.get(head.code, "DENIED" if head.code < 500 else "UNAVAILABLE")
    send_error(request, head.code, code, "the upstream refused this request")


def answer_later(request, work: Callable[[], Awaitable[None]]) -> Any:
    """Run `work` (which answers the request) and return NOT_DONE_YET.

    Bad input and upstream failures become JSON errors; a client that disconnects cancels
    the work, which closes any upstream connection it holds.
    """
    d = defer.ensureDeferred(work())

    def failed(failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(InvalidRequest):
            e = failure.value
            send_error(request, e.status, e.code, e.message)
        elif failure.check(UpstreamError):
            e = failure.value
            send_error(request, e.status, e.code, e.message)
        else:
            log.failure("unexpected error answering {uri}", failure, uri=request.uri)
            send_error(request, 500, "UNKNOWN", "internal error")

    d.addErrback(failed)
    request.notifyFinish().addErrback(lambda _: d.cancel())
    return NOT_DONE_YET
