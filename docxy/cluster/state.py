"""Small shared state of the cluster: JSON objects under `<prefix>state:<namespace>:<key>`
in Redis, with an optional TTL.  No locking or merging here; ClusterUnavailable reaches
the caller, who picks the degraded behaviour."""
from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger

from docxy.cluster.link import ClusterUnavailable, RedisLink

log = Logger()


class SharedState:
    def __init__(self, link: RedisLink, prefix: str = "docxy:") -> None:
        self._link = link
        self.prefix = prefix

    def key(self, namespace: str, key: str) -> str:
        return f"{self.prefix}state:{namespace}:{key}"

    async def get(self, namespace: str, key: str) -> dict | None:
        """The object stored, None if there is none (or it expired, or is not JSON)."""
        text = await self._link.call("GET", self.key(namespace, key))
        if text is None:
            return None
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            log.warn("{key} in Redis is not JSON; ignored", key=self.key(namespace, key))
            return None
        return value if isinstance(value, dict) else None

    async def put(self, namespace: str, key: str, value: dict, ttl: float | None = None) -> None:
        """Store `value` (replacing what was there), expiring after `ttl` seconds if given."""
        if not isinstance(value, dict):
            raise TypeError(f"shared state values are dicts, not {type(value).__name__}")
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        args: list[object] = [self.key(namespace, key), text]
        if ttl is not None:
            if ttl <= 0:
                raise ValueError(f"a ttl is positive, not {ttl!r}")
            args += ["PX", max(1, int(ttl * 1000))]
        await self._link.call("SET", *args)

    async def delete(self, namespace: str, key: str) -> None:
        await self._link.call("DEL", self.key(namespace, key))

    # --- for callers that work without it ---------------------------------------------
    async def lookup(self, namespace: str, key: str) -> dict | None:
        """Like `get`, but None while Redis does not answer: a node without Redis knows
        only what it learned itself."""
        try:
            return await self.get(namespace, key)
        except ClusterUnavailable:
            return None

    def remember(self, namespace: str, key: str, value: dict, ttl: float | None = None) -> None:
        """`put` in the background; while Redis does not answer the entry stays this
        node's alone."""
        d = defer.ensureDeferred(self.put(namespace, key, value, ttl))
        d.addErrback(lambda f: f.trap(ClusterUnavailable))
        d.addErrback(lambda f: log.failure("could not share {ns}:{key}", f, ns=namespace, key=key))
