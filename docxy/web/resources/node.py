"""`/_docxy/v1/blobs/<digest>` on the node listener: another node of the cluster streams a
blob from this node's download (or disk).  Only requests signed with the cluster secret
are answered; nothing here ever goes upstream."""
from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from docxy.cluster.peers import AUTH_HEADER, PEER_PATH
from docxy.cluster.secret import NodeAuth
from docxy.registry.names import is_valid_digest
from docxy.web.answers import send_error


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
        request.defaultContentType = None
        path = request.path
        if not self._auth.verify(request.getHeader(AUTH_HEADER), request.method, path):
            send_error(request, 401, "UNAUTHORIZED", "not signed with this cluster's secret")
            return NOT_DONE_YET
        digest = path[len(PEER_PATH):].decode("latin-1")
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
