"""What is cached, and its removal: `docxy cache ls`, `cache rm`, `cache gc` and retention.

The cache is a graph: tags name manifests, an index names manifests, a manifest names its
config and layers.  A blob is kept while any kept manifest names it, so a layer shared by
two images stays until neither is cached (`live`).  Each operation reads every kept
manifest once (`Inventory.documents`) and works on what it read.  A removal never cuts a
download: a blob being downloaded is left (it is entered when it completes), and one
being read is unlinked when its last reader ends (docxy.cache.store.BlobStore.remove).
With `--store`, what `remove` takes goes from the bucket and Redis too, and with
`--cluster` the other nodes are told and remove their own copies (`forget_locally`).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import attrs
from twisted.logger import Logger

from docxy.cache.manifests import ManifestCache, TagEntry, cache_key
from docxy.registry.names import is_valid_digest, is_valid_name, is_valid_tag
from docxy.registry.references import children, described_size, references

log = Logger()

INDEX_DEPTH = 2  # an index of indexes is as deep as registries go


def _result(**given) -> dict:
    """What a removal did, as the admin API answers it."""
    return {"matched": True, "tags": [], "manifests": [], "blobs": [], "busy": [], "kept": [],
            **given}


Documents = dict[str, dict]  # every kept manifest's digest -> its document ({} unreadable)


def tree(documents: Documents, digest: str, depth: int = INDEX_DEPTH) -> tuple[set[str], set[str]]:
    """(manifests, blobs) a manifest and what it names hold, as far as they are kept."""
    manifests, blobs = {digest}, set()
    children, named = references(documents.get(digest) or {})
    blobs.update(named)
    for child in children if depth > 0 else ():
        m, b = tree(documents, child, depth - 1)
        manifests |= m
        blobs |= b
    return manifests, blobs


def live(documents: Documents, excluding: Iterable[str] = ()) -> set[str]:
    """Every digest a kept manifest (other than `excluding`) is or names."""
    skip = set(excluding)
    alive: set[str] = set()
    for digest, document in documents.items():
        if digest in skip:
            continue
        children, blobs = references(document)
        alive.add(digest)
        alive.update(children)
        alive.update(blobs)
    return alive


@attrs.frozen
class Reference:
    """What `cache rm` was given: registry key (None: a bare digest), repository, and a
    tag or a digest."""

    registry: str | None
    repository: str | None
    tag: str | None = None
    digest: str | None = None


class BadReference(ValueError):
    pass


def parse_reference(text: str, registries: dict[str, str], default: str,
                    library: dict[str, bool]) -> Reference:
    """`registry/name:tag`, `registry/name@sha256:...`, `name:tag` (the default registry)
    or a bare `sha256:...`.  `registries` maps every name a registry is known by to its
    key; BadReference says what is wrong.  Pure."""
    text = text.strip()
    if is_valid_digest(text):
        return Reference(None, None, digest=text)
    name, digest, tag = text, None, None
    if "@" in text:
        name, digest = text.split("@", 1)
        if not is_valid_digest(digest):
            raise BadReference(f"{digest!r} is not a digest (sha256:<64 hex>)")
    else:
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            name, tag = text[:colon], text[colon + 1:]
    first, _, rest = name.partition("/")
    if rest and first.lower() in registries:
        key, repository = registries[first.lower()], rest
    elif rest and ("." in first or ":" in first or first == "localhost"):
        raise BadReference(f"docxy does not mirror {first} (it mirrors "
                           f"{', '.join(sorted(set(registries)))})")
    else:
        key, repository = registries[default], name
        if library.get(key) and "/" not in repository:
            repository = "library/" + repository
    if not is_valid_name(repository):
        raise BadReference(f"{name!r} is not a repository name")
    if tag is None and digest is None:
        tag = "latest"
    if tag is not None and not is_valid_tag(tag):
        raise BadReference(f"{tag!r} is not a tag")
    return Reference(key, repository, tag=tag, digest=digest)


@attrs.frozen
class Row:
    registry: str
    repository: str
    tag: str | None
    digest: str
    media_type: str
    size: int  # bytes the image's descriptors name (every platform of an index)
    stored: int  # bytes of it on this node's disk
    pulls: int
    last_pull: float | None
    platforms: tuple[str, ...] = ()


class Inventory:
    def __init__(self, manifests: ManifestCache, registries: dict[str, str],
                 default: str, library: dict[str, bool],
                 names: dict[str, str] | None = None) -> None:
        self.manifests = manifests
        self._names = names or {}  # key -> the registry's name
        self.cluster = None  # docxy.cluster.node.ClusterParts: other nodes told of removals
        self.store = manifests.store
        self._registries = registries  # every name of a registry -> its key
        self._default = default
        self._library = library

    def parse(self, text: str) -> Reference:
        return parse_reference(text, self._registries, self._default, self._library)

    def registry_key(self, name: str) -> str | None:
        """The key of the registry known by `name` (docker.io, index.docker.io), or None."""
        return self._registries.get(name.lower())

    def registry_name(self, key: str) -> str:
        """The registry's own name for its key (what ns= selects it by)."""
        return self._names.get(key, key)

    # --- the graph ------------------------------------------------------------------------
    def documents(self) -> Documents:
        """Every kept manifest, each read once for the operation at hand."""
        return {d: self.manifests.document(d) or {} for d in self.manifests.stored_manifests()}

    # --- what is cached ---------------------------------------------------------------
    def rows(self, registry: str | None = None) -> list[Row]:
        documents = self.documents()
        pulls = self.manifests.pulls
        rows = []
        tagged = set()
        for key, name, tag, entry in self.manifests.tags():
            if registry is not None and key != registry:
                continue
            tagged.add((key, name, entry.digest))
            rows.append(self._row(documents, key, name, tag, entry.digest, entry.media_type))
        # an index's own images are listed under it, not as images pulled by digest
        listed_under = {c for document in documents.values() for c in references(document)[0]}
        for (key, name, digest), usage in pulls.records() if pulls is not None else ():
            if (registry is not None and key != registry) or (key, name, digest) in tagged:
                continue
            if not self.store.has(digest) or digest in listed_under:
                continue
            rows.append(self._row(documents, key, name, None, digest,
                                  self.manifests.media_type(digest) or ""))
        return rows

    def _row(self, documents: Documents, key: str, name: str, tag: str | None, digest: str,
             media_type: str) -> Row:
        size = stored = 0
        platforms = []
        document = documents.get(digest) or {}
        images = [document]
        if document.get("manifests"):
            images = []
            for child in children(document):
                platform = child.get("platform") or {}
                if isinstance(platform, dict) and platform.get("os"):
                    platforms.append("/".join(str(platform[k]) for k in
                                              ("os", "architecture", "variant") if platform.get(k)))
                images.append(documents.get(child["digest"]) or {})
        for image in images:
            size += described_size(image)
            for blob in references(image)[1]:
                stored += self.store.size_of(blob) or 0
        pulls = self.manifests.pulls
        usage = pulls.get(key, name, digest) if pulls is not None else None
        last = max(usage.last if usage else 0.0, 0.0) or None
        return Row(key, name, tag, digest, media_type, size, stored,
                   usage.pulls if usage else 0, last, tuple(platforms))

    # --- removal ----------------------------------------------------------------------
    async def remove(self, ref: Reference) -> dict:
        """Remove what `ref` names: a tag (and its image, if no other tag names it), every
        tag of a repository naming a digest (and the image), or a bare digest everywhere.
        In a cluster the other nodes are told, and remove their own copies.  Returns what
        was done; nothing matched: {"matched": False}."""
        tags = list(self.manifests.tags())
        if ref.digest is None:
            doomed_tags = [(k, n, t, e) for k, n, t, e in tags
                           if (k, n, t) == (ref.registry, ref.repository, ref.tag)]
            if not doomed_tags:
                # A tag this node never served may be known to the cluster (Redis, bucket).
                entry = await self.manifests.known_tag(ref.registry, ref.repository, ref.tag)
                if entry is not None:
                    doomed_tags = [(ref.registry, ref.repository, ref.tag, entry)]
            digests = {e.digest for *_, e in doomed_tags}
        elif ref.registry is None:
            doomed_tags = [x for x in tags if x[3].digest == ref.digest]
            digests = {ref.digest}
        else:
            doomed_tags = [x for x in tags if x[3].digest == ref.digest
                           and (x[0], x[1]) == (ref.registry, ref.repository)]
            digests = {ref.digest}
        known = any(self.store.has(d) for d in digests)
        if not doomed_tags and not known:
            return {"matched": False}
        for key, name, tag, _ in doomed_tags:
            await self.manifests.forget_tag(key, name, tag)
        gone = {(k, n, t) for k, n, t, _ in doomed_tags}
        still_tagged = {e.digest for k, n, t, e in tags if (k, n, t) not in gone}
        result = _result(tags=[f"{k}/{n}:{t}" for k, n, t, _ in doomed_tags])
        documents = self.documents()
        roots, bare = [], []
        for digest in sorted(digests):
            if digest in still_tagged and ref.registry is not None:
                result["kept"].append(digest)  # another tag names this image
                continue
            if self.manifests.media_type(digest) is None and ref.registry is None:
                # A bare digest that is not a manifest: that blob, whatever names it.
                bare.append(digest)
                await self._remove_blob(digest, result, bucket=True)
                continue
            roots.append(digest)
            await self._remove_tree(documents, digest, result, bucket=True)
        await self._tell_peers({"tags": [[k, n, t] for k, n, t, _ in doomed_tags],
                                "roots": roots, "blobs": bare}, result)
        return result

    async def _tell_peers(self, document: dict, result: dict) -> None:
        cluster = self.cluster
        if cluster is None or cluster.members is None or cluster.peers is None:
            return
        from docxy.cluster.peers import PeerUnreachable

        result["nodes"] = {}
        for node in await cluster.members.members():
            if node == cluster.node_url:
                continue
            try:
                status = await cluster.peers.forget(node, document)
            except PeerUnreachable:
                status = None
            result["nodes"][node] = "removed" if status == 200 else (
                f"answered {status}" if status else "unreachable: its disk keeps its copies")

    async def forget_locally(self, document: dict) -> dict:
        """What another node's `cache rm` removed, removed here: its tags, the images it
        named (keeping what this node's other manifests name) and its bare blobs."""
        result = _result()
        documents = self.documents()
        for item in document.get("tags") or ():
            if not (isinstance(item, list) and len(item) == 3 and all(
                    isinstance(x, str) for x in item)):
                continue
            key, name, tag = item
            if key != cache_key(key) or key in ("", ".", "..") or not is_valid_name(name) \
                    or not is_valid_tag(tag):
                continue
            if self.manifests.forget_local_tag(key, name, tag):
                result["tags"].append(f"{key}/{name}:{tag}")
        for digest in document.get("roots") or ():
            if isinstance(digest, str) and is_valid_digest(digest) and self.store.has(digest):
                await self._remove_tree(documents, digest, result, bucket=False)
        for digest in document.get("blobs") or ():
            if isinstance(digest, str) and is_valid_digest(digest):
                await self._remove_blob(digest, result, bucket=False)
        return result

    async def _remove_tree(self, documents: Documents, digest: str, result: dict,
                           bucket: bool) -> None:
        """Remove an image: its manifests and the blobs no other kept manifest names.
        `documents` is kept up to date for the next removal of the same operation."""
        manifests, blobs = tree(documents, digest)
        alive = live(documents, excluding=manifests)
        for m in sorted(manifests - alive):
            outcome = await self.manifests.forget_manifest(m, bucket=bucket)
            self._note(result, "manifests", m, outcome)
            if outcome != "busy":
                documents.pop(m, None)
            if self.manifests.pulls is not None:
                self.manifests.pulls.forget(m)
        for b in sorted(blobs - alive):
            await self._remove_blob(b, result, bucket=bucket)

    async def _remove_blob(self, digest: str, result: dict, bucket: bool) -> None:
        """Off this node's disk and, `bucket`, out of the shared store."""
        outcome = self.store.remove(digest)
        self._note(result, "blobs", digest, outcome)
        shared = self.manifests.bucket
        if bucket and outcome != "busy" and shared is not None:
            await shared.delete_blob(digest)

    @staticmethod
    def _note(result: dict, what: str, digest: str, outcome: str) -> None:
        if outcome == "removed":
            result[what].append(digest)
        elif outcome == "busy":
            result["busy"].append(digest)

    async def gc(self) -> dict:
        """Remove every blob of this node's disk no kept manifest names (never one being
        downloaded)."""
        alive = live(self.documents())  # every kept manifest is alive itself
        result = _result()
        for digest in self.store.digests():
            if digest in alive:
                continue
            # This node's disk only: the bucket may hold manifests this node never saw.
            await self._remove_blob(digest, result, bucket=False)
        return result

    # --- retention ----------------------------------------------------------------------
    async def expire(self, key: str, max_age: float, keep: tuple[str, ...], now: float) -> dict:
        """Retention for one registry: tags (and untagged images) not pulled for `max_age`
        seconds, outside the `keep` patterns, go with the blobs nothing else names."""
        result = _result()
        documents = self.documents()
        pulls = self.manifests.pulls
        tags = [x for x in self.manifests.tags() if x[0] == key]
        doomed: list[tuple[str, str, str, TagEntry]] = []
        for k, name, tag, entry in tags:
            if any(fnmatch.fnmatchcase(name, p) for p in keep):
                continue
            last = await self._last_use(k, name, tag, entry)
            if now - last <= max_age:
                continue
            if self._in_use(documents, entry.digest):
                result["busy"].append(entry.digest)  # a pull of it runs: not now
                continue
            doomed.append((k, name, tag, entry))
        for k, name, tag, _ in doomed:
            await self.manifests.forget_tag(k, name, tag)
            result["tags"].append(f"{k}/{name}:{tag}")
        remaining = {e.digest for *_, e in self.manifests.tags()}
        candidates = {e.digest for *_, e in doomed} - remaining
        for (k, name, digest), usage in pulls.records() if pulls is not None else ():
            if k == key and digest not in remaining and now - usage.last > max_age and \
                    not any(fnmatch.fnmatchcase(name, p) for p in keep) and \
                    now - await pulls.cluster_last(k, name, digest) > max_age:
                candidates.add(digest)  # pulled by digest only, long ago
        recent = {d for (_, _, d), u in (pulls.records() if pulls else ())
                  if now - u.last <= max_age}
        for digest in sorted(candidates - recent):
            if self.store.has(digest) and not self._in_use(documents, digest):
                await self._remove_tree(documents, digest, result, bucket=True)
        return result

    async def _last_use(self, key: str, name: str, tag: str, entry: TagEntry) -> float:
        """When the tag was last asked for (a pull or a HEAD), on any node of a cluster."""
        pulls, shared = self.manifests.pulls, self.manifests.shared
        last = entry.checked
        if pulls is not None:
            last = max(last, await pulls.cluster_last(key, name, entry.digest))
        if shared is not None:
            found = await shared.lookup("tag", f"{key}|{name}|{tag}")
            try:
                if found and found.get("digest") == entry.digest:
                    last = max(last, float(found.get("checked", 0.0)))
            except (TypeError, ValueError):
                pass
        return last

    def _in_use(self, documents: Documents, digest: str) -> bool:
        """Whether any blob or manifest of this image is being downloaded or read."""
        manifests, blobs = tree(documents, digest)
        return any(self.store.in_use(d) for d in manifests | blobs)
