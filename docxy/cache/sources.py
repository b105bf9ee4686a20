"""Where a blob missing from the local disk comes from, with `--store` and `--cluster`:
the bucket if it holds it; else, if another node holds the blob's lease, that node's
download (streamed as its bytes arrive); else this node takes the lease and downloads it
upstream, once for the whole cluster.

A cut body is resumed the same way from the byte reached: a dead leader's lease expires
within seconds, the first follower to take it resumes upstream, the others stream from
it.  Without Redis (down, or no --cluster) a node leads for itself (one download per
node), and a bucket that does not answer counts as empty.  Every body still goes through
a verifying download (docxy.cache.fill), so a peer or the bucket can never hand over a
corrupt blob.
"""
from __future__ import annotations

import enum
from typing import Awaitable, Callable, NamedTuple

from twisted.internet import task
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from docxy.cache.bucket import Bucket
from docxy.cluster.link import ClusterUnavailable
from docxy.cluster.peers import PeerClient, PeerUnreachable
from docxy.upstream.bodies import Resumer, discard
from docxy.upstream.errors import UpstreamError

log = Logger()

POLL = 0.25  # seconds between looks while the leader's download is about to start
GIVE_UP = 30.0  # seconds a follower waits for a leader before it downloads by itself


class Source(enum.Enum):
    BUCKET = "bucket"
    PEER = "peer"
    UPSTREAM = "upstream"


class Opened(NamedTuple):
    response: IResponse
    source: Source
    lease: object | None  # docxy.cluster.leases.Lease when this node now leads


UpstreamOpen = Callable[[int], Awaitable[IResponse]]


def range_start(value: bytes) -> int:
    """The first byte of a `bytes=N-` or `bytes=N-M` range (what a resume asks for)."""
    first = value.decode("latin-1").strip().removeprefix("bytes=").partition("-")[0]
    return int(first) if first.isdigit() else 0


class BlobSources:
    def __init__(self, reactor, bucket: Bucket | None = None, leases=None,
                 peers: PeerClient | None = None, node_url: str | None = None,
                 give_up: float = GIVE_UP) -> None:
        """`leases`: docxy.cluster.leases.Leases, with `peers` and `node_url` (this node's
        listener as peers reach it); all None without --cluster."""
        self._reactor = reactor
        self.bucket = bucket
        self.leases = leases
        self.peers = peers
        self.node_url = node_url
        self._give_up = give_up
        self.bound = None  # docxy.cluster.bound.SharedBound: the bucket's LRU across nodes
        self.takeovers = 0  # leases taken from a node that stopped renewing (metrics)
        self.degraded = 0  # downloads led without a lease because Redis did not answer

    async def open(self, digest: str, start: int, upstream: UpstreamOpen,
                   after_leader: bool = False) -> Opened:
        """The blob from byte `start`: from the bucket, a peer, or `upstream(start)` under
        a lease of ours.  `after_leader`: a resume after a leader's body was cut (a
        lease taken now is a takeover)."""
        deadline = self._reactor.seconds() + self._give_up
        silent: set[str] = set()  # peers already said to be silent (said once per wait)
        while True:
            if self.bucket is not None and await self.bucket.blob_size(digest) is not None:
                response = await self.bucket.open_blob(digest, start)
                if response is not None and response.code in (200, 206):
                    return Opened(response, Source.BUCKET, None)
                if response is not None:
                    discard(response)
            if self.leases is None:
                return Opened(await upstream(start), Source.UPSTREAM, None)
            try:
                held = await self.leases.take(digest)
            except ClusterUnavailable as e:
                self.degraded += 1
                log.warn("Redis does not answer ({err}): downloading {digest} for this node "
                         "alone", err=str(e), digest=digest)
                return Opened(await upstream(start), Source.UPSTREAM, None)
            if not isinstance(held, str):
                if after_leader:
                    self.takeovers += 1
                    log.warn("took over the download of {digest} at byte {start}",
                             digest=digest, start=start)
                return Opened(await upstream(start), Source.UPSTREAM, held)
            if held != self.node_url:
                response = await self._from_peer(held, digest, start, silent)
                if response is not None:
                    return Opened(response, Source.PEER, None)
            if self._reactor.seconds() > deadline:
                log.warn("no node delivered {digest} within {secs}s; downloading it here",
                         digest=digest, secs=self._give_up)
                return Opened(await upstream(start), Source.UPSTREAM, None)
            await task.deferLater(self._reactor, POLL, lambda: None)

    async def _from_peer(self, node_url: str, digest: str, start: int,
                         silent: set[str]) -> IResponse | None:
        try:
            response = await self.peers.get(node_url, digest, start)
        except PeerUnreachable as e:
            if node_url not in silent:
                silent.add(node_url)
                log.warn("peer {node} does not answer for {digest} ({err}); waiting for "
                         "its lease to pass", node=node_url, digest=digest, err=str(e))
            return None
        if response.code in (200, 206) and isinstance(response.length, int):
            return response
        discard(response)
        return None

    def resumer(self, digest: str, upstream: Resumer | None, attempts: int,
                leading: Callable[[], bool], took_lease: Callable[[object], None]) -> Resumer:
        """How a cut body of `digest` is asked for again: upstream while this node leads
        (`leading()`), else through `open` (the bucket, the new leader, or a takeover,
        handed to `took_lease`)."""

        async def again(range_value: bytes, if_range: bytes | None) -> IResponse:
            if leading() and upstream is not None:
                return await upstream.again(range_value, if_range)
            start = range_start(range_value)

            async def from_upstream(position: int) -> IResponse:
                if upstream is None:
                    raise UpstreamError(502, "UNAVAILABLE", "resuming upstream is off")
                return await upstream.again(range_value, None)

            opened = await self.open(digest, start, from_upstream, after_leader=True)
            if opened.lease is not None:
                took_lease(opened.lease)
            return opened.response

        if upstream is None:  # --resume-attempts 0: a follower still follows a new leader
            return Resumer(again, 1)
        return Resumer(again, max(attempts, 1), upstream.on_resume)
