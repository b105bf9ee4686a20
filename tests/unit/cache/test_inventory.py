"""What is cached and its removal, on a real store in a scratch directory: a shared blob
stays while any kept manifest names it, gc takes only what nothing names, nothing being
downloaded or read is cut, and retention expires by the last pull."""
from __future__ import annotations

import hashlib
import json

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from docxy.cache.inventory import BadReference, Inventory, Reference, parse_reference
from docxy.cache.manifests import ManifestCache
from docxy.cache.store import BlobStore
from docxy.cache.usage import PullLog

REGISTRIES = {"docker.io": "docker.io", "index.docker.io": "docker.io", "ghcr.io": "ghcr.io"}
LIBRARY = {"docker.io": True, "ghcr.io": False}
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("text,expected", [
    ("docker.io/library/alpine:3.20", Reference("docker.io", "library/alpine", tag="3.20")),
    ("alpine", Reference("docker.io", "library/alpine", tag="latest")),
    ("index.docker.io/org/app:1", Reference("docker.io", "org/app", tag="1")),
    ("ghcr.io/org/app@sha256:" + "a" * 64,
     Reference("ghcr.io", "org/app", digest="sha256:" + "a" * 64)),
    ("sha256:" + "b" * 64, Reference(None, None, digest="sha256:" + "b" * 64)),
])
def test_references_as_operators_write_them(text, expected):
    assert parse_reference(text, REGISTRIES, "docker.io", LIBRARY) == expected


@pytest.mark.parametrize("text", ["docker.io/Upper/Case:1", "x@sha256:short", "docker.io/:tag",
                                  "localhost:5000/x:1", "quay.io/org/app:1", "alpine:bad tag"])
def test_bad_references_say_why(text):
    with pytest.raises(BadReference):
        parse_reference(text, REGISTRIES, "docker.io", LIBRARY)


class _Cache:
    """A store with images put in as a pull would leave them."""

    def __init__(self, root) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = BlobStore(root)
        self.manifests = ManifestCache(self.store, self.clock)
        self.manifests.pulls = PullLog(root / "usage.json", self.clock)
        self.inventory = Inventory(self.manifests, REGISTRIES, "docker.io", LIBRARY,
                                   {"docker.io": "docker.io"})

    def blob(self, data: bytes) -> str:
        digest = _digest(data)
        path, f = self.store.new_partial(digest)
        with f:
            f.write(data)
        self.store.commit(digest, path, len(data))
        return digest

    def image(self, name: str, tag: str, *layers: bytes) -> tuple[str, list[str]]:
        blobs = [self.blob(b"config of " + name.encode())] + [self.blob(x) for x in layers]
        document = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                    "config": {"digest": blobs[0], "size": 1},
                    "layers": [{"digest": d, "size": 1} for d in blobs[1:]]}
        body = json.dumps(document).encode()
        digest = _digest(body)
        self.manifests._put(digest, body, DOCKER_MANIFEST)
        self.manifests._remember_tag("docker.io", name, tag, digest, DOCKER_MANIFEST)
        self.manifests.pulls.pulled("docker.io", name, digest)
        return digest, blobs


@pytest_twisted.ensureDeferred
async def test_removing_a_tag_keeps_the_layer_another_image_uses(tmp_path):
    cache = _Cache(tmp_path)
    a, a_blobs = cache.image("library/a", "latest", b"shared", b"only a")
    b, b_blobs = cache.image("library/b", "latest", b"shared", b"only b")
    result = await cache.inventory.remove(cache.inventory.parse("docker.io/library/a:latest"))
    assert result["tags"] == ["docker.io/library/a:latest"] and result["manifests"] == [a]
    shared = _digest(b"shared")
    assert sorted(result["blobs"]) == sorted(d for d in a_blobs if d != shared)
    assert cache.store.has(shared) and all(cache.store.has(d) for d in b_blobs + [b])
    assert not cache.store.has(a)
    rows = cache.inventory.rows()
    assert [(r.repository, r.tag) for r in rows] == [("library/b", "latest")]
    assert rows[0].pulls == 1


@pytest.mark.parametrize("second", ["docker.io/library/a:other", "docker.io/library/c:latest"])
@pytest_twisted.ensureDeferred
async def test_an_image_another_tag_names_stays(tmp_path, second):
    cache = _Cache(tmp_path)
    digest, blobs = cache.image("library/a", "latest", b"layer")
    name, tag = second.split("/", 1)[1].rsplit(":", 1)
    cache.manifests._remember_tag("docker.io", name, tag, digest, DOCKER_MANIFEST)
    result = await cache.inventory.remove(cache.inventory.parse("docker.io/library/a:latest"))
    assert result["kept"] == [digest] and result["blobs"] == []
    assert all(cache.store.has(d) for d in blobs + [digest])


