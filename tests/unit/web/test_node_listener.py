"""The node listener (`/_docxy/v1/blobs/<digest>`): only requests signed with the cluster
secret are answered; a stored blob is served whole or from a byte; a blob this node does
not hold is a 404, and nothing goes upstream."""
from __future__ import annotations

import hashlib
import json

from twisted.internet.task import Clock

from docxy.cluster.node import ClusterParts
from docxy.cluster.peers import AUTH_HEADER, FORGET_PATH, peer_path
from docxy.cluster.secret import NodeAuth, derive
from docxy.service import build_cache
from docxy.upstream.auth import UpstreamAuth
from docxy.upstream.proxy import RegistryProxy
from docxy.web.site import DocxySite, node_resource

from ..fakes import Exchange, blob_upstream, get, hub_config, make_site

SECRET = b"a cluster secret of some length"


def _node(tmp_path, data: bytes):
    """A node's API site and its node listener over one cache; the blob pulled once."""
    config = hub_config(cache_dir=str(tmp_path / "cache"))
    upstream, _ = blob_upstream(data)
    site, _, clock = make_site(config, upstream, with_cache=True)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert get(site, f"/v2/library/x/blobs/{digest}").response()[2] == data
    # the same cache directory, read back by the node listener's BlobCache
    proxies = {s.name: RegistryProxy(s, upstream, UpstreamAuth(s, upstream, clock), clock)
               for s in config.upstreams}
    blobs, _ = build_cache(config, clock, proxies, threaded_fills=False)
    parts = ClusterParts(secret=SECRET)
    node = DocxySite(node_resource(blobs, parts, clock), clock)
    return node, upstream, clock, digest


def _signed(clock, path: bytes, secret: bytes = SECRET) -> list:
    auth = NodeAuth(derive(secret, "node-requests"), clock)
    return [(AUTH_HEADER.decode(), auth.header(b"GET", path).decode())]


def test_a_signed_peer_gets_the_blob_whole_or_from_a_byte(tmp_path):
    """A peer signing with the cluster's secret gets the stored blob, and a Range of it."""
    data = bytes(range(256)) * 40
    node, upstream, clock, digest = _node(tmp_path, data)
    calls = len(upstream.calls)
    path = peer_path(digest)
    status, headers, body = get(node, path.decode(), _signed(clock, path)).response()
    assert (status, body) == (200, data)
    assert headers[b"docker-content-digest"] == [digest.encode()]
    ex = Exchange(node)
    ex.send("GET", path.decode(), _signed(clock, path) + [("Range", "bytes=1000-")])
    status, headers, body = ex.response()
    assert (status, body) == (206, data[1000:])
    assert len(upstream.calls) == calls


def test_unsigned_or_wrongly_signed_requests_are_refused(tmp_path):
    """No signature, another cluster's secret, or a signature for another path: 401."""
    node, _, clock, digest = _node(tmp_path, b"blob bytes" * 10)
    path = peer_path(digest)
    assert get(node, path.decode()).response()[0] == 401
    assert get(node, path.decode(), _signed(clock, path, b"another secret!!!")).response()[0] == 401
    other = peer_path("sha256:" + "0" * 64)
    assert get(node, path.decode(), _signed(clock, other)).response()[0] == 401


def test_a_blob_this_node_lacks_is_404_and_never_fetched(tmp_path):
    """A signed request for a digest this node neither holds nor downloads: 404, and the
    upstream is not asked."""
    node, upstream, clock, _ = _node(tmp_path, b"blob bytes" * 10)
    calls = len(upstream.calls)
    path = peer_path("sha256:" + "1" * 64)
    status, _, body = get(node, path.decode(), _signed(clock, path)).response()
    assert status == 404 and b"BLOB_UNKNOWN" in body
    assert len(upstream.calls) == calls


class _Inventory:
    def __init__(self) -> None:
        self.applied = []

    async def forget_locally(self, document):
        self.applied.append(document)
        return {"matched": True, "tags": ["docker.io/library/x:1"]}


def _forget_node(tmp_path):
    clock = Clock()
    clock.advance(1_000_000)
    inventory = _Inventory()
    parts = ClusterParts(secret=SECRET)
    return DocxySite(node_resource(None, parts, clock, inventory), clock), clock, inventory


def _post(node, clock, body: bytes, path: bytes | None = None, secret: bytes = SECRET):
    path = path or FORGET_PATH + hashlib.sha256(body).hexdigest().encode()
    auth = NodeAuth(derive(secret, "node-requests"), clock)
    ex = Exchange(node)
    ex.send("POST", path.decode(), [(AUTH_HEADER.decode(), auth.header(b"POST", path).decode())],
            body)
    return ex.response()


def test_a_peer_s_removal_is_applied_only_when_signed_and_whole(tmp_path):
    """`cache rm` on another node: applied when signed with the cluster's secret and the
    body is the one the signed path names; refused otherwise."""
    node, clock, inventory = _forget_node(tmp_path)
    body = json.dumps({"tags": [["docker.io", "library/x", "1"]], "roots": [], "blobs": []})
    status, _, answer = _post(node, clock, body.encode())
    assert status == 200 and json.loads(answer)["tags"] == ["docker.io/library/x:1"]
    assert inventory.applied == [json.loads(body)]
    signed_for_other = FORGET_PATH + hashlib.sha256(b"{}").hexdigest().encode()
    assert _post(node, clock, body.encode(), signed_for_other)[0] == 400
    assert _post(node, clock, body.encode(), secret=b"another secret!!!")[0] == 401
    assert _post(node, clock, b"[1, 2]")[0] == 400
    assert len(inventory.applied) == 1
