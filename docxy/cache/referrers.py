"""Referrers indexes (the OCI 1.1 referrers API, `/v2/<name>/referrers/<digest>`) through
the cache: what cosign and notation ask to find an image's signatures.

Every request asks the upstream with the client's own credential and `artifactType`; a
200 index is answered and kept per (registry, repository, subject digest), and per
artifactType when the upstream applied the filter, in a directory beside the manifests
bounded in bytes (least recently used out first).  When the upstream is unreachable,
answers 5xx or 429, or its token service is down, the kept index is served stale to a
client the upstream said yes to for that repository; an unfiltered one is filtered here
when a filter was asked for (`OCI-Filters-Applied` then says so).  Anything else the
upstream answers is relayed: a 404 from a registry without the API sends clients to the
referrers tag schema (`sha256-<hex>` tags), which are served as every tag is; that 404 is
kept too, and answered again during an outage, so that clients still go there.  The
signature manifests and blobs themselves are fetched by digest like any other.
Kept on this node's disk only (not in the bucket of a cluster).
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import attrs
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from docxy.cache.manifests import (
    MAX_MANIFEST,
    STALE_STATUSES,
    cache_key,
    refuse_while_tokens_are_down,
)
from docxy.files import atomic_write
from docxy.registry.names import Route, upstream_name
from docxy.registry.referrers import (
    ARTIFACT_TYPE,
    FILTERS_APPLIED,
    INDEX_MEDIA_TYPE,
    InvalidIndex,
    filter_index,
    filters_applied,
    is_index_type,
    parse_index,
    render_index,
)
from docxy.stream.clients import request_gone
from docxy.upstream.bodies import BodyTooLarge, discard, read_small
from docxy.upstream.errors import UpstreamError
from docxy.web.answers import API_VERSION, relay, send_error
from docxy.web.pull import Pull

log = Logger()

MAX_INDEX = MAX_MANIFEST  # a referrers index is a manifest: the same 4 MiB bound
DEFAULT_MAX_TOTAL = 64 * 1024 * 1024  # bytes of indexes kept (most are a few KiB)
_ALL = "all.json"  # the unfiltered index; a filtered one is named by its artifactType's hash
_RELAYED = (b"ratelimit-limit", b"ratelimit-remaining", b"docker-ratelimit-source")


class IndexTooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__(502, "MANIFEST_INVALID", "upstream referrers index larger than 4 MiB")


@attrs.frozen
class Kept:
    """A referrers answer as the upstream last gave it: an index, or a 404 (a registry
    without the API, whose clients go on to the tag schema: so they do during an outage)."""

    body: bytes
    filtered: bool  # the upstream applied the artifactType filter
    checked: float
    status: int = 200


def _repository(route: Route) -> Route:
    """The repository a referrers request reads, as the access gate names one: an index
    belongs to its repository whatever its subject (which need not exist), so no digest
    link is claimed or needed."""
    return Route(route.name, "manifests", "referrers")


class ReferrersCache:
    def __init__(self, root: Path, reactor, idle_timeout: float = 60.0,
                 max_total: int = DEFAULT_MAX_TOTAL) -> None:
        self._root = root
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._max_total = max_total
        self._sizes: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        self.total = 0  # bytes kept
        self.stale = 0  # answers served stale
        self._root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # --- the files ------------------------------------------------------------------------
    def _scan(self) -> None:
        """Take the indexes kept before a restart, oldest first, into the bound."""
        found = []
        for path in self._root.rglob("*.json"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file() and not path.name.startswith(".tmp-"):
                found.append((stat.st_mtime, path, stat.st_size))
        for _, path, size in sorted(found):
            self._sizes[path] = size
            self.total += size
        self._evict()

    def path(self, registry: str, name: str, subject: str, artifact_type: str | None) -> Path:
        """Where the index of `subject` in `registry`'s repository `name` (names as the
        upstream has them) is kept, filtered by `artifact_type` or not."""
        leaf = _ALL if artifact_type is None else (
            "type-" + hashlib.sha256(artifact_type.encode()).hexdigest()[:32] + ".json")
        return self._root / cache_key(registry) / name / subject.replace(":", "_") / leaf

    def kept(self, registry: str, name: str, subject: str, artifact_type: str | None) -> Kept | None:
        path = self.path(registry, name, subject, artifact_type)
        try:
            data = json.loads(path.read_bytes())
            kept = Kept(data["index"].encode(), bool(data["filtered"]), float(data["checked"]),
                        int(data["status"]))
            if kept.status == 200:
                parse_index(kept.body)  # checked before it was kept; a damaged file is not
            elif kept.status != 404:
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if path in self._sizes:
            self._sizes.move_to_end(path)
        return kept

    def _keep(self, path: Path, body: bytes, filtered: bool, status: int = 200) -> None:
        try:
            text = body.decode()  # JSON may come in UTF-16 or 32 too: such a one is not kept
        except UnicodeDecodeError:
            return
        entry = {"status": status, "index": text, "filtered": filtered,
                 "checked": self._reactor.seconds()}
        data = json.dumps(entry).encode()
        try:
            atomic_write(path, data)
        except OSError as e:
            log.warn("cannot keep a referrers index: {err}", err=e.strerror or str(e))
            return
        self.total += len(data) - self._sizes.pop(path, 0)
        self._sizes[path] = len(data)
        self._evict()

    def _evict(self) -> None:
        while self.total > self._max_total and self._sizes:
            self._drop(next(iter(self._sizes)))

    def _drop(self, path: Path) -> None:
        self.total -= self._sizes.pop(path, 0)
        path.unlink(missing_ok=True)

    def _keep_absent(self, path: Path) -> None:
        """The upstream answered 404 for a subject: that answer replaces every index of it
        kept (filtered ones included)."""
        for filtered in path.parent.glob("type-*.json") if path.parent.is_dir() else ():
            self._drop(filtered)
        self._keep(path, b"", False, status=404)

    # --- answers --------------------------------------------------------------------------
    async def answer(self, pull: Pull, artifact_type: str | None) -> None:
        """Answer a referrers request (GET or HEAD) for the subject `pull.route` names."""
        request, proxy, route, realm = pull
        query = [(ARTIFACT_TYPE, artifact_type)] if artifact_type else []
        try:
            response = await proxy.pull(route, b"GET", request.requestHeaders, query)
        except UpstreamError:
            if self._serve_stale(pull, artifact_type, "upstream unreachable"):
                return
            raise
        stale_why = f"upstream answered {response.code}" if response.code in STALE_STATUSES else None
        if response.code == 401 and proxy.auth.token_service_down():
            stale_why = "the upstream's token service is down"
        if stale_why is not None and self._serve_stale(pull, artifact_type, stale_why):
            discard(response)
            return
        refuse_while_tokens_are_down(proxy, response)
        name = upstream_name(route.name, proxy.library)
        if response.code == 404:
            self._keep_absent(self.path(proxy.name, name, route.reference, None))
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        too_long = isinstance(response.length, int) and response.length > MAX_INDEX
        if response.code != 200 or not is_index_type(content_type) or too_long:
            # Refusals (a challenge, with docxy's realm), a 404 from a registry without the
            # API (clients then use the tag schema), and what is not an index: relayed.
            relay(request, response, self._reactor, self._idle_timeout, realm)
            return
        try:
            body = await read_small(response, MAX_INDEX, self._reactor, self._idle_timeout)
        except BodyTooLarge:
            raise IndexTooLarge() from None
        try:
            parse_index(body)
        except InvalidIndex as e:
            log.warn("upstream referrers answer for {name}@{digest} is not an index ({why}); "
                     "not kept", name=route.name, digest=route.reference, why=str(e))
            raise UpstreamError(502, "MANIFEST_INVALID",
                                "upstream referrers answer is not an image index") from None
        filtered = artifact_type is not None and ARTIFACT_TYPE in filters_applied(
            response.headers.getRawHeaders(FILTERS_APPLIED, []))
        proxy.access.note_allowed(_repository(route), request.requestHeaders)
        # A paginated answer (Link) is relayed, not kept: its next page would be missing.
        if not response.headers.hasHeader(b"link"):
            # An upstream that ignored the filter answered the whole index: kept as such.
            kept_as = artifact_type if filtered else None
            self._keep(self.path(proxy.name, name, route.reference, kept_as), body, filtered)
        self._send(request, body, filtered, response.headers)

    def _serve_stale(self, pull: Pull, artifact_type: str | None, why: str) -> bool:
        """Answer with the kept answer, if there is one this client may be given: the index
        the upstream filtered by this artifactType, else the whole one (filtered here), or
        the upstream's 404 (no referrers API there: the client goes to the tag schema)."""
        request, proxy, route, _ = pull
        if not proxy.access.was_allowed(_repository(route), request.requestHeaders):
            return False
        name = upstream_name(route.name, proxy.library)
        kept = self.kept(proxy.name, name, route.reference, artifact_type) if artifact_type else None
        if kept is None:
            kept = self.kept(proxy.name, name, route.reference, None)
            if kept is None:
                return False
            if artifact_type and kept.status == 200:
                kept = attrs.evolve(kept, filtered=True, body=render_index(
                    filter_index(parse_index(kept.body), artifact_type)))
        self.stale += 1
        log.warn("serving the referrers of {name}@{digest} stale from the cache ({why})",
                 name=route.name, digest=route.reference, why=why)
        if kept.status == 404:
            request.docxy_source = "cache"
            send_error(request, 404, "NAME_UNKNOWN", "the upstream answered 404 for these "
                       "referrers when it was last asked (it cannot be asked now)")
        else:
            self._send(request, kept.body, kept.filtered, None)
        return True

    def _send(self, request, body: bytes, filtered: bool, upstream: Headers | None) -> None:
        if request_gone(request):
            return
        request.docxy_source = "cache" if upstream is None else "upstream"  # request log
        request.setResponseCode(200)
        content_type = INDEX_MEDIA_TYPE.encode()
        if upstream is not None:
            content_type = upstream.getRawHeaders(b"content-type", [content_type])[0]
            for header in _RELAYED + (b"link",):
                values = upstream.getRawHeaders(header)
                if values:
                    request.responseHeaders.setRawHeaders(header, values)
        request.setHeader(b"content-type", content_type)
        if filtered:
            request.setHeader(FILTERS_APPLIED, ARTIFACT_TYPE.encode())
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(*API_VERSION)
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
