"""The pieces one node of a cluster runs, started and stopped with the daemon: the Redis
link and the node's membership, the shared store's client (its bucket made if missing),
the peer client.  Built by docxy.service from the Config; nothing here reads options."""
from __future__ import annotations

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


@attrs.define
class ClusterParts:
    """What `--store` and `--cluster` add to a node (each None without them)."""

    bucket: object | None = None  # docxy.cache.bucket.Bucket
    s3: object | None = None  # docxy.s3.client.S3Client
    link: object | None = None  # docxy.cluster.link.RedisLink
    leases: object | None = None  # docxy.cluster.leases.Leases
    members: object | None = None  # docxy.cluster.members.Membership
    peers: object | None = None  # docxy.cluster.peers.PeerClient
    node_url: str | None = None
    secret: bytes | None = None  # the cluster secret (keys are derived from it)
    state: object | None = None  # docxy.cluster.state.SharedState: tags, access, tokens
    bound: object | None = None  # docxy.cluster.bound.SharedBound (--store-max-size)


class ClusterService(service.Service):
    def __init__(self, parts: ClusterParts) -> None:
        self.parts = parts
        self._making_bucket = None

    def startService(self) -> None:
        super().startService()
        parts = self.parts
        if parts.link is not None:
            parts.link.start()
        if parts.members is not None:
            parts.members.start()
        if parts.bound is not None:
            parts.bound.start()
        if parts.s3 is not None:
            self._making_bucket = defer.ensureDeferred(self._make_bucket())
            parts.bucket.start()

    async def _make_bucket(self) -> None:
        from docxy.s3.errors import S3Error

        try:
            if await self.parts.s3.ensure_bucket():
                log.info("made the bucket {bucket}", bucket=self.parts.s3.bucket)
        except S3Error as e:
            # Not fatal: the node serves from its disk and relays until the bucket answers.
            log.warn("cannot reach the bucket yet ({err}); serving from the local disk",
                     err=str(e))
            self.parts.bucket.failed("making the bucket", e)

    async def _stop(self) -> None:
        parts = self.parts
        if self._making_bucket is not None and not self._making_bucket.called:
            self._making_bucket.cancel()
        if parts.bucket is not None:
            parts.bucket.stop()
        if parts.bound is not None:
            parts.bound.stop()
        if parts.leases is not None:
            parts.leases.stop()  # what is held expires; a restarted node resumes nothing
        if parts.members is not None:
            await parts.members.stop()
        if parts.link is not None:
            await parts.link.stop()
        if parts.peers is not None:
            await parts.peers.close()
        if parts.s3 is not None:
            await parts.s3.close()

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self._stop())
