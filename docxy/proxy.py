"""What the resources ask of the upstream: a pull request, the `/v2/` ping and a token
request, each turned into the right upstream request (name, query, credentials).

Answers are upstream responses whose bodies are still unread; `docxy.answers` relays them.
"""
from __future__ import annotations

from urllib.parse import urlencode

from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.access import AccessGate
from docxy.config import Config
from docxy.headers import upstream_request_headers
from docxy.names import Route, rewrite_scope, upstream_name, upstream_path
from docxy.tokens import AuthEndpoint, UpstreamAuth, read_small_body
from docxy.upstream import UpstreamClient, UpstreamError

# Query parameters a pull request may carry upstream (pagination of tag lists); `ns` and
# anything else a client adds stays here.
_TAGS_QUERY = ("n", "last")
# Parameters of a token request other than service and scope, passed on as they came.
_TOKEN_PARAMS = ("account", "client_id", "offline_token")
_TOKEN_FORM = ("grant_type", "client_id", "access_type", "username", "password", "refresh_token")


def tags_query(pairs: list[tuple[str, str]]) -> str:
    kept = [(k, v) for k, v in pairs if k in _TAGS_QUERY]
    return f"?{urlencode(kept)}" if kept else ""


def token_params(
    pairs: list[tuple[str, str]], endpoint: AuthEndpoint, library: bool, allowed: tuple[str, ...]
) -> list[tuple[str, str]]:
    """The parameters of a token request as the upstream must see them: its own service,
    every scope kept in order with `library/` added to bare names."""
    out: list[tuple[str, str]] = []
    if endpoint.service:
        out.append(("service", endpoint.service))
    for key, value in pairs:
        if key == "scope":
            out.append(("scope", rewrite_scope(value, library)))
        elif key in allowed:
            out.append((key, value))
    return out


class RegistryProxy:
    def __init__(self, config: Config, client: UpstreamClient, auth: UpstreamAuth, reactor) -> None:
        self._config = config
        self._client = client
        self.auth = auth
        self.access = AccessGate(config, self, reactor)

    @property
    def mirror_mode(self) -> bool:
        return self._config.mirror_mode

    async def pull(
        self,
        route: Route,
        method: bytes,
        client_headers: Headers,
        query: list[tuple[str, str]],
        follow_redirects: bool = True,
    ) -> IResponse:
        config = self._config
        url = config.upstream_base + upstream_path(route, config.add_library)
        if route.kind == "tags":
            url += tags_query(query)
        if not config.mirror_mode:
            authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
            headers = upstream_request_headers(client_headers, authorization)
            response = await self._client.request(method, url, headers, None, follow_redirects)
            if response.code == 401:
                for challenge in response.headers.getRawHeaders(b"www-authenticate", []):
                    self.auth.learn(challenge)
            return response
        scope = f"repository:{upstream_name(route.name, config.add_library)}:pull"
        for attempt in (1, 2):
            token = await self.auth.token(scope)
            authorization = f"Bearer {token}".encode() if token else None
            headers = upstream_request_headers(client_headers, authorization)
            response = await self._client.request(method, url, headers, None, follow_redirects)
            if response.code != 401 or token is None or attempt == 2:
                return response
            # The token was refused (revoked or expired early): get a new one, once.
            await read_small_body(response)
            self.auth.forget(scope)
        raise AssertionError("unreachable")

    async def ping(self, client_headers: Headers) -> IResponse:
        authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
        headers = upstream_request_headers(client_headers, authorization)
        response = await self._client.request(
            b"GET", f"{self._config.upstream_base}/v2/", headers
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
    ) -> IResponse:
        endpoint = await self.auth.endpoint()
        if endpoint is None:
            raise UpstreamError(404, "UNSUPPORTED", "the upstream registry does not use tokens")
        library = self._config.add_library
        headers = Headers()
        authorization = client_headers.getRawHeaders(b"authorization", [None])[0]
        if authorization:
            headers.setRawHeaders(b"authorization", [authorization])
        agent = client_headers.getRawHeaders(b"user-agent")
        if agent:
            headers.setRawHeaders(b"user-agent", agent)
        if method == b"POST":
            body = urlencode(token_params(form or [], endpoint, library, _TOKEN_FORM)).encode()
            headers.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
            return await self._client.request(b"POST", endpoint.realm, headers, body)
        params = token_params(query, endpoint, library, _TOKEN_PARAMS)
        separator = "&" if "?" in endpoint.realm else "?"
        url = f"{endpoint.realm}{separator}{urlencode(params)}" if params else endpoint.realm
        return await self._client.request(b"GET", url, headers)
