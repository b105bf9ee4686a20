"""When each cached image was last pulled, and how often: what `docxy cache ls` shows and
what retention (`max_age`) measures.

A pull is a client's GET of a manifest, by tag or by digest, counted for the digest it
was answered with under its registry and repository.  A warm-up's GET is not a pull, but
it starts the clock of an image nobody pulled yet.  The counts live in memory and are
written to `<cache-dir>/usage.json` every minute and when docxy stops; a crash loses at
most that minute.  Each node counts its own pulls; in a cluster the last pull of each image
is also kept in Redis, so that retention on every node sees the pulls of all.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from docxy.files import atomic_write

log = Logger()

SAVE_EVERY = 60.0
SHARED_TTL = 400 * 86400.0  # seconds Redis keeps an image's last pull (longer than any max_age)
MAX_RECORDS = 200_000  # (registry, repository, digest) triples kept; the oldest go first


@attrs.define
class Usage:
    pulls: int = 0
    last: float = 0.0  # reactor.seconds() of the last pull (or warm-up); 0: never


class PullLog:
    def __init__(self, path: Path, clock) -> None:
        self._path = Path(path)
        self._clock = clock
        self._records: dict[tuple[str, str, str], Usage] = {}
        self._dirty = False
        self.shared = None  # docxy.cluster.state.SharedState: the cluster's last pulls
        self._load()

    def _load(self) -> None:
        try:
            rows = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warn("ignoring unreadable {path}: {err}", path=str(self._path), err=str(e))
            return
        for row in rows if isinstance(rows, list) else ():
            try:
                key = (str(row["registry"]), str(row["repository"]), str(row["digest"]))
                self._records[key] = Usage(int(row["pulls"]), float(row["last"]))
            except (KeyError, TypeError, ValueError):
                continue

    def pulled(self, registry: str, repository: str, digest: str, warm: bool = False) -> None:
        key = (registry, repository, digest)
        usage = self._records.pop(key, None) or Usage()
        if not warm:
            usage.pulls += 1
        usage.last = self._clock.seconds()
        self._records[key] = usage  # newest last
        if len(self._records) > MAX_RECORDS:
            self._records.pop(next(iter(self._records)))
        self._dirty = True
        if self.shared is not None:
            self.shared.remember("pull", "|".join(key), {"last": usage.last}, ttl=SHARED_TTL)

    async def cluster_last(self, registry: str, repository: str, digest: str) -> float:
        """The last pull of an image on any node (this node's alone without Redis)."""
        own = self._records.get((registry, repository, digest))
        last = own.last if own else 0.0
        if self.shared is not None:
            found = await self.shared.lookup("pull", f"{registry}|{repository}|{digest}")
            try:
                last = max(last, float((found or {}).get("last", 0.0)))
            except (TypeError, ValueError):
                pass
        return last

    def get(self, registry: str, repository: str, digest: str) -> Usage | None:
        return self._records.get((registry, repository, digest))

    def records(self) -> list[tuple[tuple[str, str, str], Usage]]:
        return list(self._records.items())

    def forget(self, digest: str) -> None:
        """Drop a removed image's records, in every repository."""
        for key in [k for k in self._records if k[2] == digest]:
            del self._records[key]
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        rows = [{"registry": r, "repository": n, "digest": d, "pulls": u.pulls, "last": u.last}
                for (r, n, d), u in self._records.items()]
        try:
            atomic_write(self._path, json.dumps(rows).encode())
            self._dirty = False
        except OSError as e:
            log.warn("cannot save {path}: {err}", path=str(self._path), err=e.strerror or str(e))


class PullLogService(service.Service):
    """Writes the pull log every minute and at the stop."""

    def __init__(self, pulls: PullLog, clock) -> None:
        self._pulls = pulls
        self._loop = task.LoopingCall(pulls.save)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(SAVE_EVERY, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._pulls.save()
