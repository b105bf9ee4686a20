"""Who may be served cached content: the upstream decides, and docxy remembers its answers
(one gate per upstream: a repository, a credential and a digest link belong to one).

Whether anyone may pull a repository is asked once an hour with docxy's own anonymous
token; otherwise the upstream is asked once per credential and repository with a HEAD, and
its yes is remembered until the token expires.  A digest is served only through
repositories the upstream holds it in, so a public repository's path cannot be used to
read a private repository's blob.  While the upstream cannot be asked, only an earlier yes
counts.  In mirror mode the mirror's own account decides.  In a cluster every yes (and
every digest link) is shared through Redis, so one node's question answers every node's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.files import atomic_write
from docxy.registry.headers import MANIFEST_ACCEPT
from docxy.registry.names import Route, upstream_name
from docxy.upstream.auth import bearer_expiry, is_offline_token
from docxy.upstream.bodies import discard
from docxy.upstream.errors import UpstreamError

log = Logger()

DEFAULT_ACCESS_TTL = 60.0  # a credential without a readable expiry
MAX_ACCESS_TTL = 3600.0
PUBLIC_TTL = 3600.0
_YES = frozenset({200, 301, 302, 303, 307, 308})
_MAX_ENTRIES = 100_000


SHARED_TTL = 30 * 86400.0  # seconds the cluster keeps what one node learned


def _hashed(credential: bytes) -> str:
    """A credential as the cluster's shared state names it: never the secret itself."""
    return hashlib.sha256(credential).hexdigest()[:32]


def _bounded_put(table: dict, key, value, limit: int = _MAX_ENTRIES) -> None:
    """Insert into a dict used as a bounded memo: the oldest entry goes when it is full."""
    table.pop(key, None)
    if len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value


