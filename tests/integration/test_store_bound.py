"""The shared store's bound (docxy.cluster.bound) on a real RGW bucket and a real Redis:
the least recently used blobs across the nodes leave the bucket first, a blob being
downloaded (under its lease) never does, and only one node sweeps at a time."""
from __future__ import annotations

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from docxy.cache.bucket import Bucket
from docxy.cluster.bound import SharedBound
from docxy.cluster.leases import Leases
from docxy.cluster.link import RedisLink
from docxy.s3.client import S3Client

pytestmark = pytest.mark.integration


def _digest(i: int) -> str:
    return "sha256:" + f"{i:02x}" * 32


@pytest_twisted.ensureDeferred
async def test_least_recently_used_blobs_leave_the_bucket_first(rgw, redis_server):
    """Five 1 KiB blobs used in order on two nodes, a bound of 3 KiB: the two used
    longest ago go, except one held under a lease (the next-oldest goes instead); two
    nodes sweeping at the same moment: one sweeps, the other finds the sweep taken."""
    client = S3Client(reactor, f"bound-{uuid.uuid4().hex[:8]}", rgw.access_key,
                      rgw.secret_key, endpoint=rgw.endpoint)
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    links = [RedisLink(redis_server.url, reactor) for _ in range(2)]
    try:
        await client.ensure_bucket()
        bucket = Bucket(client, "p", reactor)
        for link in links:
            link.start()
        leases = [Leases(link, f"http://node{i}", reactor, prefix=prefix)
                  for i, link in enumerate(links)]
        bounds = [SharedBound(link, bucket, lease, reactor, 3 * 1024, f"http://node{i}",
                              prefix=prefix) for i, (link, lease) in enumerate(zip(links, leases))]
        for i in range(5):
            await client.put_bytes(bucket.blob_key(_digest(i)), b"x" * 1024)
            bounds[i % 2].touch(_digest(i), 1024)
            await bounds[i % 2]._record(_digest(i), 1024, float(i))  # a clear order
        held = await leases[1].take(_digest(0))  # blob 0 is being downloaded
        removed = await defer.gatherResults([defer.ensureDeferred(b.sweep()) for b in bounds])
        assert sorted(removed) == [0, 2]
        present = [await client.head(bucket.blob_key(_digest(i))) is not None for i in range(5)]
        assert present == [True, False, False, True, True]
        assert [b.total for b in bounds if b.total is not None] == [3 * 1024]
        await held.release()
    finally:
        for lease in locals().get("leases", []):
            lease.stop()
        for link in links:
            await link.stop()
        await client.close()
