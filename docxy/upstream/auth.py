"""Upstream token auth: where the upstream's token service is, and (in mirror mode) the
tokens docxy fetches for itself.

The realm and service are learned from the upstream's own challenge (its `/v2/`, asked
once, and every 401 relayed later), so any registry works without flags.  Mirror-mode
tokens are cached per scope until they expire and shared by every client asking for that
scope; concurrent misses make one token request.  Every request to the token service goes
through `UpstreamAuth.ask`, which remembers whether it answered: while it is down, docxy
lets clients in without a token so that cached public content is still served.
"""
from __future__ import annotations

import base64
import json
import time
from urllib.parse import urlencode

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from docxy.flight import SingleFlight
from docxy.registry.challenge import parse_challenge
from docxy.registry.presets import Upstream
from docxy.upstream.bodies import read_small
from docxy.upstream.errors import UpstreamError
from docxy.upstream.interfaces import IUpstreamClient

log = Logger()

MAX_TOKEN_ANSWER = 1024 * 1024
DEFAULT_EXPIRES = 60  # the token spec's default for a missing expires_in
EXPIRY_MARGIN = 10
TOKEN_SERVICE_RETRY = 30.0  # seconds a token service found down is believed down
TOKEN_SERVICE_TRUST = 30.0  # seconds a token service that answered is believed up


# What docxy hands a client while the upstream's token service is down (cache on): good for
# nothing upstream, recognised by docxy, so that the client comes in for cached content.
OFFLINE_TOKEN = "docxy-offline-token"
OFFLINE_TOKEN_LIFETIME = 60


def offline_token_answer(now: float) -> dict:
    """A token service's answer carrying OFFLINE_TOKEN."""
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return {"token": OFFLINE_TOKEN, "access_token": OFFLINE_TOKEN,
            "expires_in": OFFLINE_TOKEN_LIFETIME, "issued_at": issued}


def is_offline_token(authorization: bytes | None) -> bool:
    return authorization == b"Bearer " + OFFLINE_TOKEN.encode()


class CredentialsError(Exception):
    """An upstream credentials file that cannot be used; the message is shown as it is."""


@attrs.frozen
class AuthEndpoint:
    realm: str
    service: str

    def url(self, params: list[tuple[str, str]]) -> str:
        """The realm with `params` added to whatever query it already has."""
        if not params:
            return self.realm
        separator = "&" if "?" in self.realm else "?"
        return f"{self.realm}{separator}{urlencode(params)}"


