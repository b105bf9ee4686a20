"""The node listener: `/_docxy/v1/blobs/<digest>`, another node of the cluster streams a
blob from this node's download (or disk); `/_docxy/v1/forget/<hash>`, another node's
`docxy cache rm` is applied here.  Only requests signed with the cluster secret are
answered; nothing here ever goes upstream."""
from __future__ import annotations

import hashlib
import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from docxy.cluster.peers import AUTH_HEADER, FORGET_PATH, PEER_PATH
from docxy.cluster.secret import NodeAuth
from docxy.registry.names import is_valid_digest
from docxy.web.answers import send_error, send_json

log = Logger()

MAX_FORGET = 1024 * 1024  # a removal's tags and digests (docxy's limit on any body)


def _signed(auth: NodeAuth, request) -> bool:
    """Whether another node of this cluster signed the request; answered 401 if not."""
    request.defaultContentType = None
    if auth.verify(request.getHeader(AUTH_HEADER), request.method, request.path):
        return True
    send_error(request, 401, "UNAUTHORIZED", "not signed with this cluster's secret")
    return False


class NodeBlobResource(Resource):
    isLeaf = True

    def __init__(self, blobs, auth: NodeAuth) -> None:
        """`blobs`: the node's docxy.cache.blobs.BlobCache."""
        super().__init__()
        self._blobs = blobs
        self._auth = auth

    def render_GET(self, request) -> int:
        return self._answer(request)

    def render_HEAD(self, request) -> int:
        return self._answer(request)

    def _answer(self, request) -> int:
        if not _signed(self._auth, request):
            return NOT_DONE_YET
        digest = request.path[len(PEER_PATH):].decode("latin-1")
        if not is_valid_digest(digest):
            send_error(request, 400, "DIGEST_INVALID", "not a digest")
            return NOT_DONE_YET
        request.docxy_what = ("node", digest)
        status = self._blobs.serve_peer(request, digest)
        if status == 404:
            send_error(request, 404, "BLOB_UNKNOWN", "this node does not hold that blob")
        elif status != 200:
            request.setHeader(b"retry-after", b"1")
            send_error(request, status, "UNAVAILABLE", "the download is about to start")
        return NOT_DONE_YET


class NodeForgetResource(Resource):
    """`POST /_docxy/v1/forget/<sha256 of the body>`: another node removed these tags,
    manifests and blobs (`docxy cache rm`); this node removes its own copies, keeping a
    blob its own manifests still name.  Signed like blob requests; the path's hash binds
    the body to the signature."""

    isLeaf = True

    def __init__(self, inventory, auth: NodeAuth) -> None:
        super().__init__()
        self._inventory = inventory
        self._auth = auth

    def render_POST(self, request) -> int:
        if not _signed(self._auth, request):
            return NOT_DONE_YET
        path = request.path
        body = request.content.read(MAX_FORGET + 1) if request.content is not None else b""
        if len(body) > MAX_FORGET or hashlib.sha256(body).hexdigest().encode() != \
                path[len(FORGET_PATH):]:
            send_error(request, 400, "UNSUPPORTED", "the body does not match the signed path")
            return NOT_DONE_YET
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict) or self._inventory is None:
            send_error(request, 400, "UNSUPPORTED", "not a removal this node can apply")
            return NOT_DONE_YET
        request.docxy_what = ("node", "forget")
        d = defer.ensureDeferred(self._inventory.forget_locally(document))
        d.addCallback(lambda result: send_json(request, 200, result))
        d.addErrback(lambda f: (log.failure("applying a peer's removal", f),
                                send_error(request, 500, "UNKNOWN", "internal error")))
        return NOT_DONE_YET
