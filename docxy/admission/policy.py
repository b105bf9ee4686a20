"""Who may use the mirror: the client's network, its login when client authentication is
on, and its request rate.  Resources ask this one object; every refusal is a registry JSON
error and is counted in `docxy_refusals{reason=...}`."""
from __future__ import annotations

import inspect
import time

from twisted.logger import Logger

from docxy.admission.networks import NetworkPolicy
from docxy.admission.ratelimit import RateLimiter, retry_after
from docxy.admission.tokens import TokenIssuer
from docxy.admission.users import Htpasswd
from docxy.registry.challenge import Challenge
from docxy.web.answers import send_error

log = Logger()

SERVICE = "docxy"


def bearer_token(authorization: bytes | None) -> str | None:
    if not authorization or not authorization[:7].lower() == b"bearer ":
        return None
    return authorization[7:].strip().decode("latin-1")


class ClientPolicy:
    def __init__(
        self,
        networks: NetworkPolicy,
        metrics,
        users: Htpasswd | None = None,
        issuer: TokenIssuer | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.networks = networks
        self._metrics = metrics
        self.users = users
        self.issuer = issuer
        self.limiter = limiter

    @property
    def auth_required(self) -> bool:
        return self.users is not None

    def refused(self, reason: str) -> None:
        self._metrics.refusals.labels(reason).inc()

    # --- who is asking ---------------------------------------------------------------------
    def client(self, request) -> str:
        """The client's address (see NetworkPolicy.client_address), kept on the request."""
        known = getattr(request, "docxy_client", None)
        if known:
            return known
        peer = getattr(request.getClientAddress(), "host", None) or "-"
        forwarded = [v.decode("latin-1") for v in
                     request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])]
        request.docxy_client = self.networks.client_address(peer, forwarded)
        return request.docxy_client

    def user(self, request) -> str | None:
        """The user a request's docxy token names (kept on the request), or None."""
        token = bearer_token(request.getHeader(b"authorization"))
        user = self.issuer.verify(token) if (token and self.issuer) else None
        if user is not None:
            request.docxy_user = user
        return user

    # --- the checks; each answers the request when it refuses ------------------------------
    def admit_network(self, request) -> bool:
        if self.networks.permits(self.client(request)):
            return True
        self.refused("network")
        send_error(request, 403, "DENIED", "this network may not use the mirror")
        return False

    def admit_user(self, request, realm: str, scope: str | None = None) -> bool:
        """With client authentication on, only requests with a valid docxy token pass; the
        others get docxy's own challenge (the upstream is never asked)."""
        if not self.auth_required or self.user(request) is not None:
            return True
        self.refused("unauthorized")
        params = [("realm", realm), ("service", SERVICE)]
        if scope:
            params.append(("scope", scope))
        request.setHeader(b"www-authenticate", Challenge("Bearer", tuple(params)).render().encode())
        send_error(request, 401, "UNAUTHORIZED", "authentication required")
        return False

    async def admit_rate(self, request) -> bool:
        """One request from the client's bucket (its user's, when logged in); in a
        cluster the bucket is shared by every node (docxy.cluster.ratelimit)."""
        if self.limiter is None or getattr(request, "docxy_warm", False):
            return True  # an operator's warm-up (docxy.admin) is not a client's budget
        key = getattr(request, "docxy_user", None) or self.client(request)
        wait = self.limiter.take(key)
        if inspect.isawaitable(wait):
            wait = await wait
        if not wait:
            return True
        self.refused("rate")
        request.setHeader(b"retry-after", b"%d" % retry_after(wait))
        send_error(request, 429, "TOOMANYREQUESTS", "too many requests from this client")
        return False

    # --- logging in ------------------------------------------------------------------------
    async def login(self, request, credentials: tuple[str, str] | None) -> dict | None:
        """The token answer for a user whose password checks out, else None (refused and
        counted).  Unknown user and wrong password take the same time and answer."""
        assert self.users is not None and self.issuer is not None
        if credentials is None or not await self.users.verify(*credentials):
            self.refused("login")
            log.info("login refused for {user} from {client}",
                     user=credentials[0] if credentials else "-", client=self.client(request))
            return None
        user = credentials[0]
        request.docxy_user = user
        token = self.issuer.issue(user)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.issuer.lifetime,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
