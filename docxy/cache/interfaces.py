"""What the cache asks of the place its verified blobs live, so that the cache logic
(blobs.py, fill.py, manifests.py) does not know where bytes are kept.  `BlobStore`
(store.py) keeps them on local disk; object storage comes next behind the same interface."""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IBlobStore(Interface):
    """A content-addressed store: a digest enters only verified, by `commit`."""

    root = Attribute("The local directory beside the blobs (tags, manifests' media types, "
                     "access decisions); for object storage, its first-level cache")
    max_size = Attribute("The bound in bytes, or None")
    total = Attribute("Bytes stored")
    stats = Attribute("Evictions so far (StoreStats)")

    def __len__() -> int:
        """How many blobs are stored."""

    def has(digest: str) -> bool:
        """Stored and readable now."""

    def size_of(digest: str) -> int | None:
        """The stored size, or None."""

    def free_bytes() -> int | None:
        """Room left for new blobs, or None when it cannot be told."""

    def acquire(digest: str):
        """A readable file of the blob, marked used (not evicted until `release`), or None."""

    def release(digest: str) -> None:
        """The reader of `acquire` is done."""

    def local_path(digest: str):
        """Where the stored blob is on this machine's disk (a `Path`), or None when it is not
        a local file (what `--accel-redirect` hands to nginx)."""

    def new_partial(digest: str) -> tuple:
        """(path, writable file) for a download of `digest`; OSError if none can be made."""

    def commit(digest: str, partial, size: int):
        """Enter a verified partial file; returns where it now is.  OSError if it cannot."""

    def discard(digest: str, partial) -> None:
        """Throw a partial file away."""
