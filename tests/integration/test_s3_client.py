"""docxy.s3.client against a real Ceph RGW: buckets, small and multipart objects, ranges,
conditional writes, listing over pages, wrong keys, and the gateway going away and back."""
from __future__ import annotations

import hashlib
import os
import uuid

import pytest
import pytest_twisted
from harness.ceph import Rgw
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from docxy.s3.client import S3Client
from docxy.s3.errors import S3Error, S3Unreachable
from docxy.s3.location import read_s3_credentials

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _client(rgw: Rgw, bucket: str, **kwargs) -> S3Client:
    from twisted.internet import reactor
    kwargs.setdefault("endpoint", rgw.endpoint)
    return S3Client(reactor, bucket, kwargs.pop("access", rgw.access_key),
                    kwargs.pop("secret", rgw.secret_key), **kwargs)


@pytest.fixture(scope="module")
def bucket(rgw: Rgw) -> str:
    """A fresh bucket name for this module (created by the first test that needs it)."""
    return f"dx-{uuid.uuid4().hex[:12]}"


async def _ready(rgw: Rgw, bucket: str, **kwargs) -> S3Client:
    client = _client(rgw, bucket, **kwargs)
    await client.ensure_bucket()
    return client


class _Collect(Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.digest = hashlib.sha256()
        self.size = 0
        self.chunks: list[bytes] | None = []

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)
        if self.chunks is not None:
            self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks or []))
        else:
            self.done.errback(reason)


