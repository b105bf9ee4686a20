"""What a manifest document names: an index's children, an image's config and layers,
schema 1's fsLayers; only valid digests, and the sizes the descriptors give."""
from __future__ import annotations

import hashlib

from docxy.registry.references import children, described_size, descriptors, references


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_references_of_an_image_an_index_and_schema1():
    config, layer, child = (_digest(x) for x in (b"c", b"l", b"m"))
    image = {"config": {"digest": config, "size": 1}, "layers": [{"digest": layer, "size": 2}]}
    assert references(image) == ([], [config, layer])
    assert references({"manifests": [{"digest": child}, {"digest": "bogus"}]}) == ([child], [])
    assert references({"fsLayers": [{"blobSum": layer}]}) == ([], [layer])


def test_sizes_and_children_as_described():
    config, layer, child = (_digest(x) for x in (b"c", b"l", b"m"))
    image = {"config": {"digest": config, "size": 7},
             "layers": [{"digest": layer, "size": "12"}, "junk", {"size": 3}]}
    assert descriptors(image) == [(config, 7), (layer, 0)]
    assert described_size(image) == 7
    entry = {"digest": child, "platform": {"os": "linux", "architecture": "arm64"}}
    assert children({"manifests": [entry, {"digest": "sha256:x"}, "junk"]}) == [entry]
    assert children({"layers": []}) == []
