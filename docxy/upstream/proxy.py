"""What the resources ask of one upstream: a pull request, the `/v2/` ping and a token
request, each turned into the right upstream request (name, query, credentials).  There
is one `RegistryProxy` per configured upstream.

Answers are upstream responses whose bodies are still unread; `docxy.web.answers` relays them.
"""
from __future__ import annotations

from typing import Callable
from urllib.parse import urlencode

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.registry.headers import basic_credentials, upstream_request_headers
from docxy.registry.names import (
    InvalidRequest,
    Route,
    rewrite_scope,
    scope_name,
    scope_repositories,
    upstream_name,
    upstream_path,
)
from docxy.registry.presets import Upstream
from docxy.registry.referrers import artifact_type_filter, referrers_query
from docxy.upstream.access import AccessGate
from docxy.upstream.auth import AuthEndpoint, UpstreamAuth, is_offline_token
from docxy.upstream.bodies import Resumer, discard
from docxy.upstream.errors import UpstreamError
from docxy.upstream.interfaces import IUpstreamClient
from docxy.upstream.pace import RateCap

# Query parameters a pull request may carry upstream (pagination of tag lists, a referrers
# request's `artifactType`); `ns` and anything else a client adds stays here.
_TAGS_QUERY = ("n", "last")
# Parameters of a token request other than service and scope, passed on as they came.
_TOKEN_PARAMS = ("account", "client_id", "offline_token")
_TOKEN_FORM = ("grant_type", "client_id", "access_type", "username", "password", "refresh_token")
# A resumed download asks for its own range; the client's conditions are not its business.
_NOT_RESUMED = (b"range", b"if-range", b"if-none-match", b"if-modified-since")

log = Logger()


def _anonymous_basic(authorization: bytes) -> bool:
    """Basic credentials without a user (`Basic Og==`, what some clients send for none):
    a token service refuses them, while it gives an anonymous token without them."""
    return authorization[:6].lower() == b"basic " and basic_credentials(authorization) is None


def tags_query(pairs: list[tuple[str, str]]) -> str:
    kept = [(k, v) for k, v in pairs if k in _TAGS_QUERY]
    return f"?{urlencode(kept)}" if kept else ""


def token_params(
    pairs: list[tuple[str, str]],
    endpoint: AuthEndpoint,
    library: bool,
    allowed: tuple[str, ...],
    strip: str | None = None,
) -> list[tuple[str, str]]:
    """The parameters of a token request as the upstream must see them: its own service,
    every scope kept in order, in the upstream's names (`strip` taken off, `library/`
    added to bare names)."""
    out: list[tuple[str, str]] = []
    if endpoint.service:
        out.append(("service", endpoint.service))
    for key, value in pairs:
        if key == "scope":
            out.append(("scope", rewrite_scope(value, library, strip)))
        elif key in allowed:
            out.append((key, value))
    return out


