"""How one node asks another for a blob it is downloading (or holds): a GET on the peer's
node listener, `/_docxy/v1/blobs/<digest>`, signed with the key derived from the cluster
secret, from a byte offset (a resume after a cut asks from the byte reached).  The answer
streams like any upstream body; the receiving node verifies its digest itself."""
from __future__ import annotations

import hashlib
import io
import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from docxy.cluster.secret import NodeAuth
from docxy.upstream.endpoints import UpstreamEndpoints

log = Logger()

PEER_PATH = b"/_docxy/v1/blobs/"
FORGET_PATH = b"/_docxy/v1/forget/"  # + the SHA-256 of the body: the signature covers it
AUTH_HEADER = b"x-docxy-node"
NOT_YET = 503  # the peer holds the lease but its download has not started yet


def peer_path(digest: str) -> bytes:
    return PEER_PATH + digest.encode("ascii")


class PeerUnreachable(Exception):
    """The peer did not answer (gone, refusing, or too slow to send its headers)."""


class PeerClient:
    def __init__(self, reactor, auth: NodeAuth, connect_timeout: float = 2.0,
                 header_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._auth = auth
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        # 512 KiB per socket read, as for upstreams: a blob costs fewer reactor turns
        self._agent = Agent.usingEndpointFactory(
            reactor, UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), connect_timeout),
            pool=self._pool)
        self._header_timeout = header_timeout
        self.bytes_received = 0  # counted by the cache, for the metrics

    async def get(self, node_url: str, digest: str, start: int = 0) -> IResponse:
        """The peer's answer for the blob from byte `start` (its body unread).  Raises
        PeerUnreachable when it does not answer."""
        path = peer_path(digest)
        headers = Headers({AUTH_HEADER: [self._auth.header(b"GET", path)]})
        if start:
            headers.setRawHeaders(b"range", [b"bytes=%d-" % start])
        d = self._agent.request(b"GET", node_url.rstrip("/").encode("ascii") + path, headers)
        d.addTimeout(self._header_timeout, self._reactor)
        try:
            return await d
        except Exception as e:  # refused, reset, timed out: the peer is not there for us
            raise PeerUnreachable(f"{node_url}: {type(e).__name__}") from None

    async def forget(self, node_url: str, document: dict) -> int:
        """Tell a peer what `docxy cache rm` removed here (tags, manifests, blobs), so that
        it removes its own copies; the answer's status.  Raises PeerUnreachable."""
        body = json.dumps(document, sort_keys=True).encode()
        path = FORGET_PATH + hashlib.sha256(body).hexdigest().encode("ascii")
        headers = Headers({AUTH_HEADER: [self._auth.header(b"POST", path)],
                           b"content-type": [b"application/json"]})
        d = self._agent.request(b"POST", node_url.rstrip("/").encode("ascii") + path, headers,
                                FileBodyProducer(io.BytesIO(body)))
        d.addTimeout(self._header_timeout, self._reactor)
        try:
            response = await d
            await readBody(response)
        except Exception as e:
            raise PeerUnreachable(f"{node_url}: {type(e).__name__}") from None
        return response.code

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()