def read_credentials(path: str) -> tuple[str, str]:
    """Read `username:password` (one line) or JSON {"username": ..., "password": ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"cannot read upstream credentials file {path}: {e}") from None
    if text.startswith("{"):
        try:
            data = json.loads(text)
            user, password = data["username"], data["password"]
        except (ValueError, KeyError, TypeError):
            raise CredentialsError(
                f"upstream credentials file {path}: JSON needs username and password"
            ) from None
    else:
        user, sep, password = text.partition(":")
        if not sep or "\n" in text:
            raise CredentialsError(
                f"upstream credentials file {path}: expected one line username:password"
            )
    if not user or not password:
        raise CredentialsError(f"upstream credentials file {path}: empty username or password")
    return str(user), str(password)


def basic_authorization(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def endpoint_from_challenge(header: bytes | str) -> AuthEndpoint | None:
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    challenge = parse_challenge(text)
    if challenge is None or challenge.scheme.lower() != "bearer":
        return None
    realm, service = challenge.get("realm"), challenge.get("service")
    if not realm:
        return None
    return AuthEndpoint(realm=realm, service=service or "")


def bearer_expiry(authorization: bytes | None) -> float | None:
    """The `exp` claim of a Bearer JWT, read without verifying it (the upstream verifies;
    this only says how long the upstream's yes may be remembered); None if there is none."""
    if not authorization or not authorization.lower().startswith(b"bearer "):
        return None
    parts = authorization[7:].strip().split(b".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + b"=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (ValueError, TypeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


def parse_token_answer(body: bytes) -> tuple[str, int] | None:
    """The token and its lifetime in seconds from a token service's JSON answer."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token:
        return None
    expires = data.get("expires_in")
    if not isinstance(expires, int) or expires <= 0:
        expires = DEFAULT_EXPIRES
    return token, expires


class UpstreamAuth:
    def __init__(
        self,
        upstream: Upstream,
        client: IUpstreamClient,
        reactor,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self._upstream = upstream
        self._client = client
        self._reactor = reactor
        self._credentials = credentials
        self._endpoint: AuthEndpoint | None = None
        self._tokens: dict[str, tuple[str, float]] = {}
        self.shared = None  # docxy.cluster.state.SharedState: tokens every node may use
        self._flights = SingleFlight()
        self._down_until: float | None = None  # the token service failed; believed down till
        self._up_until = 0.0  # the token service answered; believed up till

    # --- where the token service is -------------------------------------------------------
    def learn(self, header: bytes) -> None:
        """Remember the realm and service of a challenge the upstream sent."""
        found = endpoint_from_challenge(header)
        if found is not None:
            self._endpoint = found

    async def endpoint(self) -> AuthEndpoint | None:
        """The upstream token service, or None when the upstream does not use tokens."""
        config = self._upstream
        if config.auth_realm and config.auth_service:
            return AuthEndpoint(config.auth_realm, config.auth_service)
        if self._endpoint is None:
            try:
                await self._flights.run("endpoint", self._discover)
            except UpstreamError as e:
                log.warn("cannot discover the upstream token service: {err}", err=e.message)
        found = self._endpoint
        if found is None:
            if config.auth_realm:
                return AuthEndpoint(config.auth_realm, config.auth_service or "")
            return None
        return AuthEndpoint(
            config.auth_realm or found.realm, config.auth_service or found.service
        )

    async def _discover(self) -> None:
        url = f"{self._upstream.base}/v2/"
        response = await self._client.request(b"GET", url, Headers())
        await read_small(response, MAX_TOKEN_ANSWER, self._reactor)
        header = response.headers.getRawHeaders(b"www-authenticate", [None])[0]
        if header is not None:
            self.learn(header)

    # --- the token service's health ------------------------------------------------------
    async def ask(self, method: bytes, url: str, headers: Headers, body: bytes | None = None):
        """Send one request to the token service (the answer's body is the caller's),
        remembering whether it answered: unreachable, silent or 5xx counts as down."""
        try:
            response = await self._client.request(method, url, headers, body)
        except UpstreamError as e:
            self._service_failed(e.message)
            raise UpstreamError(e.status, e.code, f"the upstream token service: {e.message}") from None
        if response.code >= 500:
            self._service_failed(f"it answered {response.code}")
        else:
            self._down_until = None
            self._up_until = self._reactor.seconds() + TOKEN_SERVICE_TRUST
        return response

    def _service_failed(self, why: str) -> None:
        if self._down_until is None:
            log.warn("the token service of {name} is down ({why})", name=self._upstream.name, why=why)
        self._down_until = self._reactor.seconds() + TOKEN_SERVICE_RETRY

    def token_service_down(self) -> bool:
        """Whether the token service failed within the last TOKEN_SERVICE_RETRY seconds."""
        return self._down_until is not None and self._reactor.seconds() < self._down_until

    async def check_token_service(self) -> bool:
        """Whether the token service is down, asked at most once per TOKEN_SERVICE_TRUST
        seconds it answered, or TOKEN_SERVICE_RETRY seconds it failed (one request for all
        callers).  Called when the upstream challenges a client and the cache could serve
        it: a client sent to a token service that is down fails its whole pull."""
        if self.token_service_down():
            return True
        if self._reactor.seconds() < self._up_until:
            return False
        return await self._flights.run("token-service", self._probe)

    async def _probe(self) -> bool:
        endpoint = await self.endpoint()
        if endpoint is None:
            self._down_until = None
            return False
        query = [("service", endpoint.service)] if endpoint.service else []
        try:
            response = await self.ask(b"GET", endpoint.url(query), Headers())
            await read_small(response, MAX_TOKEN_ANSWER, self._reactor)
        except UpstreamError as e:
            self._service_failed(e.message)
            return True
        return self.token_service_down()

    # --- mirror mode: docxy's own tokens --------------------------------------------------
    def forget(self, scope: str) -> None:
        self._tokens.pop(scope, None)

    async def token(self, scope: str) -> str | None:
        """A token for `scope` from cache or the token service; None if the upstream needs
        no token."""
        cached = self._tokens.get(scope)
        if cached is not None and cached[1] > self._reactor.seconds():
            return cached[0]
        return await self._flights.run(("token", scope), lambda: self._shared_or_fetched(scope))

    def _shared_key(self, scope: str) -> str:
        account = self._credentials[0] if self._credentials else ""
        return f"{self._upstream.name}|{account}|{scope}"

    async def _shared_or_fetched(self, scope: str) -> str | None:
        """In a cluster a token another node fetched for the same account and scope is
        used until it expires: one token request for the whole cluster."""
        if self.shared is not None:
            found = await self.shared.lookup("upstream-token", self._shared_key(scope))
            if found and isinstance(found.get("token"), str) and \
                    isinstance(found.get("until"), (int, float)) and \
                    found["until"] > self._reactor.seconds():
                self._tokens[scope] = (found["token"], float(found["until"]))
                return found["token"]
        return await self._fetch_token(scope)

    async def _fetch_token(self, scope: str) -> str | None:
        endpoint = await self.endpoint()
        if endpoint is None:
            return None
        query = [("scope", scope)]
        if endpoint.service:
            query.insert(0, ("service", endpoint.service))
        headers = Headers()
        if self._credentials:
            headers.setRawHeaders(b"authorization", [basic_authorization(*self._credentials)])
            query.append(("account", self._credentials[0]))
        response = await self.ask(b"GET", endpoint.url(query), headers)
        body = await read_small(response, MAX_TOKEN_ANSWER, self._reactor)
        if response.code != 200:
            log.warn(
                "token service refused docxy's token request for {scope}: {status}",
                scope=scope,
                status=response.code,
            )
            raise UpstreamError(502, "UNAUTHORIZED", "the mirror could not get an upstream token")
        parsed = parse_token_answer(body)
        if parsed is None:
            raise UpstreamError(502, "UNKNOWN", "the upstream token service answered nonsense")
        token, expires = parsed
        lifetime = max(expires - EXPIRY_MARGIN, 1)
        until = self._reactor.seconds() + lifetime
        self._tokens[scope] = (token, until)
        if self.shared is not None:
            self.shared.remember("upstream-token", self._shared_key(scope),
                                 {"token": token, "until": until}, ttl=lifetime)
        return token
