"""Manifest answers through the cache.

A manifest by digest is immutable: once stored (verified), it is served without asking the
upstream for content.  A tag is resolved by a HEAD upstream (free on Hub) with the client's
own credential and Accept, and its manifest is served from the cache when the digest is
known; `--tag-ttl` skips even that HEAD for a while.  When the upstream is unreachable,
answers 5xx or rate-limits (or its token service is down), the last known digest of a tag
is served (stale).  A manifest larger than MAX_MANIFEST is refused and never stored; one
that cannot be written (disk full) is served uncached.
Manifest bytes live in the blob store (one copy per digest, whatever asked for it); their
media type and the tag map live beside it, under `manifests/` and `tags/<upstream>/`.
With `--store`, manifests and tags also go to the bucket, where every node finds them
(a node with an empty disk, or one restarted during an outage).
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from docxy.cache.bucket import Bucket
from docxy.cache.interfaces import IBlobStore
from docxy.files import atomic_write
from docxy.flight import SingleFlight
from docxy.registry.names import Route, is_valid_digest, upstream_name
from docxy.registry.references import references
from docxy.stream.clients import request_gone
from docxy.upstream.bodies import BodyTooLarge, discard, read_small
from docxy.upstream.errors import UpstreamError
from docxy.upstream.proxy import RegistryProxy
from docxy.web.answers import API_VERSION, refuse, relay
from docxy.web.pull import Pull

log = Logger()

MAX_MANIFEST = 4 * 1024 * 1024  # distribution's own limit
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MAX_EXPECTED_TAGS = 10_000  # tags resolved by HEAD whose manifest has not been fetched yet
STALE_STATUSES = frozenset({429, 500, 502, 503, 504})
SHARED_TAG_TTL = 30 * 86400.0  # seconds Redis keeps a tag's entry (stale serving needs old ones)


class TokenServiceDown(UpstreamError):
    def __init__(self) -> None:
        super().__init__(503, "UNAVAILABLE", "the upstream's token service is down: only "
                         "images already in the cache can be pulled now")


def refuse_while_tokens_are_down(proxy: RegistryProxy, response) -> None:
    """A 401 while the token service is down: no client can get a token, so the answer is
    a 503 naming it (a challenge would send the client round in circles)."""
    if response.code == 401 and proxy.auth.token_service_down():
        discard(response)
        raise TokenServiceDown()


class ManifestTooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__(502, "MANIFEST_INVALID", "upstream manifest larger than 4 MiB")


@attrs.frozen
class _Fetched:
    """What a manifest GET gave: the client whose request made it (answered already
    unless there is a body), and the verified manifest."""

    leader: object
    digest: str = ""
    body: bytes | None = None
    media_type: str = ""
    headers: Headers | None = None


@attrs.frozen
class TagEntry:
    digest: str
    media_type: str
    checked: float


def manifest_digest(body: bytes, media_type: str) -> str:
    """The digest a registry names a manifest by: the SHA-256 of its bytes, except for a
    signed schema 1 manifest (distribution 2.x still converts to it for clients that do
    not accept v2), whose digest covers only the payload its signatures sign."""
    if media_type.split(";")[0].strip().lower() == SCHEMA1_SIGNED:
        body = _schema1_payload(body) or body
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _schema1_payload(body: bytes) -> bytes | None:
    """A signed schema 1 manifest without its signatures: the body up to the protected
    header's `formatLength`, then its `formatTail` (docker/libtrust's JWS form)."""
    try:
        protected = json.loads(body)["signatures"][0]["protected"]
        header = json.loads(_b64url(protected))
        length, tail = header["formatLength"], _b64url(header["formatTail"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(length, int) or not 0 <= length <= len(body):
        return None
    return body[:length] + tail


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _read_tag(path: Path) -> TagEntry | None:
    """A tag's file (what it last pointed at), or None if missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return TagEntry(data["digest"], data["media_type"], float(data["checked"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_key(upstream: str) -> str:
    """The directory name under tags/ for an upstream's name (`ghcr.io`, `reg.corp:5000`)."""
    return upstream.replace(":", "_").replace("/", "_") or "upstream"


