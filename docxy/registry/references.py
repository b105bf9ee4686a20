"""What a manifest document names, pure: an index's (or manifest list's) child manifests;
an image manifest's config and layers (schema 2 and OCI) or schema 1's fsLayers.  Only
valid digests are named.  The cache's graph (docxy.cache.inventory), the links restored
at start (docxy.cache.manifests), warm-ups and the status page all read it here."""
from __future__ import annotations

from docxy.registry.names import is_valid_digest


def descriptors(document: dict) -> list[tuple[str, int]]:
    """(digest, size) of each blob an image manifest names: config and layers (a size
    that is not a whole number counts 0), then schema 1's fsLayers (no size: 0)."""
    found = []
    for item in [document.get("config")] + list(document.get("layers") or ()):
        if isinstance(item, dict) and is_valid_digest(str(item.get("digest", ""))):
            size = item.get("size")
            found.append((item["digest"], size if isinstance(size, int) else 0))
    for layer in document.get("fsLayers") or ():
        if isinstance(layer, dict) and is_valid_digest(str(layer.get("blobSum", ""))):
            found.append((layer["blobSum"], 0))
    return found


def children(document: dict) -> list[dict]:
    """The entries of an index whose digest is valid (each with its platform, if any)."""
    return [c for c in document.get("manifests") or ()
            if isinstance(c, dict) and is_valid_digest(str(c.get("digest", "")))]


def references(document: dict) -> tuple[list[str], list[str]]:
    """The (manifests, blobs) a manifest document names."""
    return [c["digest"] for c in children(document)], [d for d, _ in descriptors(document)]


def described_size(document: dict) -> int:
    """The bytes an image manifest's descriptors add up to."""
    return sum(size for _, size in descriptors(document))
