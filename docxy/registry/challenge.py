"""Pure functions for `WWW-Authenticate: Bearer ...` challenges: parse one, and rewrite it
so that its realm points at this mirror's own token endpoint.

Values are quoted strings that may hold commas (`scope="repository:a:pull,push"`), so
this is a small tokenizer, never a split on ','.
"""
from __future__ import annotations

import re

import attrs

from docxy.registry.names import prefix_scope

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(
    rf'\s*(?P<key>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>{_TOKEN}))\s*(?:,|$)'
)


@attrs.frozen
class Challenge:
    scheme: str
    params: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        for k, v in self.params:
            if k.lower() == key.lower():
                return v
        return None

    def replace(self, key: str, value: str) -> "Challenge":
        params = [(k, value if k.lower() == key.lower() else v) for k, v in self.params]
        if not any(k.lower() == key.lower() for k, _ in self.params):
            params.insert(0, (key, value))
        return Challenge(self.scheme, tuple(params))

    def render(self) -> str:
        inner = ",".join(f'{k}="{_quote(v)}"' for k, v in self.params)
        return f"{self.scheme} {inner}" if inner else self.scheme


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def parse_challenge(header: str) -> Challenge | None:
    """Parse one challenge (`Bearer realm="...",service="..."`); None if it is not one."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    if not scheme or not re.fullmatch(_TOKEN, scheme):
        return None
    params: list[tuple[str, str]] = []
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None or match.end() == pos:
            return None
        quoted = match.group("quoted")
        value = (
            re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else match.group("bare")
        )
        params.append((match.group("key"), value))
        pos = match.end()
    return Challenge(scheme, tuple(params))


def rewrite_challenge(header: str, realm: str, scope_prefix: str | None = None) -> str:
    """Point a Bearer challenge's realm at `realm`; other schemes pass unchanged.  With
    `scope_prefix` (a client naming repositories with a path prefix), the scope's names
    are given that prefix, so the client asks docxy's token endpoint in its own names.

    A Basic challenge (a registry without token auth) is kept as it is: the client then
    sends Basic credentials, which the mirror passes through.
    """
    challenge = parse_challenge(header)
    if challenge is None or challenge.scheme.lower() != "bearer":
        return header
    challenge = challenge.replace("realm", realm)
    scope = challenge.get("scope")
    if scope_prefix and scope:
        challenge = challenge.replace("scope", prefix_scope(scope, scope_prefix))
    return challenge.render()


@attrs.frozen
class Realm:
    """How docxy rewrites the challenges it relays to one request: the token endpoint to
    point them at, and the prefix the client puts before repository names."""

    url: str
    scope_prefix: str | None = None

    def rewrite(self, header: str) -> str:
        return rewrite_challenge(header, self.url, self.scope_prefix)