class AccessGate:
    def __init__(self, proxy, reactor) -> None:
        self._proxy = proxy  # docxy.upstream.proxy.RegistryProxy: its upstream, and how to ask it
        self._reactor = reactor
        # where the repositories anyone (in mirror mode: the mirror's account) may pull are
        # kept across restarts, so that a restart during an outage still serves them
        self._remembered: Path | None = None
        # (credential, repository) -> until when the upstream's yes is remembered
        self._access: dict[tuple[bytes, str], float] = {}
        # repositories anyone may pull, and when each was last probed, -> until when
        self._public: dict[str, float] = {}
        self._probed: dict[str, float] = {}
        # (repository, digest) the upstream is known to hold
        self._links: dict[tuple[str, str], bool] = {}
        # docxy.cluster.state.SharedState: what the other nodes of a cluster learned
        self.shared = None

    def _credential(self, client_headers: Headers) -> bytes:
        if self._proxy.mirror_mode:
            return b"mirror"
        credential = client_headers.getRawHeaders(b"authorization", [b""])[0]
        return b"" if is_offline_token(credential) else credential

    # --- what survives a restart --------------------------------------------------------
    def remember_in(self, path: Path) -> None:
        """Keep the repositories anyone may pull in `path` (one name a line), and take
        those it already names as an earlier yes: served while the upstream cannot be
        asked, asked again as soon as it can."""
        self._remembered = path
        try:
            names = path.read_text().split()
        except FileNotFoundError:
            names = []
        except (OSError, UnicodeDecodeError) as e:
            log.warn("cannot read {path}: {err}", path=str(path), err=str(e))
            names = []
        for name in names:
            if self._proxy.mirror_mode:
                self._access[(b"mirror", name)] = 0.0
            else:
                self._public[name] = 0.0

    def _note_public(self, name: str, until: float) -> None:
        known = name in self._public
        self._public[name] = until
        self._share("public", name, {"until": until})
        if not known:
            self._keep(name)

    def _keep(self, name: str) -> None:
        if self._remembered is None:
            return
        try:
            self._remembered.parent.mkdir(parents=True, exist_ok=True)
            with open(self._remembered, "a") as f:
                f.write(name + "\n")
        except OSError as e:
            log.warn("cannot remember that {name} may be pulled: {err}", name=name,
                     err=e.strerror or str(e))

    def _forget_public(self, name: str) -> None:
        if self._public.pop(name, None) is None or self._remembered is None:
            return
        try:
            atomic_write(self._remembered, "".join(f"{n}\n" for n in self._public).encode())
        except OSError as e:
            log.warn("cannot rewrite {path}: {err}", path=str(self._remembered),
                     err=e.strerror or str(e))

    def note_allowed(self, route: Route, client_headers: Headers) -> None:
        """The upstream just served this client this repository (and, for a digest, that
        object in it): remember the yes."""
        name = upstream_name(route.name, self._proxy.library)
        credential = self._credential(client_headers)
        now = self._reactor.seconds()
        expiry = None if self._proxy.mirror_mode else bearer_expiry(credential)
        if self._proxy.mirror_mode and (credential, name) not in self._access:
            self._keep(name)
        until = min(expiry or now + DEFAULT_ACCESS_TTL, now + MAX_ACCESS_TTL)
        _bounded_put(self._access, (credential, name), until)
        self._share("allowed", f"{_hashed(credential)}|{name}", {"until": until})
        self.note_link(route)

    def note_link(self, route: Route) -> None:
        """The upstream has this digest in this repository.  A digest is served only
        through repositories the upstream has it in, so a public repository's path cannot
        be used to read a private repository's blob by its digest."""
        if route.is_digest:
            name = upstream_name(route.name, self._proxy.library)
            if (name, route.reference) not in self._links:
                self._share("link", f"{name}@{route.reference}", {})
            _bounded_put(self._links, (name, route.reference), True)

    def _linked(self, route: Route, name: str) -> bool:
        return not route.is_digest or (name, route.reference) in self._links

    # --- shared with the other nodes of a cluster -------------------------------------------
    def _share(self, kind: str, key: str, value: dict) -> None:
        """Tell the other nodes (kept SHARED_TTL: an earlier yes outlives its freshness,
        as the `access/` file does, for serving during an outage)."""
        if self.shared is not None:
            self.shared.remember(f"access-{kind}", f"{self._proxy.name}|{key}", value,
                                 ttl=SHARED_TTL)

    async def _shared(self, kind: str, key: str) -> dict | None:
        if self.shared is None:
            return None
        return await self.shared.lookup(f"access-{kind}", f"{self._proxy.name}|{key}")

    async def _learn_shared(self, route: Route, name: str, credential: bytes) -> None:
        """What another node learned of this repository (and digest, and credential) is
        taken as learned here: the upstream is asked once for the whole cluster."""
        if self.shared is None:
            return
        if not self._linked(route, name) and \
                await self._shared("link", f"{name}@{route.reference}") is not None:
            _bounded_put(self._links, (name, route.reference), True)
        if name not in self._public:
            public = await self._shared("public", name)
            if public is not None and isinstance(public.get("until"), (int, float)):
                self._public[name] = float(public["until"])
        if (credential, name) not in self._access:
            allowed = await self._shared("allowed", f"{_hashed(credential)}|{name}")
            if allowed is not None and isinstance(allowed.get("until"), (int, float)):
                _bounded_put(self._access, (credential, name), float(allowed["until"]))

    def was_allowed(self, route: Route, client_headers: Headers) -> bool:
        """Whether the upstream ever said yes to this client (or to anyone) for this
        repository: what may be served from the cache while the upstream cannot be asked."""
        name = upstream_name(route.name, self._proxy.library)
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
        name = upstream_name(route.name, self._proxy.library)
        await self._learn_shared(route, name, self._credential(client_headers))
        try:
            return await self._check_access(route, client_headers)
        except UpstreamError:
            if self.was_allowed(route, client_headers):
                return None
            raise

    async def _check_access(self, route: Route, client_headers: Headers) -> IResponse | None:
        name = upstream_name(route.name, self._proxy.library)
        now = self._reactor.seconds()
        credential = self._credential(client_headers)
        if self._linked(route, name):
            if self._public.get(name, 0) > now:
                return None
            if not self._proxy.mirror_mode and self._probed.get(name, 0) <= now:
                self._probed[name] = now + PUBLIC_TTL
                if await self._anyone_may_pull(route):
                    return None
            until = self._access.get((credential, name))
            if until is not None and until > now:
                return None
        headers = Headers({b"accept": [MANIFEST_ACCEPT]})
        if self._proxy.mirror_mode:
            pass  # pull() adds the mirror's own token
        elif credential:
            headers.setRawHeaders(b"authorization", [credential])
        else:
            # A client without a credential may still pull what anyone may pull.
            await self._add_anonymous_token(headers, name)
        response = await self._proxy.pull(route, b"HEAD", headers, [], follow_redirects=False)
        if response.code not in _YES:
            return response
        discard(response)
        self.note_allowed(route, client_headers)
        return None

    async def _add_anonymous_token(self, headers: Headers, name: str) -> None:
        try:
            token = await self._proxy.auth.token(f"repository:{name}:pull")
        except UpstreamError:
            if self._proxy.auth.token_service_down():
                raise  # the upstream cannot be asked: an earlier yes stands
            return
        if token:
            headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])

    def learn_publicity(self, route: Route) -> None:
        """Find out in the background, unless done within the hour, whether anyone may
        pull this repository; done on a cache miss so that later hits cost nothing."""
        name = upstream_name(route.name, self._proxy.library)
        now = self._reactor.seconds()
        if self._proxy.mirror_mode or self._probed.get(name, 0) > now:
            return
        self._probed[name] = now + PUBLIC_TTL
        d = defer.Deferred.fromCoroutine(self._anyone_may_pull(route))
        d.addErrback(lambda f: log.info("could not ask whether {name} is public: {err}",
                                        name=name, err=f.getErrorMessage()))

    async def _anyone_may_pull(self, route: Route) -> bool:
        name = upstream_name(route.name, self._proxy.library)
        headers = Headers({b"accept": [MANIFEST_ACCEPT]})
        try:
            await self._add_anonymous_token(headers, name)
            response = await self._proxy.pull(route, b"HEAD", headers, [], follow_redirects=False)
        except UpstreamError:
            self._probed.pop(name, None)  # no answer is no knowledge: ask again next time
            raise
        discard(response)
        if response.code in _YES:
            self.note_link(route)
            self._note_public(name, self._reactor.seconds() + PUBLIC_TTL)
            return True
        self._forget_public(name)  # it was public once; the upstream says no now
        return False

