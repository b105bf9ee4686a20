"""The tokens docxy hands its own users when client authentication is on: short-lived,
naming the user, signed with a key the daemon makes at start-up (a restart only makes
clients log in again, which they do by themselves).  Pure apart from the clock."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

PREFIX = "dx1."
DEFAULT_LIFETIME = 300  # seconds; Hub's anonymous tokens live as long


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    def __init__(self, clock, key: bytes | None = None, lifetime: int = DEFAULT_LIFETIME) -> None:
        self._clock = clock
        self._key = key or os.urandom(32)
        self.lifetime = lifetime

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, user: str) -> str:
        claims = {"u": user, "e": int(self._clock.seconds()) + self.lifetime}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._sign(payload)}"

    def verify(self, token: str) -> str | None:
        """The user a token was issued to, or None if it is not ours, altered or expired."""
        if not token.startswith(PREFIX) or len(token) > 4096:
            return None
        payload, _, signature = token[len(PREFIX):].partition(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims = json.loads(_unb64(payload))
            user, expires = claims["u"], claims["e"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(user, str) or not isinstance(expires, int):
            return None
        return user if expires > self._clock.seconds() else None
