"""What the resources ask of the upstream: a pull request, the `/v2/` ping and a token
request, each turned into the right upstream request (name, query, credentials).

Answers are upstream responses whose bodies are still unread; `docxy.answers` relays them.
"""
from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.config import Config
from docxy.headers import MANIFEST_ACCEPT, upstream_request_headers
from docxy.names import Route, rewrite_scope, upstream_name, upstream_path
from docxy.answers import discard_body
from docxy.tokens import AuthEndpoint, UpstreamAuth, bearer_expiry, read_small_body
from docxy.upstream import UpstreamClient, UpstreamError

# Query parameters a pull request may carry upstream (pagination of tag lists); `ns` and
# anything else a client adds stays here.
_TAGS_QUERY = ("n", "last")
# Parameters of a token request other than service and scope, passed on as they came.
_TOKEN_PARAMS = ("account", "client_id", "offline_token")
DEFAULT_ACCESS_TTL = 60.0  # a credential without a readable expiry
MAX_ACCESS_TTL = 3600.0
PUBLIC_TTL = 3600.0
_YES = frozenset({200, 301, 302, 303, 307, 308})
_MAX_ACCESS_ENTRIES = 100_000
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


def _bounded_put(table: dict, key, value, limit: int = _MAX_ACCESS_ENTRIES) -> None:
    """Insert into a dict used as a bounded memo: the oldest entry goes when it is full."""
    table.pop(key, None)
    if len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value


log = Logger()


class RegistryProxy:
    def __init__(self, config: Config, client: UpstreamClient, auth: UpstreamAuth, reactor) -> None:
        self._config = config
        self._client = client
        self.auth = auth
        self._reactor = reactor
        # (credential, repository) -> until when the upstream's yes is remembered
        self._access: dict[tuple[bytes, str], float] = {}
        # repositories anyone may pull, and when each was last probed, -> until when
        self._public: dict[str, float] = {}
        self._probed: dict[str, float] = {}
        # (repository, digest) the upstream is known to hold
        self._links: dict[tuple[str, str], bool] = {}

    @property
    def mirror_mode(self) -> bool:
        return self._config.mirror_mode

    def _credential(self, client_headers: Headers) -> bytes:
        if self._config.mirror_mode:
            return b"mirror"
        return client_headers.getRawHeaders(b"authorization", [b""])[0]

    def was_allowed(self, route: Route, client_headers: Headers) -> bool:
        """Whether the upstream ever said yes to this client (or to anyone) for this
        repository: what may be served from the cache while the upstream cannot be asked."""
        name = upstream_name(route.name, self._config.add_library)
        return name in self._public or (self._credential(client_headers), name) in self._access

    def note_allowed(self, route: Route, client_headers: Headers) -> None:
        """The upstream just served this client this repository (and, for a digest, that
        object in it): remember the yes."""
        name = upstream_name(route.name, self._config.add_library)
        credential = self._credential(client_headers)
        now = self._reactor.seconds()
        expiry = None if self._config.mirror_mode else bearer_expiry(credential)
        _bounded_put(self._access, (credential, name),
                     min(expiry or now + DEFAULT_ACCESS_TTL, now + MAX_ACCESS_TTL))
        self.note_link(route)

    def note_link(self, route: Route) -> None:
        """The upstream has this digest in this repository.  A digest is served only
        through repositories the upstream has it in, so a public repository's path cannot
        be used to read a private repository's blob by its digest."""
        if route.is_digest:
            name = upstream_name(route.name, self._config.add_library)
            _bounded_put(self._links, (name, route.reference), True)

    def _linked(self, route: Route, name: str) -> bool:
        return not route.is_digest or (name, route.reference) in self._links

    def was_allowed(self, route: Route, client_headers: Headers) -> bool:
        """Whether the upstream ever said yes to this client (or to anyone) for this
        repository: what may be served from the cache while the upstream cannot be asked."""
        name = upstream_name(route.name, self._config.add_library)
        if not self._linked(route, name):
            return False
        return name in self._public or (self._credential(client_headers), name) in self._access

    async def check_access(self, route: Route, client_headers: Headers) -> IResponse | None:
        """None if the upstream would serve this object of this repository to this client;
        otherwise the upstream's refusal (learned from a HEAD), to be answered.

        Whether anyone may pull a repository is asked once an hour with docxy's own
        anonymous token; otherwise the upstream is asked once per credential and repository
        with a HEAD, and its yes is remembered until the token expires.  A digest not yet
        known to be in the repository is always asked about.  While the upstream cannot
        be asked, an earlier yes stands."""
        try:
            return await self._check_access(route, client_headers)
        except UpstreamError:
            if self.was_allowed(route, client_headers):
                return None
            raise

    async def _check_access(self, route: Route, client_headers: Headers) -> IResponse | None:
        name = upstream_name(route.name, self._config.add_library)
        now = self._reactor.seconds()
        credential = self._credential(client_headers)
        if self._linked(route, name):
            if self._public.get(name, 0) > now:
                return None
            if not self._config.mirror_mode and self._probed.get(name, 0) <= now:
                self._probed[name] = now + PUBLIC_TTL
                if await self._anyone_may_pull(route):
                    return None
            until = self._access.get((credential, name))
            if until is not None and until > now:
                return None
        headers = Headers({b"accept": [MANIFEST_ACCEPT]})
        if self._config.mirror_mode:
            pass  # pull() adds the mirror's own token
        elif credential:
            headers.setRawHeaders(b"authorization", [credential])
        else:
            # A client without a credential may still pull what anyone may pull.
            await self._add_anonymous_token(headers, name)
        response = await self.pull(route, b"HEAD", headers, [], follow_redirects=False)
        if response.code not in _YES:
            return response
        discard_body(response)
        self.note_allowed(route, client_headers)
        return None

    async def _add_anonymous_token(self, headers: Headers, name: str) -> None:
        try:
            token = await self.auth.token(f"repository:{name}:pull")
        except UpstreamError:
            return
        if token:
            headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])

    def learn_publicity(self, route: Route) -> None:
        """Find out in the background, unless done within the hour, whether anyone may
        pull this repository; done on a cache miss so that later hits cost nothing."""
        name = upstream_name(route.name, self._config.add_library)
        now = self._reactor.seconds()
        if self._config.mirror_mode or self._probed.get(name, 0) > now:
            return
        self._probed[name] = now + PUBLIC_TTL
        d = defer.Deferred.fromCoroutine(self._anyone_may_pull(route))
        d.addErrback(lambda f: log.info("could not ask whether {name} is public: {err}",
                                        name=name, err=f.getErrorMessage()))

    async def _anyone_may_pull(self, route: Route) -> bool:
        name = upstream_name(route.name, self._config.add_library)
        headers = Headers({b"accept": [MANIFEST_ACCEPT]})
        await self._add_anonymous_token(headers, name)
        response = await self.pull(route, b"HEAD", headers, [], follow_redirects=False)
        discard_body(response)
        if response.code in _YES:
            self.note_link(route)
            self._public[name] = self._reactor.seconds() + PUBLIC_TTL
            return True
        return False

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
