"""docxy's API on a private UNIX socket, for the warm-ups and schedules: they pull
through exactly the resources a client reaches, without depending on how the public
listeners are set up (TLS, socket activation, client networks).

The socket lives in a directory only docxy's user can enter (docxy.admin.local.socket_dir,
one per cache directory, removed at the stop); with `--htpasswd`, the
requests carry a docxy token of the user `docxy-warm` (the admission is not bypassed, only
satisfied).  Requests made here are marked as warm-ups: they are not counted as pulls.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from twisted.application import service, strports
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from docxy.registry.challenge import parse_challenge
from docxy.upstream.auth import parse_token_answer
from docxy.upstream.bodies import discard, read_small
from docxy.upstream.errors import UpstreamError
from docxy.web.site import DocxyRequest, DocxySite

WARM_USER = "docxy-warm"
MAX_TOKEN_ANSWER = 64 * 1024  # docxy's own limit on a token request's body, for its answer


class WarmRequest(DocxyRequest):
    docxy_warm = True


class LocalSite(DocxySite):
    requestFactory = WarmRequest


@implementer(IAgentEndpointFactory)
class _ToSocket:
    def __init__(self, reactor, path) -> None:
        self._reactor = reactor
        self._path = path  # () -> the socket's path, known once the service runs

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path(), timeout=10)


def socket_dir(key: str) -> Path:
    """The private directory of the socket: `docxy-local-<uid>-<hash of key>` in the
    temporary directory, reused (so a daemon killed with SIGKILL leaves one, not one per
    start) only when it is a real directory of ours that nobody else may enter; else a
    fresh one."""
    name = f"docxy-local-{os.getuid()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    path = Path(tempfile.gettempdir()) / name
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and stat.S_IMODE(st.st_mode) == 0o700):
            return Path(tempfile.mkdtemp(prefix="docxy-local-"))
    return path


class LocalMirror(service.Service):
    """Serves `resource` on the private socket while running; `get` asks it."""

    def __init__(self, reactor, resource, policy, metrics, request_timeout: float,
                 key: str = "") -> None:
        self._reactor = reactor
        self._key = key  # the cache directory: one socket directory per daemon
        self._dir: Path | None = None  # made at the start: mode 0700, removed at the stop
        self.path = ""
        self._site = LocalSite(resource, reactor, metrics, request_timeout)
        self._listener = None
        self._policy = policy
        self._tokens: dict[tuple[str, str], str] = {}  # (registry, /v2/<name>) -> token
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent.usingEndpointFactory(reactor, _ToSocket(reactor, lambda: self.path),
                                                 pool=self._pool)

    def startService(self) -> None:
        super().startService()
        self._dir = socket_dir(self._key)
        self.path = str(self._dir / "api.sock")
        Path(self.path).unlink(missing_ok=True)  # left by a daemon that was killed
        self._listener = strports.service(f"unix:{self.path}:mode=600", self._site,
                                          reactor=self._reactor)
        self._listener.startService()

    def stopService(self):
        super().stopService()
        d = self._pool.closeCachedConnections()
        listener, directory = self._listener, self._dir
        if listener is not None:
            d.addBoth(lambda _: listener.stopService())
        if directory is not None:
            d.addBoth(lambda _: shutil.rmtree(directory, ignore_errors=True))
        return d

    async def get(self, registry: str, path: str, headers: dict[bytes, list[bytes]]):
        """GET `path` (/v2/...) of `registry` (by containerd's ns= parameter).  A challenge
        is answered as a client answers it: a token from docxy's token endpoint (whose
        realm's path is asked here, whatever host the realm names), kept per repository."""
        raw = dict(headers)
        url = f"http://docxy{path}?ns={registry}".encode("ascii")
        issuer = self._policy.issuer
        if self._policy.auth_required and issuer is not None:
            raw[b"authorization"] = [b"Bearer " + issuer.issue(WARM_USER).encode("ascii")]
            return await self._agent.request(b"GET", url, Headers(raw))
        repository = (registry, path.split("/manifests/")[0].split("/blobs/")[0])
        token = self._tokens.get(repository)
        if token:
            raw[b"authorization"] = [b"Bearer " + token.encode("ascii")]
        response = await self._agent.request(b"GET", url, Headers(raw))
        if response.code != 401:
            return response
        challenge = parse_challenge(
            response.headers.getRawHeaders(b"www-authenticate", [b""])[0].decode("latin-1"))
        token = await self._token(challenge) if challenge is not None else None
        if token is None:
            return response  # the 401 is the answer; its body is still unread
        discard(response)
        self._tokens[repository] = token
        if len(self._tokens) > 1000:
            self._tokens.pop(next(iter(self._tokens)))
        raw[b"authorization"] = [b"Bearer " + token.encode("ascii")]
        return await self._agent.request(b"GET", url, Headers(raw))

    async def _token(self, challenge) -> str | None:
        realm = urlsplit(challenge.get("realm") or "")
        query = [(k, v) for k, v in (("service", challenge.get("service")),
                                     ("scope", challenge.get("scope"))) if v]
        url = f"http://docxy{realm.path or '/auth/token'}?{urlencode(query)}".encode("ascii")
        response = await self._agent.request(b"GET", url, Headers({}))
        if response.code != 200:
            discard(response)
            return None
        try:
            answer = parse_token_answer(await read_small(response, MAX_TOKEN_ANSWER))
        except UpstreamError:
            return None
        return answer[0] if answer is not None else None
