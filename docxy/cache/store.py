"""A content-addressed store of verified blobs on local disk, bounded in size.

Layout under the root: `blobs/sha256/<2 hex>/<hex>` holds only complete, verified content,
entered by an atomic rename; `partial/` holds downloads in progress and is emptied at start,
so nothing partial is ever served.  Eviction is least-recently-used and never removes a
blob that a client is reading or that is being filled.  A directory removed underneath a
running daemon is recreated, and entries whose files are gone are forgotten.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from docxy.cache.interfaces import IBlobStore

log = Logger()


@attrs.define
class StoreStats:
    evictions: int = 0
    evicted_bytes: int = 0


def _digest_parts(digest: str) -> tuple[str, str]:
    algorithm, _, hex_part = digest.partition(":")
    if not algorithm or not hex_part or "/" in digest or ".." in digest:
        raise ValueError(f"not a digest: {digest!r}")
    return algorithm, hex_part


@implementer(IBlobStore)
class BlobStore:
    def __init__(self, root: Path | str, max_size: int | None = None) -> None:
        self.root = Path(root)
        self.max_size = max_size
        self.stats = StoreStats()
        self._blobs = self.root / "blobs"
        self._partial = self.root / "partial"
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> size, LRU first
        self._readers: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._doomed: set[str] = set()  # removed while read: unlinked when the last reader ends
        self.total = 0
        self._open()

    def _ensure_dirs(self) -> None:
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)

    def _open(self) -> None:
        self._ensure_dirs()
        removed = 0
        for leftover in self._partial.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed {n} partial downloads left from an earlier run", n=removed)
        found = []
        for algorithm_dir in self._blobs.iterdir():
            for prefix_dir in algorithm_dir.iterdir():
                for blob in prefix_dir.iterdir():
                    st = blob.stat()
                    found.append((st.st_atime, f"{algorithm_dir.name}:{blob.name}", st.st_size))
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self.total += size

    # --- reading ------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        algorithm, hex_part = _digest_parts(digest)
        return self._blobs / algorithm / hex_part[:2] / hex_part

    def local_path(self, digest: str) -> Path | None:
        return self.path(digest) if digest in self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def size_of(self, digest: str) -> int | None:
        return self._entries.get(digest)

    def has(self, digest: str) -> bool:
        """Stored: known and its file still there (an entry whose file was removed
        underneath us is forgotten)."""
        if digest not in self._entries:
            return False
        if self.path(digest).exists():
            return True
        log.warn("{digest} vanished from the cache directory; forgetting it", digest=digest)
        self._forget(digest)
        return False

    def free_bytes(self) -> int | None:
        """Free space for an unprivileged writer on the cache's file system (None when it
        cannot be told)."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def acquire(self, digest: str):
        """Open a stored blob for reading and mark it used; None if it is not stored (or
        vanished underneath us).  Call `release(digest)` when done."""
        if digest not in self._entries:
            return None
        try:
            f = open(self.path(digest), "rb")
        except FileNotFoundError:
            self._forget(digest)
            return None
        self._entries.move_to_end(digest)
        self._readers[digest] = self._readers.get(digest, 0) + 1
        return f

    def release(self, digest: str) -> None:
        count = self._readers.get(digest, 0) - 1
        if count > 0:
            self._readers[digest] = count
        else:
            self._readers.pop(digest, None)
            if digest in self._doomed:
                self._doomed.discard(digest)
                self._unlink(digest)

    def in_use(self, digest: str) -> bool:
        """Being downloaded or read right now."""
        return digest in self._pinned or bool(self._readers.get(digest))

    def digests(self) -> list[str]:
        """Every stored digest, least recently used first."""
        return list(self._entries)

    # --- removing (docxy.cache.inventory) -----------------------------------------------
    def remove(self, digest: str) -> str:
        """Take a blob out of the store: "removed", "absent", or "busy" when it is being
        downloaded now (a fill's blob is entered when it completes; nothing is cut).  A
        blob being read is forgotten now and its file unlinked when its last reader ends."""
        if digest in self._pinned:
            return "busy"
        if digest not in self._entries:
            return "absent"
        if self._readers.get(digest):
            self._doomed.add(digest)
            self._forget(digest)
            return "removed"
        self._unlink(digest)
        return "removed"

    def _unlink(self, digest: str) -> None:
        try:
            self.path(digest).unlink(missing_ok=True)
        except OSError as e:
            log.warn("cannot remove {digest}: {err}", digest=digest, err=e.strerror or str(e))
        self._forget(digest)

    # --- writing ------------------------------------------------------------------------
    def new_partial(self, digest: str) -> tuple[Path, object]:
        """A fresh partial file for a download of `digest`, opened for writing.  Raises
        OSError when none can be made (disk full, permissions)."""
        _, hex_part = _digest_parts(digest)
        try:
            fd, name = tempfile.mkstemp(prefix=hex_part[:16] + ".", dir=self._partial)
        except FileNotFoundError:
            self._recreate()
            fd, name = tempfile.mkstemp(prefix=hex_part[:16] + ".", dir=self._partial)
        self._pinned.add(digest)
        return Path(name), os.fdopen(fd, "wb")

    def _recreate(self) -> None:
        """The cache directory (or part of it) was removed while we run: make it again and
        forget every entry whose file went with it."""
        log.warn("cache directory {root} was removed; recreating it", root=str(self.root))
        self._ensure_dirs()
        for digest in [d for d in self._entries if not self.path(d).exists()]:
            self._forget(digest)

    def commit(self, digest: str, partial: Path, size: int) -> Path:
        """Enter a verified download into the store (atomically) and evict if needed.
        Raises OSError (the partial file is then gone) when it cannot be stored."""
        self._pinned.discard(digest)
        self._doomed.discard(digest)  # a new copy: the old one's readers must not unlink it
        target = self.path(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        if digest not in self._entries:
            self.total += size
        self._entries[digest] = size
        self._entries.move_to_end(digest)
        self.evict()
        return target

    def discard(self, digest: str, partial: Path) -> None:
        self._pinned.discard(digest)
        partial.unlink(missing_ok=True)

    def evict(self) -> None:
        if self.max_size is None or self.total <= self.max_size:
            return
        for digest in list(self._entries):
            if self.total <= self.max_size:
                break
            if self._readers.get(digest) or digest in self._pinned:
                continue
            size = self._entries[digest]
            self.path(digest).unlink(missing_ok=True)
            self._forget(digest)
            self.stats.evictions += 1
            self.stats.evicted_bytes += size
            log.info("evicted {digest} ({size} bytes)", digest=digest, size=size)

    def _forget(self, digest: str) -> None:
        size = self._entries.pop(digest, None)
        if size is not None:
            self.total -= size
