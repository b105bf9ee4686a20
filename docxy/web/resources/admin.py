"""The admin API on `--admin-listen` (what the `docxy` command talks to), JSON in and out:

    GET  /api/v1/cache[?registry=R]   what is cached (docxy.cache.inventory)
    POST /api/v1/cache/rm   {"ref": REF}          remove a tag, an image or a digest
    POST /api/v1/cache/gc                          remove blobs no manifest names
    POST /api/v1/warm  {"ref": REF, "platforms": [...]}   warm up; JSON lines of progress
    GET  /api/v1/status                            what the status page shows

Errors are `{"error": "..."}` with 400 (bad input), 404 (nothing matched), 401 (the
`--admin-htpasswd` user's password is wanted) or 503 (no cache).  The resources parse,
delegate and answer; the work is in docxy.cache.inventory and docxy.admin.
"""
from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from docxy.admin.warmup import Platform, WarmError
from docxy.cache.inventory import BadReference
from docxy.registry.headers import basic_credentials
from docxy.stream.clients import request_gone
from docxy.web.answers import send_json
from docxy.web.resources._base import query_pairs

log = Logger()

MAX_BODY = 64 * 1024


def _json_body(request) -> dict:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise BadReference("the request body is larger than 64 KiB")
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        raise BadReference("the request body is not JSON") from None
    if not isinstance(document, dict):
        raise BadReference("the request body must be a JSON object")
    return document


@attrs.frozen
class Admin:
    """What the admin API works with (built by docxy.service)."""

    context: Any  # docxy.web.resources._base.Context
    inventory: Any  # docxy.cache.inventory.Inventory, None without the cache
    warmup: Any  # docxy.admin.warmup.WarmUp, None without the cache
    users: Any = None  # docxy.admission.users.Htpasswd of --admin-htpasswd
    status: Any = None  # callable() -> dict for /api/v1/status


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, admin: Admin) -> None:
        super().__init__()
        self.admin = admin

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"do_{method}", None)
        if handler is None:
            request.setHeader(b"allow", b", ".join(
                m[3:].encode() for m in dir(self) if m.startswith("do_")))
            send_json(request, 405, {"error": f"method {method} not allowed here"})
            return NOT_DONE_YET
        d = defer.ensureDeferred(self._guarded(request, handler))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _guarded(self, request, handler) -> None:
        if self.admin.users is not None:
            credentials = basic_credentials(request.getHeader(b"authorization"))
            if credentials is None or not await self.admin.users.verify(*credentials):
                request.setHeader(b"www-authenticate", b'Basic realm="docxy admin"')
                send_json(request, 401, {"error": "the admin API needs a user of --admin-htpasswd"})
                return
        if self.admin.inventory is None and self.needs_cache:
            send_json(request, 503, {"error": "the cache is off (--no-cache): nothing to manage"})
            return
        await handler(request)

    needs_cache = True

    def _failed(self, failure, request) -> None:
        if failure.check(BadReference):
            send_json(request, 400, {"error": str(failure.value)})
        elif failure.check(defer.CancelledError):
            return
        else:
            log.failure("admin request {uri} failed", failure, uri=request.uri)
            send_json(request, 500, {"error": "internal error (see docxy's log)"})


class CacheList(AdminResource):
    async def do_GET(self, request) -> None:
        registry = next((v for k, v in query_pairs(request) if k == "registry"), None)
        key = None
        if registry:
            key = self.admin.inventory.registry_key(registry)
            if key is None:
                raise BadReference(f"docxy does not mirror {registry!r}")
        rows = self.admin.inventory.rows(key)
        send_json(request, 200, {"images": [attrs.asdict(r) for r in rows]})


class CacheRemove(AdminResource):
    async def do_POST(self, request) -> None:
        text = _json_body(request).get("ref")
        if not isinstance(text, str) or not text:
            raise BadReference('give {"ref": "registry/name:tag"} (or name@digest, or a digest)')
        ref = self.admin.inventory.parse(text)
        result = await self.admin.inventory.remove(ref)
        if not result["matched"]:
            send_json(request, 404, {"error": f"nothing cached matches {text}"})
            return
        log.info("cache rm {ref}: {tags} tag(s), {m} manifest(s), {b} blob(s) removed",
                 ref=text, tags=len(result["tags"]), m=len(result["manifests"]),
                 b=len(result["blobs"]))
        send_json(request, 200, result)


class CacheGC(AdminResource):
    async def do_POST(self, request) -> None:
        result = await self.admin.inventory.gc()
        log.info("cache gc: {b} blob(s) removed", b=len(result["blobs"]))
        send_json(request, 200, result)


class Warm(AdminResource):
    """Streams the warm-up's events as JSON lines; the last is {"event": "done", ...} or
    {"event": "error", "error": ...}.  A client that leaves does not stop the warm-up."""

    async def do_POST(self, request) -> None:
        document = _json_body(request)
        text = document.get("ref")
        if not isinstance(text, str) or not text:
            raise BadReference('give {"ref": "registry/name:tag"}')
        platforms = document.get("platforms") or []
        if not isinstance(platforms, list):
            raise BadReference("platforms is a list like [\"linux/arm64\"]")
        try:
            chosen = tuple(Platform.parse(str(p)) for p in platforms)
        except ValueError as e:
            raise BadReference(str(e)) from None
        inventory = self.admin.inventory
        ref = inventory.parse(text)
        if ref.registry is None:
            raise BadReference("warm needs an image (registry/name:tag), not a bare digest")
        registry = inventory.registry_name(ref.registry)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"cache-control", b"no-store")

        def emit(event: dict) -> None:
            if not request_gone(request):
                request.write(json.dumps(event).encode() + b"\n")

        emit({"event": "start", "ref": text, "registry": registry,
              "repository": ref.repository, "reference": ref.digest or ref.tag})
        try:
            await self.admin.warmup.warm(ref, registry, text, chosen, emit)
        except WarmError as e:
            emit({"event": "error", "error": str(e)})
            log.warn("warm-up of {ref} failed: {err}", ref=text, err=str(e))
        else:
            log.info("warmed {ref}", ref=text)
        if not request_gone(request):
            request.finish()


class Status(AdminResource):
    """The status page's document (docxy.ops.status); `admin.status` may return it or an
    awaitable of it."""

    needs_cache = False

    async def do_GET(self, request) -> None:
        status = self.admin.status
        send_json(request, 200, await defer.maybeDeferred(status) if status is not None else {})
