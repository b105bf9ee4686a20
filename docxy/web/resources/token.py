"""`/auth/token` and `/auth/token/<upstream>`: the token endpoints docxy's challenges send
clients to.  The upstream is the one the realm names, else the one the scopes' names
select (a path prefix, or none for the default upstream; see docxy.registry.selection).  GET and
containerd's POST form flow are forwarded to that upstream's token service with its own
service name and the scopes in its own names; Basic credentials pass through.  With client
authentication on (--htpasswd), docxy is the token service itself: see `_login`.

With the cache on and the upstream's token service down, a token request is answered with
docxy's offline token: it opens nothing upstream, but lets the client in for what the cache
may serve it (docxy.cache.manifests), instead of failing its whole pull at the token."""
from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from docxy.registry.headers import basic_credentials
from docxy.registry.names import InvalidRequest, is_valid_name, scope_repositories
from docxy.upstream.auth import offline_token_answer
from docxy.upstream.bodies import discard
from docxy.upstream.errors import UpstreamError
from docxy.web.answers import answer_later, relay, send_error, send_json
from docxy.web.resources._base import LeafResource, query_pairs

if TYPE_CHECKING:
    from docxy.web.site import DocxyRequest  # the site imports the resources

log = Logger()

PATH = b"/auth/token"
MAX_SCOPES = 100  # a pull asks for one or a few; more is refused before anything goes upstream


class TokenResource(LeafResource):
    def render_GET(self, request: DocxyRequest) -> int:
        return self._forward(request, b"GET", None)

    def render_POST(self, request: DocxyRequest) -> int:
        max_body = self.context.config.max_token_body
        body = request.content.read(max_body + 1)
        if len(body) > max_body:
            send_error(request, 413, "SIZE_INVALID", "token request too large")
            return NOT_DONE_YET
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            send_error(request, 400, "UNSUPPORTED", "token request form is not UTF-8")
            return NOT_DONE_YET
        return self._forward(request, b"POST", form)

    def _forward(
        self, request: DocxyRequest, method: bytes, form: list[tuple[str, str]] | None
    ) -> int:
        if self.context.policy.limiter is None:
            return self._admitted(request, method, form)

        async def rated() -> None:
            if await self.context.policy.admit_rate(request):
                self._admitted(request, method, form)

        return answer_later(request, rated)

    def _admitted(
        self, request: DocxyRequest, method: bytes, form: list[tuple[str, str]] | None
    ) -> int:
        ctx = self.context
        query = query_pairs(request)
        scopes = [v for k, v in (query if form is None else form) if k == "scope"]
        refusal = _bad_scopes(scopes)
        if refusal is not None:
            request.docxy_what = ("/auth/token", "")
            send_error(request, 400, *refusal)
            return NOT_DONE_YET
        if ctx.policy.auth_required:
            return self._login(request, form)
        try:
            upstream, prefix = ctx.table.select_token(
                _realm_name(request.path), [n for s in scopes for n in scope_repositories(s)]
            )
        except InvalidRequest as e:
            request.docxy_what = ("/auth/token", "")
            if e.code == "NAME_UNKNOWN":
                ctx.policy.refused("not_mirrored")
            send_error(request, e.status, e.code, e.message)
            return NOT_DONE_YET
        request.docxy_what = (f"/auth/token/{upstream.name}", "")
        proxy = ctx.proxies[upstream.name]
        strip = f"{prefix}/" if prefix else None

        async def work() -> None:
            try:
                response = await proxy.token(method, query, form, request.requestHeaders, strip)
            except InvalidRequest as e:
                if e.code == "DENIED":  # a repository outside the registry's patterns
                    ctx.policy.refused("repository")
                raise
            except UpstreamError:
                if ctx.blobs is None or not proxy.auth.token_service_down():
                    raise
                response = None
            if response is not None and (ctx.blobs is None or response.code < 500):
                relay(request, response, ctx.reactor, ctx.config.idle_timeout, None)
                return
            if response is not None:
                discard(response)
            log.warn("the token service of {name} is down: answered a token request with "
                     "docxy's offline token (only cached content can be pulled)",
                     name=proxy.name)
            send_json(request, 200, offline_token_answer(ctx.reactor.seconds()))

        return answer_later(request, work)

    def _login(self, request: DocxyRequest, form: list[tuple[str, str]] | None) -> int:
        """Client authentication is on: docxy is the token service.  Basic credentials
        (GET, docker login) or containerd's password grant (POST) get a docxy token."""
        request.docxy_what = ("/auth/token", "")
        policy = self.context.policy
        if form is None:
            credentials = basic_credentials(request.getHeader(b"authorization"))
        else:
            fields = dict(form)
            if fields.get("grant_type", "password") != "password":
                send_error(request, 400, "UNSUPPORTED", "only the password grant is supported")
                return NOT_DONE_YET
            credentials = (
                (fields["username"], fields.get("password", ""))
                if fields.get("username") else basic_credentials(request.getHeader(b"authorization"))
            )

        async def work() -> None:
            answer = await policy.login(request, credentials)
            if answer is None:
                request.setHeader(b"www-authenticate", b'Basic realm="docxy"')
                send_error(request, 401, "UNAUTHORIZED", "incorrect username or password")
                return
            send_json(request, 200, answer)

        return answer_later(request, work)


def _bad_scopes(scopes: list[str]) -> tuple[str, str] | None:
    """(code, message) refusing scopes that no pull asks for: too many of them, or a
    repository name outside the grammar; None if they may be forwarded."""
    if sum(len(v.split()) for v in scopes) > MAX_SCOPES:
        return "DENIED", f"too many scopes in one token request (at most {MAX_SCOPES})"
    if not all(is_valid_name(n) for v in scopes for n in scope_repositories(v)):
        return "NAME_INVALID", "invalid repository name in a token scope"
    return None


def _realm_name(path: bytes) -> str | None:
    """The upstream a realm `/auth/token/<name>` names; None for `/auth/token`."""
    if path == PATH:
        return None
    name = path[len(PATH) + 1:]
    try:
        return name.decode("ascii") or None
    except UnicodeDecodeError:
        raise InvalidRequest("NAME_UNKNOWN", "no such token endpoint", 404) from None