@pytest_twisted.ensureDeferred
async def test_nothing_matching_is_said_and_nothing_is_removed(tmp_path):
    cache = _Cache(tmp_path)
    cache.image("library/a", "latest", b"layer")
    before = cache.store.digests()
    for text in ("docker.io/library/a:nope", "docker.io/library/z@" + _digest(b"z"),
                 _digest(b"nothing")):
        assert (await cache.inventory.remove(cache.inventory.parse(text))) == {"matched": False}
    assert cache.store.digests() == before


@pytest_twisted.ensureDeferred
async def test_a_blob_being_downloaded_is_never_cut_and_one_being_read_outlives_removal(tmp_path):
    cache = _Cache(tmp_path)
    digest, blobs = cache.image("library/a", "latest", b"read now", b"downloading")
    reading = cache.store.acquire(blobs[1])
    cache.store.remove(blobs[2])
    partial, f = cache.store.new_partial(blobs[2])  # a new download of it is under way
    result = await cache.inventory.remove(cache.inventory.parse("docker.io/library/a:latest"))
    assert result["busy"] == [blobs[2]]
    assert blobs[1] in result["blobs"]
    assert reading.read() == b"read now"  # the reader goes on
    path = cache.store.path(blobs[1])
    assert path.exists()  # unlinked when the last reader ends
    cache.store.release(blobs[1])
    reading.close()
    assert not path.exists()
    f.close()
    cache.store.discard(blobs[2], partial)


@pytest_twisted.ensureDeferred
async def test_gc_takes_only_what_no_manifest_names(tmp_path):
    cache = _Cache(tmp_path)
    digest, blobs = cache.image("library/a", "latest", b"layer")
    lone = cache.blob(b"pulled by itself")
    result = await cache.inventory.gc()
    assert result["blobs"] == [lone]
    assert all(cache.store.has(d) for d in blobs + [digest])


@pytest_twisted.ensureDeferred
async def test_retention_expires_by_the_last_pull_and_keeps_patterns_and_running_pulls(tmp_path):
    cache = _Cache(tmp_path)
    old, old_blobs = cache.image("library/old", "1", b"shared", b"old only")
    kept, _ = cache.image("org/kept", "1", b"kept only")
    busy, busy_blobs = cache.image("library/busy", "1", b"busy only")
    cache.clock.advance(100)
    fresh, _ = cache.image("library/fresh", "1", b"shared")
    handle = cache.store.acquire(busy_blobs[1])  # a client reads it now
    result = await cache.inventory.expire("docker.io", 50, ("org/*",), cache.clock.seconds())
    assert result["tags"] == ["docker.io/library/old:1"]
    assert result["busy"] == [busy]
    assert not cache.store.has(old) and cache.store.has(_digest(b"shared"))
    assert all(cache.store.has(d) for d in (kept, busy, fresh))
    cache.store.release(busy_blobs[1])
    handle.close()
    later = await cache.inventory.expire("docker.io", 50, ("org/*",), cache.clock.seconds())
    assert later["tags"] == ["docker.io/library/busy:1"]


@pytest_twisted.ensureDeferred
async def test_a_peer_s_removal_keeps_what_this_node_s_own_images_name(tmp_path):
    """Another node removed library/a: this node removes its copy of the tag, the manifest
    and a's own layer, keeps the layer its image b shares, and ignores malformed entries."""
    cache = _Cache(tmp_path)
    a, a_blobs = cache.image("library/a", "latest", b"shared", b"only a")
    b, b_blobs = cache.image("library/b", "latest", b"shared")
    result = await cache.inventory.forget_locally({
        "tags": [["docker.io", "library/a", "latest"], ["..", "x", "y"],
                 ["docker.io", "../../etc", "passwd"], "bogus"],
        "roots": [a, "sha256:nope"], "blobs": []})
    assert result["tags"] == ["docker.io/library/a:latest"]
    assert not cache.store.has(a) and not cache.store.has(_digest(b"only a"))
    assert cache.store.has(_digest(b"shared")) and all(cache.store.has(d) for d in b_blobs)
    assert [(r.repository, r.tag) for r in cache.inventory.rows()] == [("library/b", "latest")]