def accepts(accept_lines: list[bytes], media_type: str) -> bool:
    """Whether a client's Accept lines admit `media_type` (no Accept admits anything)."""
    if not accept_lines:
        return True
    wanted = {
        item.split(b";")[0].strip().decode("latin-1").lower()
        for line in accept_lines
        for item in line.split(b",")
    }
    return "*/*" in wanted or media_type.lower() in wanted


class ManifestCache:
    def __init__(
        self,
        store: IBlobStore,
        reactor,
        tag_ttl: float = 0.0,
        idle_timeout: float = 60.0,
        bucket: Bucket | None = None,
    ) -> None:
        self.store = store
        self._bucket = bucket  # the shared store behind the local disk (--store), or None
        self.shared = None  # docxy.cluster.state.SharedState: tags as every node last saw them
        self.pulls = None  # docxy.cache.usage.PullLog: what was pulled when (cache ls, retention)
        self._reactor = reactor
        self._tag_ttl = tag_ttl
        self._idle_timeout = idle_timeout
        self._types = store.root / "manifests"
        self._tags = store.root / "tags"
        self._types.mkdir(parents=True, exist_ok=True)
        self._tags.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self._fetching = SingleFlight()  # by (upstream, name, reference): GETs running now
        # (upstream, name, digest) -> tags a HEAD resolved to that digest, not stored yet
        self._expected_tags: dict[tuple[str, str, str], set[str]] = {}
        self.referrers = None  # docxy.cache.referrers.ReferrersCache (docxy.service)

    # --- the small files beside the store -----------------------------------------------
    def _type_path(self, digest: str) -> Path:
        return self._types / digest.replace(":", "_")

    def _tag_path(self, upstream: str, name: str, tag: str) -> Path:
        return self._tags / cache_key(upstream) / name / tag

    def media_type(self, digest: str) -> str | None:
        try:
            return self._type_path(digest).read_text().strip() or None
        except OSError:
            return None

    def tag(self, upstream: str, name: str, tag: str) -> TagEntry | None:
        """What `upstream`'s tag `name:tag` last pointed at (names as the upstream has them)."""
        return _read_tag(self._tag_path(upstream, name, tag))

    def _remember_tag(self, upstream: str, name: str, tag: str, digest: str, media_type: str) -> None:
        entry = {"digest": digest, "media_type": media_type, "checked": self._reactor.seconds()}
        if self.shared is not None:
            self.shared.remember("tag", f"{cache_key(upstream)}|{name}|{tag}", entry,
                                 ttl=SHARED_TAG_TTL)
        if self._bucket is not None:
            known = self.tag(upstream, name, tag)
            if known is None or known.digest != digest:
                self._background(self._bucket.put_tag(cache_key(upstream), name, tag, entry))
        try:
            atomic_write(self._tag_path(upstream, name, tag), json.dumps(entry).encode())
        except OSError as e:
            log.warn("cannot remember tag {name}:{tag}: {err}", name=name, tag=tag, err=e.strerror or str(e))

    def _put(self, digest: str, body: bytes, media_type: str, share: bool = True) -> bool:
        """Store a verified manifest (and, `share`, put it in the bucket); False (nothing
        stored) when the disk says no."""
        if share and self._bucket is not None:
            self._background(self._bucket.put_manifest(digest, media_type, body))
        path = None
        try:
            path, f = self.store.new_partial(digest)
            with f:
                f.write(body)
            atomic_write(self._type_path(digest), media_type.encode())
            self.store.commit(digest, path, len(body))
        except OSError as e:
            if path is not None:
                self.store.discard(digest, path)
            log.warn("serving manifest {digest} uncached: {err}", digest=digest, err=e.strerror or str(e))
            return False
        return True

    def _read(self, digest: str) -> bytes | None:
        handle = self.store.acquire(digest)
        if handle is None:
            return None
        try:
            return handle.read()
        finally:
            handle.close()
            self.store.release(digest)

    # --- the bucket behind the local disk -------------------------------------------------
    def _background(self, work) -> None:
        d = defer.ensureDeferred(work)
        d.addErrback(lambda f: log.failure("bucket write failed", f))

    async def _from_bucket(self, digest: str) -> bool:
        """Bring a manifest the local disk lacks from the bucket; True when it is stored
        here now.  Its digest is checked again: the bucket is trusted with nothing."""
        if not is_valid_digest(digest):
            return False
        if self.store.has(digest):
            return True
        if self._bucket is None:
            return False
        found = await self._bucket.get_manifest(digest)
        if found is None:
            return False
        body, media_type = found
        if manifest_digest(body, media_type) != digest:
            log.warn("the bucket's manifest {digest} does not match its digest; ignored",
                     digest=digest)
            return False
        return self._put(digest, body, media_type, share=False)

    async def _known_tag(self, upstream: str, name: str, tag: str) -> TagEntry | None:
        """What the tag points at as far as the cluster knows: this node's own entry, or
        a newer one another node checked (Redis), or, for a tag this node never saw, the
        bucket's; the manifest it names is brought from the bucket if need be."""
        entry = self.tag(upstream, name, tag)
        if self.shared is not None:
            data = await self.shared.lookup("tag", f"{cache_key(upstream)}|{name}|{tag}")
            found = await self._usable_entry(upstream, name, tag, data)
            if found is not None and (entry is None or found.checked > entry.checked):
                return found
        if entry is None:
            return await self._bucket_tag(upstream, name, tag)
        if not self.store.has(entry.digest):
            await self._from_bucket(entry.digest)
        return entry

    async def _bucket_tag(self, upstream: str, name: str, tag: str) -> TagEntry | None:
        """A tag this node has not seen, as another node stored it in the bucket."""
        if self._bucket is None:
            return None
        data = await self._bucket.get_tag(cache_key(upstream), name, tag)
        return await self._usable_entry(upstream, name, tag, data)

    async def _usable_entry(self, upstream: str, name: str, tag: str, data) -> TagEntry | None:
        """A tag entry another node wrote, kept here if its manifest can be had."""
        try:
            entry = TagEntry(data["digest"], data["media_type"], float(data["checked"]))
        except (TypeError, KeyError, ValueError):
            return None
        if not is_valid_digest(entry.digest) or not await self._from_bucket(entry.digest):
            return None
        try:
            atomic_write(self._tag_path(upstream, name, tag), json.dumps(data).encode())
        except OSError:
            pass
        return entry

    # --- after a restart ----------------------------------------------------------------
    def restore_links(self, proxies: dict[str, RegistryProxy]) -> int:
        """Tell each registry's access gate which digests its repositories hold, read back
        from the tags kept and the manifests they name (an index's children, an image's
        config and layers): the upstream served them there, so they may be served there
        again while it cannot be asked.  Returns how many links were restored."""
        by_key = {cache_key(name): proxy for name, proxy in proxies.items()}
        count = 0
        for key, name, _, entry in self.tags():
            proxy = by_key.get(key)
            if proxy is not None:
                count += self._link_tree(proxy, name, entry.digest, depth=2)
        if count:
            log.info("restored {n} cached digests of tagged images", n=count)
        return count

    def _link_tree(self, proxy: RegistryProxy, name: str, digest: str, depth: int) -> int:
        if not self.store.has(digest):
            return 0
        proxy.access.note_link(Route(name, "manifests", digest))
        document = self.document(digest)
        if document is None:
            return 1
        count = 1
        children, blobs = references(document)
        for child in children if depth > 0 else ():
            count += self._link_tree(proxy, name, child, depth - 1)
        for blob in blobs:
            proxy.access.note_link(Route(name, "blobs", blob))
            count += 1
        return count

    # --- answers ------------------------------------------------------------------------
    async def answer(self, pull: Pull) -> None:
        route = pull.route
        if route.is_digest:
            await self._by_digest(pull)
        else:
            await self._by_tag(pull)
        self._count(pull)

    def _count(self, pull: Pull) -> None:
        """A manifest GET answered 200 is a pull of its digest (docxy.cache.usage)."""
        request, proxy, route, _ = pull
        if self.pulls is None or request.method != b"GET" or request.code != 200:
            return
        digest = request.responseHeaders.getRawHeaders(b"docker-content-digest", [b""])[0]
        if digest:
            self.pulls.pulled(cache_key(proxy.name), upstream_name(route.name, proxy.library),
                              digest.decode("latin-1"), warm=getattr(request, "docxy_warm", False))

    # --- removal (docxy.cache.inventory) -------------------------------------------------
    def tags(self):
        """Every tag kept: (registry key, repository, tag, TagEntry)."""
        for upstream_dir in sorted(self._tags.iterdir()) if self._tags.is_dir() else ():
            for tag_file in sorted(upstream_dir.rglob("*")):
                if not tag_file.is_file() or tag_file.name.startswith(".tmp-"):
                    continue
                entry = _read_tag(tag_file)
                if entry is not None:
                    name = tag_file.parent.relative_to(upstream_dir).as_posix()
                    yield upstream_dir.name, name, tag_file.name, entry

    def stored_manifests(self) -> list[str]:
        """The digests of every manifest kept (those with a media type beside the store)."""
        found = []
        for path in self._types.iterdir():
            digest = path.name.replace("_", ":", 1)
            if not path.name.startswith(".tmp-") and self.store.has(digest):
                found.append(digest)
        return found

    def document(self, digest: str):
        """A stored manifest parsed (a dict), or None.  Read without counting as a use:
        listing or restoring does not change what the bound evicts first."""
        path = self.store.local_path(digest)
        try:
            document = json.loads(path.read_bytes()) if path is not None else None
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    @property
    def bucket(self) -> Bucket | None:
        return self._bucket

    async def known_tag(self, key: str, name: str, tag: str) -> TagEntry | None:
        """A tag as the cluster knows it (this node, Redis, the bucket)."""
        return await self._known_tag(key, name, tag)

    def forget_local_tag(self, key: str, name: str, tag: str) -> bool:
        """Remove a tag from this node's disk only; False if it had none."""
        try:
            self._tag_path(key, name, tag).unlink()
        except FileNotFoundError:
            return False
        return True

    async def forget_tag(self, key: str, name: str, tag: str) -> None:
        """Remove a tag here, in Redis and in the bucket."""
        self.forget_local_tag(key, name, tag)
        if self.shared is not None:
            try:
                await self.shared.delete("tag", f"{key}|{name}|{tag}")
            except Exception as e:  # ClusterUnavailable: other nodes keep it until its ttl
                log.warn("could not remove tag {name}:{tag} from Redis: {err}", name=name,
                         tag=tag, err=str(e))
        if self._bucket is not None:
            await self._bucket.delete_tag(key, name, tag)

    async def forget_manifest(self, digest: str, bucket: bool = True) -> str:
        """Remove a manifest here and (`bucket`) from the bucket: "removed", "absent" or
        "busy"."""
        outcome = self.store.remove(digest)
        if outcome != "busy":
            self._type_path(digest).unlink(missing_ok=True)
            if bucket and self._bucket is not None:
                await self._bucket.delete_manifest(digest)
        return outcome

    async def _by_digest(self, pull: Pull) -> None:
        request, proxy, route, realm = pull
        digest = route.reference
        if not self.store.has(digest):
            await self._from_bucket(digest)
        body = self._read(digest) if self.store.has(digest) else None
        media_type = self.media_type(digest) if body is not None else None
        if body is not None and media_type is not None:
            denied = await proxy.access.check_access(route, request.requestHeaders)
            if denied is not None:
                refuse(request, denied, realm)
                return
            self.hits += 1
            self._send(request, digest, media_type, body)
            return
        if request.method == b"HEAD":
            response = await proxy.pull(route, b"HEAD", request.requestHeaders, [])
            relay(request, response, self._reactor, 0, realm)
            return
        await self._fetch(pull)

    async def _by_tag(self, pull: Pull) -> None:
        request, proxy, route, realm = pull
        name = upstream_name(route.name, proxy.library)
        accept = request.requestHeaders.getRawHeaders(b"accept", [])
        entry = await self._known_tag(proxy.name, name, route.reference)
        usable = entry is not None and self.store.has(entry.digest) and accepts(accept, entry.media_type)
        now = self._reactor.seconds()
        if usable and self._tag_ttl > 0 and now - entry.checked < self._tag_ttl:
            denied = await proxy.access.check_access(route, request.requestHeaders)
            if denied is None and self._serve_stored(request, entry.digest, entry.media_type):
                self.hits += 1
                return
        try:
            head = await proxy.pull(route, b"HEAD", request.requestHeaders, [])
        except UpstreamError:
            if usable and proxy.access.was_allowed(route, request.requestHeaders):
                self._serve_stale(request, route, entry, "upstream unreachable")
                return
            raise
        digest = (head.headers.getRawHeaders(b"docker-content-digest", [b""])[0]).decode("latin-1")
        stale_why = f"upstream answered {head.code}" if head.code in STALE_STATUSES else None
        if head.code == 401 and usable and proxy.auth.token_service_down():
            stale_why = "the upstream's token service is down"  # no client can get a token
        if (
            stale_why is not None
            and usable
            and proxy.access.was_allowed(route, request.requestHeaders)
        ):
            discard(head)
            self._serve_stale(request, route, entry, stale_why)
            return
        refuse_while_tokens_are_down(proxy, head)
        if head.code == 200 and digest and not self.store.has(digest):
            await self._from_bucket(digest)
        media_type = self.media_type(digest) if digest and self.store.has(digest) else None
        if request.method == b"HEAD" and (head.code != 200 or media_type is None):
            # Not stored (or refused): the upstream's HEAD is the answer to a HEAD.
            if head.code == 200 and digest:
                self._note_served(proxy, route, request, digest)
                self._expect_tag(proxy.name, name, route.reference, digest)
            relay(request, head, self._reactor, 0, realm)
            return
        if head.code == 401:
            refuse(request, head, realm)  # the challenge, with our realm
            return
        if head.code != 200 or media_type is None:
            # A GET: fetch it (an error is then relayed with the upstream's own body).
            discard(head)
            await self._fetch(pull)
            return
        discard(head)
        self._note_served(proxy, route, request, digest)
        if self._serve_stored(request, digest, media_type):
            self.hits += 1
            self._remember_tag(proxy.name, name, route.reference, digest, media_type)
            return
        await self._fetch(pull)

    async def _fetch(self, pull: Pull) -> None:
        """GET the manifest upstream, verify it, store it, answer it: one GET for every
        client asking for the same reference at once, which no client leaving cancels."""
        request, proxy, route, _ = pull
        key = (proxy.name, route.name, route.reference)
        fetched = await self._fetching.run(
            key, lambda: self._get(pull))
        if fetched.leader is not request:
            # Another client's GET: now stored, it is answered like any cached manifest
            # (after the upstream's yes for this client); if it failed, we ask ourselves.
            await self.answer(pull)
        elif fetched.body is not None:
            self._send(request, fetched.digest, fetched.media_type, fetched.body, fetched.headers)

    async def _get(self, pull: Pull) -> "_Fetched":
        """By digest, the body must have that digest; by tag, it must have the digest the
        GET announces (the HEAD's is only a hint: the tag may have moved in between).
        A body that is not whole is never stored (docxy.upstream.bodies.read_small)."""
        request, proxy, route, realm = pull
        expected = route.reference if route.is_digest else None
        response = await proxy.pull(route, b"GET", request.requestHeaders, [])
        refuse_while_tokens_are_down(proxy, response)
        if response.code != 200:
            relay(request, response, self._reactor, self._idle_timeout, realm)
            return _Fetched(request)
        if isinstance(response.length, int) and response.length > MAX_MANIFEST:
            discard(response)
            raise ManifestTooLarge()
        try:
            body = await read_small(response, MAX_MANIFEST, self._reactor, self._idle_timeout)
        except BodyTooLarge:
            raise ManifestTooLarge() from None
        media_type = (
            response.headers.getRawHeaders(b"content-type", [b"application/octet-stream"])[0]
        ).decode("latin-1")
        digest = manifest_digest(body, media_type)
        announced = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0].decode("latin-1")
        if (expected and expected != digest and expected.startswith("sha256:")) or (
            announced and announced.startswith("sha256:") and announced != digest
        ):
            log.warn(
                "manifest for {name}:{ref} does not match its digest; not cached",
                name=route.name,
                ref=route.reference,
            )
            raise UpstreamError(502, "DIGEST_INVALID", "upstream manifest does not match its digest")
        self.misses += 1
        proxy.access.learn_publicity(self._note_served(proxy, route, request, digest))
        name = upstream_name(route.name, proxy.library)
        if self._put(digest, body, media_type):
            if not route.is_digest:
                self._remember_tag(proxy.name, name, route.reference, digest, media_type)
            self._confirm_tags(proxy.name, name, digest, media_type)
        return _Fetched(request, digest, body, media_type, response.headers)

    # --- tags resolved by HEAD ----------------------------------------------------------
    def _expect_tag(self, upstream: str, name: str, tag: str, digest: str) -> None:
        """A HEAD by tag named `digest`, not stored yet.  dockerd and containerd fetch it
        next by digest and never GET the tag: the tag is remembered once that manifest is
        stored, so that it can be served when the upstream is down."""
        if not is_valid_digest(digest):
            return
        key = (upstream, name, digest)
        tags = self._expected_tags.pop(key, set())
        tags.add(tag)
        if len(self._expected_tags) >= MAX_EXPECTED_TAGS:
            self._expected_tags.pop(next(iter(self._expected_tags)))
        self._expected_tags[key] = tags

    def _confirm_tags(self, upstream: str, name: str, digest: str, media_type: str) -> None:
        for tag in self._expected_tags.pop((upstream, name, digest), ()):
            self._remember_tag(upstream, name, tag, digest, media_type)
            log.info("learned {name}:{tag} -> {digest} from a HEAD", name=name, tag=tag,
                     digest=digest)

    def _note_served(self, proxy: RegistryProxy, route: Route, request, digest: str) -> Route:
        """The upstream just served this client the manifest `digest` for `route`: remember
        the yes and that the repository holds that digest; the digest's route is returned."""
        by_digest = attrs.evolve(route, reference=digest)
        proxy.access.note_allowed(route, request.requestHeaders)
        proxy.access.note_link(by_digest)
        return by_digest

    def _serve_stale(self, request, route: Route, entry: TagEntry, why: str) -> None:
        self.stale += 1
        log.warn(
            "serving {name}:{tag} stale from the cache ({why})",
            name=route.name,
            tag=route.reference,
            why=why,
        )
        if not self._serve_stored(request, entry.digest, entry.media_type):
            raise UpstreamError(503, "UNAVAILABLE", "upstream unavailable")

    def _serve_stored(self, request, digest: str, media_type: str) -> bool:
        body = self._read(digest)
        if body is None:
            return False
        self._send(request, digest, media_type, body)
        return True

    def _send(self, request, digest: str, media_type: str, body: bytes, upstream: Headers | None = None) -> None:
        if request_gone(request):
            return
        request.docxy_source = "cache" if upstream is None else "upstream"  # request log
        request.setResponseCode(200)
        if upstream is not None:
            for name in (b"ratelimit-limit", b"ratelimit-remaining", b"docker-ratelimit-source"):
                values = upstream.getRawHeaders(name)
                if values:
                    request.responseHeaders.setRawHeaders(name, values)
        request.setHeader(b"content-type", media_type.encode("latin-1"))
        request.setHeader(b"docker-content-digest", digest.encode("ascii"))
        request.setHeader(b"etag", b'"' + digest.encode("ascii") + b'"')
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(*API_VERSION)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


