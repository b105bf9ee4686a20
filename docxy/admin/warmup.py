"""Warm-up: put an image into the cache before anyone pulls it (`docxy warm REF`).

A warm-up pulls like a client, through docxy's own API on a private UNIX socket (see
`docxy.admin.local`): the manifest by tag, every platform's manifest (or those asked for),
then each blob not stored yet, read and dropped.  So it takes exactly the path a pull
takes (single flight, verification, the bucket and the cluster's one download, the
bandwidth cap), and a client pulling the same image at the same time shares its
downloads.  A tag whose image is cached costs one HEAD upstream (free on Hub).

Progress goes to `emit` as events (dicts), which the admin API streams as JSON lines.
"""
from __future__ import annotations

import json
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone

from docxy.cache.inventory import Reference
from docxy.cache.manifests import MAX_MANIFEST
from docxy.registry.headers import MANIFEST_ACCEPT
from docxy.registry.references import children, descriptors
from docxy.upstream.bodies import read_small
from docxy.upstream.errors import UpstreamError

log = Logger()

PARALLEL_BLOBS = 3  # as dockerd's max-concurrent-downloads
PROGRESS_EVERY = 0.25  # seconds between progress events of one blob
MAX_ERROR = 64 * 1024  # an error answer's body, read for its message


class WarmError(Exception):
    """A warm-up that cannot go on; the message says why, for the operator."""


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"a platform is os/arch[/variant] (linux/arm64), not {text!r}")
        return cls(*parts)

    def matches(self, described: dict) -> bool:
        if not isinstance(described, dict):
            return False
        if (described.get("os"), described.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or described.get("variant") == self.variant


def choose(index: dict, platforms: tuple[Platform, ...]) -> list[dict]:
    """The children of an index to warm: all of them, or those matching a platform."""
    entries = children(index)
    if not platforms:
        return entries
    return [c for c in entries if any(p.matches(c.get("platform") or {}) for p in platforms)]


class _Counting(Protocol):
    """Reads a body, keeping only its length; `done` fires when it ends (an error if it
    was cut)."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._on_bytes = on_bytes
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self._on_bytes(len(data))

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.received)
        else:
            self.done.errback(reason)


async def _read(response, limit: int, what: str) -> bytes:
    """A whole small body (docxy.upstream.bodies.read_small); a cut one is a WarmError."""
    try:
        return await read_small(response, limit)
    except UpstreamError as e:
        raise WarmError(f"{what}: {e.message}") from None


def _why(code: int, body: bytes) -> str:
    """The registry error a non-200 answer carries, in one line."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, AttributeError, TypeError):
        text = ""
    return f"docxy answered {code}" + (f" ({text})" if text else "")


@attrs.define
class Job:
    """One warm-up, as the status page shows it."""

    ref: str
    started: float
    layers: int = 0
    layers_done: int = 0
    total: int = 0
    done: int = 0
    state: str = "running"  # running, done, failed
    error: str | None = None


class WarmUp:
    def __init__(self, reactor, mirror, blob_stored: Callable[[str], bool]) -> None:
        self._reactor = reactor
        self._mirror = mirror  # docxy.admin.local.LocalMirror
        self._stored = blob_stored
        self.jobs: list[Job] = []  # the newest last; a few kept for the status page

    async def warm(self, ref: Reference, registry: str, text: str,
                   platforms: tuple[Platform, ...] = (),
                   emit: Callable[[dict], None] = lambda event: None) -> dict:
        """Warm `ref` of `registry` (its name as docxy's --registry knows it).  Raises
        WarmError; `emit` gets every step."""
        job = Job(text, self._reactor.seconds())
        self.jobs = [j for j in self.jobs[-19:]] + [job]
        try:
            summary = await self._warm(ref, registry, platforms, emit, job)
        except WarmError as e:
            job.state, job.error = "failed", str(e)
            raise
        except Exception as e:
            job.state, job.error = "failed", str(e) or type(e).__name__
            log.failure("warm-up of {ref} failed", ref=text)
            raise WarmError(f"warm-up failed: {job.error}") from None
        job.state = "done"
        return summary

    async def _warm(self, ref: Reference, registry: str, platforms: tuple[Platform, ...],
                    emit, job: Job) -> dict:
        name = ref.repository
        reference = ref.digest or ref.tag
        top, media_type, digest = await self._manifest(registry, name, reference)
        emit({"event": "manifest", "digest": digest, "media_type": media_type})
        images = [(digest, top)]
        if top.get("manifests"):
            chosen = choose(top, platforms)
            if not chosen:
                offered = sorted({"/".join(str(c.get("platform", {}).get(k))
                                           for k in ("os", "architecture"))
                                  for c in top["manifests"] if isinstance(c, dict)})
                raise WarmError(f"{name}:{reference} has no manifest for "
                                f"{', '.join(p.os + '/' + p.architecture for p in platforms)} "
                                f"(it has {', '.join(offered)})")
            images = []
            for child in chosen:
                document, child_type, child_digest = await self._manifest(
                    registry, name, child["digest"])
                emit({"event": "manifest", "digest": child_digest, "media_type": child_type,
                      "platform": child.get("platform")})
                images.append((child_digest, document))
        blobs: dict[str, int] = {}
        for _, document in images:
            for blob, size in descriptors(document):
                blobs.setdefault(blob, size)
        job.layers, job.total = len(blobs), sum(blobs.values())
        emit({"event": "blobs", "count": len(blobs), "bytes": job.total})
        fetched = {"bytes": 0, "blobs": 0, "cached": 0}
        queue = list(blobs.items())

        async def worker() -> None:
            while queue:
                blob, size = queue.pop(0)
                await self._blob(registry, name, blob, size, emit, job, fetched)

        workers = [defer.ensureDeferred(worker())
                   for _ in range(min(PARALLEL_BLOBS, len(queue)) or 1)]
        try:
            await defer.gatherResults(workers, consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()
        manifests = len(images) + (1 if top.get("manifests") else 0)
        summary = {"event": "done", "digest": digest, "manifests": manifests, "blobs": len(blobs),
            "bytes": job.total, "downloaded": fetched["bytes"],
            "already_cached": fetched["cached"]}
        emit(summary)
        return summary

    async def _manifest(self, registry: str, name: str, reference: str) -> tuple[dict, str, str]:
        response = await self._mirror.get(registry, f"/v2/{name}/manifests/{reference}",
                                          {b"accept": [MANIFEST_ACCEPT]})
        body = await _read(response, MAX_MANIFEST, f"{name}:{reference}")
        if response.code != 200:
            raise WarmError(f"{name}:{reference}: {_why(response.code, body)}")
        try:
            document = json.loads(body)
        except ValueError:
            raise WarmError(f"{name}:{reference}: the manifest is not JSON") from None
        if not isinstance(document, dict):
            raise WarmError(f"{name}:{reference}: the manifest is not a JSON object")
        media_type = response.headers.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
        digest = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0]
        return document, media_type, digest.decode("latin-1")

    async def _blob(self, registry: str, name: str, digest: str, size: int, emit, job: Job,
                    fetched: dict) -> None:
        short = digest.split(":")[-1][:12]
        if self._stored(digest):
            fetched["cached"] += 1
            job.layers_done += 1
            job.done += size
            emit({"event": "blob", "digest": digest, "id": short, "size": size,
                  "status": "Already exists"})
            return
        emit({"event": "blob", "digest": digest, "id": short, "size": size,
              "status": "Downloading", "done": 0})
        last = [0.0]
        seen = [0]

        def progress(n: int) -> None:
            seen[0] += n
            job.done += n
            now = self._reactor.seconds()
            if now - last[0] >= PROGRESS_EVERY:
                last[0] = now
                emit({"event": "blob", "digest": digest, "id": short, "size": size,
                      "status": "Downloading", "done": seen[0]})

        response = await self._mirror.get(registry, f"/v2/{name}/blobs/{digest}", {})
        if response.code != 200:
            body = await _read(response, MAX_ERROR, f"blob {digest}")
            raise WarmError(f"blob {digest}: {_why(response.code, body)}")
        reader = _Counting(progress)
        response.deliverBody(reader)
        try:
            got = await reader.done
        except Exception as e:
            raise WarmError(f"blob {digest} was cut after {seen[0]} bytes: "
                            f"{getattr(e, 'reasons', None) or e}") from None
        if size and got != size:
            raise WarmError(f"blob {digest}: {got} bytes, the manifest says {size}")
        fetched["bytes"] += got
        fetched["blobs"] += 1
        job.layers_done += 1
        emit({"event": "blob", "digest": digest, "id": short, "size": size,
              "status": "Pull complete", "done": got})