@pytest_twisted.ensureDeferred
async def test_ensure_bucket_creates_then_finds_it(rgw):
    """The first ensure_bucket creates the bucket (True), the second finds it (False)."""
    client = _client(rgw, f"dx-{uuid.uuid4().hex[:12]}")
    try:
        assert await client.ensure_bucket() is True
        assert await client.ensure_bucket() is False
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_put_bytes_get_bytes_and_head(rgw, bucket):
    """A small object comes back byte for byte; head gives its size, None for a missing key."""
    client = await _ready(rgw, bucket)
    try:
        data = os.urandom(12345)
        assert await client.put_bytes("small/one", data, content_type="application/x-test")
        assert await client.get_bytes("small/one", 1 << 20) == data
        assert await client.head("small/one") == len(data)
        assert await client.head("small/none") is None
        assert await client.get_bytes("small/none", 1 << 20) is None
        assert await client.put_bytes("small/empty", b"")
        assert await client.get_bytes("small/empty", 10) == b""
        with pytest.raises(S3Error) as raised:
            await client.get_bytes("small/one", 100)
        assert raised.value.code == "TooLarge"
        # A key with characters that need quoting round-trips under its own name.
        odd = "small/a b+c=d&é~"
        assert await client.put_bytes(odd, b"odd")
        assert await client.get_bytes(odd, 10) == b"odd"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_get_a_range_is_206_with_the_right_bytes(rgw, bucket):
    """get(start, end) answers 206 with bytes start..end-1; get(start) runs to the end; a
    missing key is S3Error 404 NoSuchKey."""
    client = await _ready(rgw, bucket)
    try:
        data = os.urandom(100_000)
        await client.put_bytes("range/blob", data)
        for start, end in [(10, 20), (0, 1), (99_000, None), (0, None), (5, 100_000)]:
            response = await client.get("range/blob", start, end)
            assert response.code == (200 if (start, end) == (0, None) else 206)
            body = _Collect()
            response.deliverBody(body)
            assert await body.done == data[start:end]
        with pytest.raises(S3Error) as raised:
            await client.get("range/missing", 5)
        assert (raised.value.status, raised.value.code) == (404, "NoSuchKey")
        with pytest.raises(S3Error) as raised:
            await client.get("range/blob", 200_000)
        assert raised.value.status == 416
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_put_file_multipart_round_trip(rgw, bucket, tmp_path):
    """A 40 MiB file in 16 MiB parts (three of them, the last short) comes back whole."""
    path = tmp_path / "big"
    with open(path, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(MiB))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    client = await _ready(rgw, bucket, part_size=16 * MiB)
    try:
        await client.put_file("big/forty", str(path), 40 * MiB, "application/octet-stream")
        assert await client.head("big/forty") == 40 * MiB
        response = await client.get("big/forty")
        body = _Collect()
        body.chunks = None
        response.deliverBody(body)
        await body.done
        assert (body.size, body.digest.hexdigest()) == (40 * MiB, expected)
        # One PUT up to part_size: the first 1000 bytes only.
        await client.put_file("big/head", str(path), 1000)
        assert await client.get_bytes("big/head", 2000) == path.read_bytes()[:1000]
        assert not [k for k, _ in await client.list("big/")
                    if k not in ("big/forty", "big/head")]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_put_file_failure_aborts_the_upload(rgw, bucket, tmp_path):
    """A file shorter than announced fails with S3Error before anything is sent."""
    path = tmp_path / "short"
    path.write_bytes(b"x" * 10)
    client = await _ready(rgw, bucket)
    try:
        with pytest.raises(S3Error):
            await client.put_file("big/short", str(path), 100)
        assert await client.head("big/short") is None
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_conditional_put_refuses_an_existing_key(rgw, bucket):
    """put_bytes(if_none_match) writes a new key (True) and leaves an existing one (False)."""
    client = await _ready(rgw, bucket)
    try:
        assert await client.put_bytes("cond/k", b"first", if_none_match=True) is True
        assert await client.put_bytes("cond/k", b"second", if_none_match=True) is False
        assert await client.get_bytes("cond/k", 100) == b"first"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_delete_removes_and_tolerates_missing(rgw, bucket):
    """delete removes a key; deleting it again is fine."""
    client = await _ready(rgw, bucket)
    try:
        await client.put_bytes("del/k", b"x")
        await client.delete("del/k")
        assert await client.head("del/k") is None
        await client.delete("del/k")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_list_follows_pages_under_a_prefix(rgw, bucket):
    """list returns every key under the prefix with its size, across several pages, and no
    key from beside it."""
    client = await _ready(rgw, bucket)
    try:
        expected = sorted((f"list/a/{i:03d}", i) for i in range(23))
        await defer.gatherResults([
            defer.ensureDeferred(client.put_bytes(key, b"x" * size)) for key, size in expected])
        await client.put_bytes("list/ab", b"beside")
        assert sorted(await client.list("list/a/", page_size=5)) == expected
        assert sorted(await client.list("list/a/")) == expected
        assert await client.list("list/none/") == []
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_are_403_without_the_secret(rgw, bucket, tmp_path):
    """A wrong secret key is S3Error 403, and no message holds either key."""
    good = await _ready(rgw, bucket)
    await good.close()
    secret = "wrong" + rgw.secret_key[5:]
    client = _client(rgw, bucket, secret=secret)
    try:
        for call in (client.put_bytes("auth/k", b"x"), client.get_bytes("auth/k", 10),
                     client.head("auth/k"), client.list("auth/")):
            with pytest.raises(S3Error) as raised:
                await call
            assert raised.value.status == 403
            assert secret not in str(raised.value) and rgw.access_key not in str(raised.value)
    finally:
        await client.close()
    # The harness's credentials file reads back as the user's keys.
    path = rgw.credentials_file(tmp_path / "creds")
    assert read_s3_credentials(str(path), {}) == (rgw.access_key, rgw.secret_key)


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_unreachable(rgw):
    """An endpoint with nothing listening is S3Unreachable (status None), not a hang."""
    from harness.procs import free_port
    client = _client(rgw, "dx-nowhere", endpoint=f"http://127.0.0.1:{free_port()}",
                     connect_timeout=2, timeout=5)
    try:
        with pytest.raises(S3Unreachable) as raised:
            await client.head("k")
        assert raised.value.status is None
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_name_that_does_not_resolve_is_unreachable(rgw):
    """An endpoint whose host name does not resolve is S3Unreachable."""
    client = _client(rgw, "dx-nowhere", endpoint="http://docxy-test.invalid:9",
                     connect_timeout=2, timeout=5)
    try:
        with pytest.raises(S3Unreachable):
            await client.head("k")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_stalled_server_is_unreachable_after_the_timeout():
    """A server that accepts but never answers is S3Unreachable after `timeout`."""
    import socket

    from twisted.internet import reactor
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = S3Client(reactor, "dx-stall", "AK", "SK", endpoint=f"http://127.0.0.1:{port}",
                      timeout=0.5)
    try:
        with pytest.raises(S3Unreachable, match="no answer within"):
            await client.head("k")
    finally:
        await client.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_gateway_outage_is_unreachable_then_recovers(rgw, bucket):
    """With radosgw stopped requests are S3Unreachable; started again, they work (also over
    the client's pool, whose connections died with the gateway)."""
    client = await _ready(rgw, bucket)
    try:
        await client.put_bytes("outage/k", b"before")
        rgw.stop_gateway()
        try:
            with pytest.raises(S3Unreachable):
                await client.get_bytes("outage/k", 100)
            with pytest.raises(S3Unreachable):
                await client.put_bytes("outage/k2", b"during")
        finally:
            rgw.start_gateway()
        assert await client.get_bytes("outage/k", 100) == b"before"
        assert await client.put_bytes("outage/k2", b"after")
    finally:
        await client.close()
