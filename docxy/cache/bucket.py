"""The shared store on object storage (`--store s3://bucket/prefix`): the second level
behind each node's local disk.  A blob is uploaded only from the local store, after its
digest was verified, so nothing unverified enters the bucket; what is read back goes
through a verifying download again (docxy.cache.fill), so nothing corrupt is served.

Keys under the prefix: `blobs/<algorithm>/<hex>`, `manifests/<algorithm>/<hex>.json` (the
bytes and their media type) and `tags/<upstream>/<name>/<tag>.json`.  While the service
cannot be reached the bucket counts as empty and `up` says why; it is asked again on the
next request and every few seconds, so it comes back without a restart.
"""
from __future__ import annotations

import base64
import json

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from docxy.s3.errors import S3Error, S3Unreachable

log = Logger()

MAX_SMALL = 8 * 1024 * 1024  # a manifest document (4 MiB) in base64 and JSON
PROBE_EVERY = 5.0  # seconds between looks at a bucket counted as down


class Bucket:
    def __init__(self, client, prefix: str, clock) -> None:
        """`client`: a docxy.s3.client.S3Client for the bucket."""
        self.client = client
        self.prefix = prefix.strip("/")
        self._clock = clock
        self.up = True
        self.why = ""  # why it is counted as down
        self.errors = 0  # requests that failed, for the metrics
        self.uploads = 0
        self.upload_failures = 0
        self.on_up: list = []  # called (no arguments) when the bucket answers again
        self._probe: task.LoopingCall | None = None

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, digest: str) -> str:
        algorithm, _, hex_part = digest.partition(":")
        return self._key("blobs", algorithm, hex_part)

    def manifest_key(self, digest: str) -> str:
        algorithm, _, hex_part = digest.partition(":")
        return self._key("manifests", algorithm, hex_part + ".json")

    def tag_key(self, upstream: str, name: str, tag: str) -> str:
        return self._key("tags", upstream, name, tag + ".json")

    # --- health -------------------------------------------------------------------------
    def failed(self, what: str, error: S3Error) -> None:
        """A request failed: counted; the bucket is down if it did not answer (or 5xx)."""
        self.errors += 1
        if isinstance(error, S3Unreachable) or (error.status or 0) >= 500:
            if self.up:
                log.warn("the bucket is unreachable ({err}): serving from the local disk, "
                         "relaying what it does not hold", err=str(error))
            self.up = False
            self.why = f"{what}: {error}"
        else:
            log.warn("bucket: {what} failed: {err}", what=what, err=str(error))

    def _worked(self) -> None:
        if self.up:
            return
        log.info("the bucket answers again")
        self.up, self.why = True, ""
        for callback in list(self.on_up):
            callback()

    def start(self) -> None:
        """While the bucket is counted as down it is asked every PROBE_EVERY seconds, so
        that it is seen back (and what it missed uploaded) without waiting for a miss."""
        self._probe = task.LoopingCall(self._probe_once)
        self._probe.clock = self._clock
        self._probe.start(PROBE_EVERY, now=False)

    def stop(self) -> None:
        if self._probe is not None and self._probe.running:
            self._probe.stop()

    def _probe_once(self) -> defer.Deferred | None:
        if self.up:
            return None

        async def probe() -> None:
            try:
                await self.client.ensure_bucket()  # made now if it could not be at start
            except S3Error as e:
                self.why = f"probe: {e}"
            else:
                self._worked()

        return defer.ensureDeferred(probe()).addErrback(
            lambda f: log.failure("probing the bucket failed", f))

    # --- blobs --------------------------------------------------------------------------
    async def blob_size(self, digest: str) -> int | None:
        """The size of a blob the bucket holds, or None (not there, or no answer)."""
        try:
            size = await self.client.head(self.blob_key(digest))
        except S3Error as e:
            self.failed(f"HEAD {digest}", e)
            return None
        self._worked()
        return size

    async def open_blob(self, digest: str, start: int = 0) -> IResponse | None:
        """The blob's bytes from `start` (a response, body unread), or None."""
        try:
            response = await self.client.get(self.blob_key(digest), start)
        except S3Error as e:
            if e.status != 404:
                self.failed(f"GET {digest}", e)
            return None
        self._worked()
        return response

    async def upload_blob(self, digest: str, path: str, size: int) -> bool:
        """Put a verified blob from the local disk; a second node putting the same digest
        writes the same bytes, so it is harmless.  False when it could not."""
        key = self.blob_key(digest)
        try:
            if await self.client.head(key) == size:
                return True  # another node was first
            await self.client.put_file(key, path, size, "application/octet-stream")
        except S3Error as e:
            self.upload_failures += 1
            self.failed(f"PUT {digest}", e)
            return False
        self._worked()
        self.uploads += 1
        log.info("stored {digest} in the bucket ({size} bytes)", digest=digest, size=size)
        return True

    async def delete_blob(self, digest: str) -> bool:
        """Remove a blob (the shared bound's sweep, a removal); False when the bucket said no."""
        return await self._delete(self.blob_key(digest), f"DELETE {digest}")

    async def delete_manifest(self, digest: str) -> bool:
        return await self._delete(self.manifest_key(digest), f"DELETE manifest {digest}")

    async def delete_tag(self, upstream: str, name: str, tag: str) -> bool:
        return await self._delete(self.tag_key(upstream, name, tag), f"DELETE tag {name}:{tag}")

    async def _delete(self, key: str, what: str) -> bool:
        try:
            await self.client.delete(key)
        except S3Error as e:
            self.failed(what, e)
            return False
        self._worked()
        return True

    # --- manifests and tags ---------------------------------------------------------------
    async def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        document = {"media_type": media_type, "body": base64.b64encode(body).decode("ascii")}
        await self._put_json(self.manifest_key(digest), document, f"PUT manifest {digest}")

    async def get_manifest(self, digest: str) -> tuple[bytes, str] | None:
        """(bytes, media type), unverified (the caller checks the digest), or None."""
        document = await self._get_json(self.manifest_key(digest), f"GET manifest {digest}")
        try:
            return base64.b64decode(document["body"]), str(document["media_type"])
        except (TypeError, KeyError, ValueError):
            return None

    async def put_tag(self, upstream: str, name: str, tag: str, entry: dict) -> None:
        await self._put_json(self.tag_key(upstream, name, tag), entry, f"PUT tag {name}:{tag}")

    async def get_tag(self, upstream: str, name: str, tag: str) -> dict | None:
        document = await self._get_json(self.tag_key(upstream, name, tag), f"GET tag {name}:{tag}")
        return document if isinstance(document, dict) else None

    async def _put_json(self, key: str, document: dict, what: str) -> None:
        try:
            await self.client.put_bytes(key, json.dumps(document).encode(), "application/json")
        except S3Error as e:
            self.failed(what, e)
        else:
            self._worked()

    async def _get_json(self, key: str, what: str):
        try:
            data = await self.client.get_bytes(key, MAX_SMALL)
        except S3Error as e:
            self.failed(what, e)
            return None
        self._worked()
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warn("bucket: {key} is not JSON; ignoring it", key=key)
            return None
