"""Which upstream a request is for: pure functions over the configured upstreams.

A pull request picks its upstream, in this order, by containerd's `ns=<host>` query
parameter, by a path prefix (`/v2/ghcr.io/org/app/...`, what podman's mirror locations
produce), by the `Host` it was sent to, and otherwise gets the default upstream.  Anything
that names a registry docxy does not mirror is refused here, before any request is sent:
docxy is not a proxy to arbitrary hosts.

Token requests follow the realm docxy handed out: `/auth/token/<name>` for an upstream
chosen by `ns` or `Host`, plain `/auth/token` for the default upstream and for prefixed
names, whose scopes carry the prefix (`repository:ghcr.io/org/app:pull`).
"""
from __future__ import annotations

import attrs

from docxy.registry.names import InvalidRequest
from docxy.registry.presets import Upstream, is_host_name
from docxy.registry.publicurl import is_ip, split_host

# Registries whose repository namespaces never contain a dot: a first path component with
# a dot cannot be one of their namespaces, so it names a registry docxy does not mirror.
_DOTLESS_NAMESPACES = frozenset({"docker.io", "ghcr.io", "quay.io"})


class NotMirrored(InvalidRequest):
    """A request naming a registry (by ns, prefix or host) that is not configured."""

    def __init__(self, message: str) -> None:
        super().__init__("NAME_UNKNOWN", message, 404)


@attrs.frozen
class Selection:
    """The upstream a request is for, and how it was chosen (`ns`, `prefix`, `host` or
    `default`); `path` is the request path as that upstream's names read (the prefix
    removed)."""

    upstream: Upstream
    path: bytes
    via: str
    prefix: str | None = None

    @property
    def realm_path(self) -> str:
        """The path of docxy's token endpoint for answers to this request."""
        if self.via in ("ns", "host"):
            return f"/auth/token/{self.upstream.name}"
        return "/auth/token"

    @property
    def scope_prefix(self) -> str | None:
        """What clients put before the upstream's repository names in their scopes."""
        return f"{self.prefix}/" if self.via == "prefix" else None


class UpstreamTable:
    """The configured upstreams, indexed by every way a request can name one.

    `own_hosts` are the host names of docxy itself (certificate, `--server-name`,
    `--public-url`): a request sent to one of them, to an IP address or to localhost gets
    the default upstream; a request sent to another host name that is not configured is
    refused.  With no own names known, every unconfigured host gets the default."""

    def __init__(
        self, upstreams: tuple[Upstream, ...], default: str, own_hosts: tuple[str, ...] = ()
    ) -> None:
        self.upstreams = upstreams
        self._by_name = {n: u for u in upstreams for n in u.all_names}
        self._by_prefix = {p: u for u in upstreams for p in u.all_prefixes}
        self._by_host = {h: u for u in upstreams for h in u.hosts}
        self.default = self._by_name[default]
        self._own_hosts = frozenset(h.lower() for h in own_hosts if not h.startswith("*."))

    def named(self, name: str) -> Upstream | None:
        return self._by_name.get(name.lower())

    # --- pull requests and the /v2/ ping --------------------------------------------------
    def select(self, path: bytes, ns: str | None, host_header: str | None) -> Selection:
        """The upstream for a request to `path`; raises NotMirrored."""
        if ns:
            upstream = self.named(ns)
            if upstream is None:
                raise NotMirrored(f"registry {ns!r} is not mirrored here")
            return Selection(upstream, path, "ns")
        first, rest = _first_component(path)
        if first is not None and first in self._by_prefix:
            return Selection(self._by_prefix[first], b"/v2/" + rest, "prefix", first)
        chosen = self._by_host_header(host_header)
        if first is not None and _looks_like_registry(first) and chosen.upstream.name in _DOTLESS_NAMESPACES:
            raise NotMirrored(f"registry {first!r} is not mirrored here")
        return attrs.evolve(chosen, path=path)

    def _by_host_header(self, host_header: str | None) -> Selection:
        split = split_host(host_header) if host_header else None
        if split is not None:
            host, port = split
            found = self._by_host.get(f"{host}:{port}") if port else None
            found = found or self._by_host.get(host)
            if found is not None:
                return Selection(found, b"", "host")
            known = host in self._own_hosts or host == "localhost" or is_ip(host)
            if self._own_hosts and not known:
                raise NotMirrored(f"host {host!r} is not a registry mirrored here")
        return Selection(self.default, b"", "default")

    # --- token requests ---------------------------------------------------------------------
    def select_token(
        self, realm_name: str | None, repositories: list[str]
    ) -> tuple[Upstream, str | None]:
        """The upstream a token request is for and the prefix to take off its scopes'
        repository names: by the realm's name, else by the names the scopes ask for."""
        if realm_name:
            upstream = self.named(realm_name)
            if upstream is None:
                raise NotMirrored(f"registry {realm_name!r} is not mirrored here")
            return upstream, None
        chosen: set[tuple[str, str | None]] = set()
        for name in repositories:
            first, _, rest = name.partition("/")
            if rest and first in self._by_prefix:
                chosen.add((self._by_prefix[first].name, first))
            elif rest and _looks_like_registry(first) and self.default.name in _DOTLESS_NAMESPACES:
                raise NotMirrored(f"registry {first!r} is not mirrored here")
            else:
                chosen.add((self.default.name, None))
        if len(chosen) > 1:
            raise InvalidRequest("DENIED", "one token request may ask for one registry only")
        if not chosen:
            return self.default, None
        name, prefix = chosen.pop()
        return self._by_name[name], prefix


def _looks_like_registry(component: str) -> bool:
    return "." in component and is_host_name(component)


def _first_component(path: bytes) -> tuple[str | None, bytes]:
    """The first name component of a `/v2/<name>/<kind>/<reference>` path and the rest after
    it; None when it is the whole name (`/v2/alpine/manifests/1`) or there is no name."""
    if not path.startswith(b"/v2/"):
        return None, b""
    first, _, rest = path[4:].partition(b"/")
    if rest.count(b"/") < 2:  # the rest must still hold a name, a kind and a reference
        return None, b""
    try:
        return first.decode("ascii"), rest
    except UnicodeDecodeError:
        return None, b""