class RegistryProxy:
    def __init__(
        self, upstream: Upstream, client: IUpstreamClient, auth: UpstreamAuth, reactor,
        resume_attempts: int = 0, on_resume: Callable[[], None] = lambda: None,
    ) -> None:
        self.upstream = upstream
        self._client = client
        self.auth = auth
        self.access = AccessGate(self, reactor)
        # the registry's bandwidth cap, shared by every blob body read from it
        self.cap = RateCap(upstream.max_rate, reactor) if upstream.max_rate else None
        self._resume_attempts = resume_attempts
        self._on_resume = on_resume

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def resume_attempts(self) -> int:
        return self._resume_attempts

    @property
    def mirror_mode(self) -> bool:
        return self.upstream.mirror_mode

    @property
    def library(self) -> bool:
        return self.upstream.library

    def check_allowed(self, names: list[str]) -> None:
        """Refuse (InvalidRequest DENIED) a repository this upstream's patterns exclude."""
        for name in names:
            if not self.upstream.allows(name):
                raise InvalidRequest(
                    "DENIED", f"{self.name}/{name} is not mirrored here", 403
                )

    async def pull(
        self,
        route: Route,
        method: bytes,
        client_headers: Headers,
        query: list[tuple[str, str]],
        follow_redirects: bool = True,
    ) -> IResponse:
        response = await self._pull(route, method, client_headers, query, follow_redirects)
        if (
            route.kind == "blobs"
            and response.code in (200, 206)
            and not response.headers.hasHeader(b"docker-content-digest")
        ):
            # A CDN at the end of a redirect does not say which blob it served; the digest
            # is the blob's name, and clients expect the header on GET and HEAD.
            response.headers.setRawHeaders(b"docker-content-digest", [route.reference.encode("ascii")])
        return response

    def resumer(self, route: Route, client_headers: Headers) -> Resumer | None:
        """How a blob body fetched for this client is asked for again after a cut: the
        same request with a Range, through the registry (so a CDN link that expired is
        signed anew); None when resuming is off or `route` is no blob."""
        if self._resume_attempts <= 0 or route.kind != "blobs":
            return None
        base = client_headers.copy()
        for name in _NOT_RESUMED:
            base.removeHeader(name)
        scope = f"repository:{upstream_name(route.name, self.library)}:pull"

        async def again(range_value: bytes, if_range: bytes | None) -> IResponse:
            headers = base.copy()
            headers.setRawHeaders(b"range", [range_value])
            if if_range:
                headers.setRawHeaders(b"if-range", [if_range])
            response = await self.pull(route, b"GET", headers, [])
            if response.code == 401 and not self.mirror_mode:
                # The client's token expired during a long download; docxy's own
                # anonymous one still reads a repository anyone may pull.
                token = await self.auth.token(scope)
                if token:
                    discard(response)
                    headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
                    response = await self.pull(route, b"GET", headers, [])
            return response

        def resumed(position: int, attempt: int, why: str) -> None:
            log.warn("resuming {registry}/{name}@{digest} from byte {position} (attempt "
                     "{attempt} of {attempts}): the body {why}", registry=self.name,
                     name=route.name, digest=route.reference, position=position,
                     attempt=attempt, attempts=self._resume_attempts, why=why)
            self._on_resume()

        return Resumer(again, self._resume_attempts, resumed)

    async def _pull(
        self,
        route: Route,
        method: bytes,
        client_headers: Headers,
        query: list[tuple[str, str]],
        follow_redirects: bool,
    ) -> IResponse:
        config = self.upstream
        url = config.base + upstream_path(route, config.library)
        if route.kind == "tags":
            url += tags_query(query)
        elif route.kind == "referrers":
            url += referrers_query(artifact_type_filter(query))
        if not config.mirror_mode:
            authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
            if is_offline_token(authorization):
                authorization = None  # docxy's own, while the token service is down
            headers = upstream_request_headers(client_headers, authorization)
            response = await self._client.request(method, url, headers, None, follow_redirects)
            if response.code == 401:
                for challenge in response.headers.getRawHeaders(b"www-authenticate", []):
                    self.auth.learn(challenge)
            return response
        scope = f"repository:{upstream_name(route.name, config.library)}:pull"
        for attempt in (1, 2):
            token = await self.auth.token(scope)
            authorization = f"Bearer {token}".encode() if token else None
            headers = upstream_request_headers(client_headers, authorization)
            response = await self._client.request(method, url, headers, None, follow_redirects)
            if response.code != 401 or token is None or attempt == 2:
                return response
            # The token was refused (revoked or expired early): get a new one, once.
            discard(response)
            self.auth.forget(scope)
        raise AssertionError("unreachable")

    async def ping(self, client_headers: Headers) -> IResponse:
        authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
        headers = upstream_request_headers(client_headers, authorization)
        response = await self._client.request(
            b"GET", f"{self.upstream.base}/v2/", headers
        )
        for challenge in response.headers.getRawHeaders(b"www-authenticate", []):
            self.auth.learn(challenge)
        return response

    async def token(
        self,
        method: bytes,
        query: list[tuple[str, str]],
        form: list[tuple[str, str]] | None,
        client_headers: Headers,
        strip: str | None = None,
    ) -> IResponse:
        """Forward a token request in the upstream's names (`strip`, a path prefix the
        client puts before them, taken off)."""
        library = self.upstream.library
        scopes = [v for k, v in (form if method == b"POST" else query) or [] if k == "scope"]
        self.check_allowed([
            scope_name(name, library, strip)
            for scope in scopes
            for name in scope_repositories(scope)
        ])
        endpoint = await self.auth.endpoint()
        if endpoint is None:
            raise UpstreamError(404, "UNSUPPORTED", "the upstream registry does not use tokens")
        headers = Headers()
        authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
        if authorization and not _anonymous_basic(authorization):
            headers.setRawHeaders(b"authorization", [authorization])
        agent = client_headers.getRawHeaders(b"user-agent")
        if agent:
            headers.setRawHeaders(b"user-agent", agent)
        if method == b"POST":
            body = urlencode(token_params(form or [], endpoint, library, _TOKEN_FORM, strip)).encode()
            headers.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
            return await self.auth.ask(b"POST", endpoint.realm, headers, body)
        params = token_params(query, endpoint, library, _TOKEN_PARAMS, strip)
        return await self.auth.ask(b"GET", endpoint.url(params), headers)
