"""`S3Client`: the few S3 calls docxy needs on one bucket (head, ranged get, put, multipart
upload from a file, delete, list), path-style, signed by docxy.s3.signing and sent through
a persistent pool of Twisted's Agent with bodies streamed both ways."""
from __future__ import annotations

import datetime
import io
import os
import xml.etree.ElementTree as ET
from typing import Callable, Iterable
from urllib.parse import quote

from twisted.internet import defer, error
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from docxy.s3.errors import S3Error, S3Unreachable
from docxy.s3.signing import signed_headers
from docxy.upstream.bodies import BodyTooLarge, body_length, discard, read_small
from docxy.upstream.endpoints import UpstreamEndpoints
from docxy.upstream.errors import UpstreamError

log = Logger()

ERROR_BODY_LIMIT = 64 * 1024  # an S3 error document or a listing page is smaller
LIST_BODY_LIMIT = 8 << 20
READ_SIZE = 256 * 1024  # bytes read from a file per write to the connection
_UNREACHABLE = (error.ConnectError, error.DNSLookupError, error.ConnectingCancelledError,
                error.ConnectionLost, error.ConnectionClosed,
                error.TimeoutError, defer.TimeoutError, defer.CancelledError,
                ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)


def _tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> Iterable[ET.Element]:
    return (child for child in element if _tag(child) == name)


def _text(element: ET.Element, name: str, default: str = "") -> str:
    for child in _children(element, name):
        return child.text or ""
    return default


def _xml(body: bytes) -> ET.Element | None:
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        return None


class _SliceReader:
    """`length` bytes of an open file from `offset`, as a file of its own (what
    FileBodyProducer reads; it asks the length by seeking to the end).  `on_read` is told
    of each read, so a stalled upload can be told from a slow one."""

    def __init__(self, path: str, offset: int, length: int,
                 on_read: Callable[[], None] = lambda: None) -> None:
        self._path = path
        self._file: io.BufferedReader | None = None  # opened on the first read
        self._offset = offset
        self._length = length
        self._pos = 0
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        if self._file is None:
            self._file = open(self._path, "rb")
            self._file.seek(self._offset + self._pos)
        left = self._length - self._pos
        n = left if n is None or n < 0 else min(n, left)
        data = self._file.read(n) if n > 0 else b""
        self._pos += len(data)
        self._on_read()
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        if self._file is not None:
            self._file.seek(self._offset + self._pos)
        return self._pos

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@implementer(IBodyProducer)
class _BytesProducer:
    """A small body already in memory, written at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Deadline:
    """Cancels a request's Deferred after `seconds` without progress."""

    def __init__(self, reactor, seconds: float, d: defer.Deferred) -> None:
        self.expired = False
        self._seconds = seconds
        self._call = reactor.callLater(seconds, self._expire, d)

    def _expire(self, d: defer.Deferred) -> None:
        self.expired = True
        d.cancel()

    def progress(self) -> None:
        if self._call.active():
            self._call.reset(self._seconds)

    def done(self) -> None:
        if self._call.active():
            self._call.cancel()


class S3Client:
    """One bucket on S3 (AWS when `endpoint` is None, else an S3-compatible service such as
    Ceph RGW at "http://host:port"), path-style URLs, SigV4 with unsigned payloads."""

    def __init__(self, reactor, bucket: str, access_key: str, secret_key: str, *,
                 endpoint: str | None = None, region: str = "us-east-1",
                 part_size: int = 16 << 20, connect_timeout: float = 5.0,
                 timeout: float = 30.0, pool_size: int = 16) -> None:
        if part_size < 5 << 20 and endpoint is None:
            raise ValueError("S3 parts must be at least 5 MiB")
        self._reactor = reactor
        self.bucket = bucket
        self._access = access_key
        self._secret = secret_key
        self.endpoint = (endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
        self.region = region
        self.part_size = part_size
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = pool_size
        self._pool.cachedConnectionTimeout = 30  # below RGW's and S3's idle limits
        # 512 KiB per socket read, as for upstreams: a blob costs fewer reactor turns
        self._agent = Agent.usingEndpointFactory(
            reactor, UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), connect_timeout),
            pool=self._pool)

    def __repr__(self) -> str:  # no keys
        return f"<S3Client {self.endpoint}/{self.bucket}>"

    # --- plumbing ---------------------------------------------------------------------
    def url(self, key: str | None = None, query: Iterable[tuple[str, str]] = ()) -> str:
        """The path-style URL of the bucket or of `key`, with `query` canonically encoded."""
        path = f"/{quote(self.bucket, safe='')}"
        if key is not None:
            path += "/" + quote(key, safe="/~")
        pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query)
        qs = "&".join(f"{k}={v}" for k, v in pairs)
        return self.endpoint + path + (f"?{qs}" if qs else "")

    def _scrub(self, text: str) -> str:
        for secret in (self._secret, self._access):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def _request(self, method: str, key: str | None = None,
                       query: Iterable[tuple[str, str]] = (),
                       headers: dict[str, str] | None = None,
                       body: Callable[[Callable[[], None]], IBodyProducer] | None = None,
                       ) -> IResponse:
        """Send one signed request and return its response (body unread).  `body` makes
        the producer, given a progress callback; S3Unreachable when no answer comes."""
        url = self.url(key, query)
        what = f"{method} {url}"
        for attempt in (1, 2):
            all_headers = signed_headers(method, url, headers or {}, self._access,
                                         self._secret, self.region,
                                         datetime.datetime.now(datetime.timezone.utc))
            twisted_headers = Headers()
            for name, value in all_headers.items():
                twisted_headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
            d: defer.Deferred[IResponse]
            deadline: _Deadline | None = None
            try:
                producer = body(lambda: deadline.progress() if deadline else None) \
                    if body is not None else None
                d = self._agent.request(method.encode("ascii"), url.encode("ascii"),
                                        twisted_headers, producer)
            except OSError as e:
                raise S3Error(None, "LocalError", f"{what}: {e.strerror or e}") from None
            deadline = _Deadline(self._reactor, self.timeout, d)
            try:
                response = await d
            except RequestGenerationFailed as e:
                raise S3Error(None, "LocalError", f"{what}: {_describe(e)}") from None
            except _UNREACHABLE as e:
                if deadline.expired:
                    why = f"no answer within {self.timeout}s"
                else:
                    why = self._scrub(_describe(e))
                # A pooled connection the server had closed: once more on a fresh one.
                retry = attempt == 1 and not deadline.expired and isinstance(
                    e, (ResponseNeverReceived, RequestTransmissionFailed))
                log.warn("S3 {what}: {why}{again}", what=what, why=why,
                         again="; asking again" if retry else "")
                if retry:
                    continue
                raise S3Unreachable(f"{what}: {why}") from None
            finally:
                deadline.done()
            log.debug("S3 {what}: {status}", what=what, status=response.code)
            return response
        raise AssertionError("unreachable")

    async def _read(self, response: IResponse, limit: int) -> bytes:
        """The whole (small) body of `response`, or S3Unreachable when it is cut."""
        try:
            return await read_small(response, limit, self._reactor, self.timeout)
        except BodyTooLarge:
            raise S3Error(response.code, "TooLarge",
                          f"answer larger than {limit} bytes") from None
        except UpstreamError as e:
            raise S3Unreachable(f"answer {e.message}") from None

    async def _error(self, response: IResponse, what: str) -> S3Error:
        """The S3Error for an unwanted answer, from its XML <Code>/<Message> if any."""
        code, message = _status_code(response.code), ""
        if response.code != 204 and response.request is not None \
                and response.request.method != b"HEAD":
            try:
                body = await self._read(response, ERROR_BODY_LIMIT)
            except S3Error:
                body = b""
            root = _xml(body)
            if root is not None and _tag(root) == "Error":
                code = _text(root, "Code", code) or code
                message = _text(root, "Message")
        else:
            discard(response)
        message = self._scrub(f"{what}: {message or response.phrase.decode('latin-1')}")
        return S3Error(response.code, code, message)

    # --- the calls ----------------------------------------------------------------------
    async def ensure_bucket(self) -> bool:
        """Make sure the bucket exists; True when this call created it."""
        response = await self._request("HEAD")
        if response.code not in (200, 404):
            raise await self._error(response, f"HEAD bucket {self.bucket}")
        discard(response)
        if response.code == 200:
            return False
        body = None
        if self.region != "us-east-1":
            xml = ("<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                   f"<LocationConstraint>{self.region}</LocationConstraint>"
                   "</CreateBucketConfiguration>").encode()
            body = lambda progress: _BytesProducer(xml)  # noqa: E731
        response = await self._request("PUT", body=body)
        if response.code == 200:
            discard(response)
            log.info("created S3 bucket {bucket}", bucket=self.bucket)
            return True
        err = await self._error(response, f"create bucket {self.bucket}")
        if err.code == "BucketAlreadyOwnedByYou":
            return False
        raise err

    async def head(self, key: str) -> int | None:
        """The size of `key`, or None when there is no such object."""
        response = await self._request("HEAD", key)
        if response.code not in (200, 404):
            raise await self._error(response, f"HEAD {key}")
        discard(response)
        if response.code == 404:
            return None
        size = body_length(response)
        if size is None:
            raise S3Error(200, "NoLength", f"HEAD {key}: no Content-Length")
        return size

    async def get(self, key: str, start: int = 0, end: int | None = None) -> IResponse:
        """The response for `key` (bytes start..end-1, or to its end) with its body unread:
        200, or 206 for a range.  S3Error(404, "NoSuchKey") when there is no such object."""
        headers = {}
        if end is not None and end <= start:
            raise ValueError(f"empty range {start}-{end}")
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-" + (str(end - 1) if end is not None else "")
        response = await self._request("GET", key, headers=headers)
        if (response.code == 200 and not headers) or (response.code == 206 and headers):
            return response
        if response.code == 200:
            discard(response)
            raise S3Error(200, "RangeIgnored", f"GET {key}: Range {headers['Range']} ignored")
        err = await self._error(response, f"GET {key}")
        if response.code == 404 and err.code != "NoSuchBucket":
            err = S3Error(404, "NoSuchKey", err.message)
        raise err

    async def get_bytes(self, key: str, limit: int) -> bytes | None:
        """The whole (small) object `key`, None when there is none; S3Error past `limit`."""
        try:
            response = await self.get(key)
        except S3Error as e:
            if e.status == 404 and e.code == "NoSuchKey":
                return None
            raise
        return await self._read(response, limit)

    async def put_bytes(self, key: str, data: bytes, content_type: str | None = None,
                        if_none_match: bool = False) -> bool:
        """Store `data` as `key`; False only when `if_none_match` and `key` already exists."""
        headers = {"Content-Type": content_type} if content_type else {}
        if if_none_match:
            headers["If-None-Match"] = "*"
        response = await self._request("PUT", key, headers=headers,
                                       body=lambda progress: _BytesProducer(data))
        if response.code == 200:
            discard(response)
            return True
        if response.code == 412 and if_none_match:
            discard(response)
            return False
        raise await self._error(response, f"PUT {key}")

    async def put_file(self, key: str, path: str, size: int,
                       content_type: str | None = None) -> None:
        """Store the first `size` bytes of the file at `path` as `key`, streamed from disk:
        one PUT up to `part_size`, a multipart upload above it."""
        try:
            on_disk = os.stat(path).st_size
        except OSError as e:
            raise S3Error(None, "LocalError", f"PUT {key}: {path}: {e.strerror}") from None
        if on_disk < size:
            raise S3Error(None, "LocalError", f"PUT {key}: {path} has {on_disk} of {size} bytes")
        headers = {"Content-Type": content_type} if content_type else {}
        if size <= self.part_size:
            response = await self._request("PUT", key, headers=headers,
                                           body=self._file_body(path, 0, size))
            if response.code != 200:
                raise await self._error(response, f"PUT {key}")
            discard(response)
            return
        upload_id = await self._create_multipart(key, headers)
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                length = min(self.part_size, size - offset)
                parts.append((number, await self._upload_part(key, upload_id, number, path,
                                                              offset, length)))
            await self._complete_multipart(key, upload_id, parts)
        except BaseException as e:
            await self._abort_multipart(key, upload_id)
            if isinstance(e, S3Error) or not isinstance(e, Exception):
                raise
            raise S3Error(None, "UploadFailed", f"multipart upload of {key}: {e}") from e

    def _file_body(self, path: str, offset: int, length: int
                   ) -> Callable[[Callable[[], None]], IBodyProducer]:
        def make(progress: Callable[[], None]) -> IBodyProducer:
            reader = _SliceReader(path, offset, length, progress)
            return FileBodyProducer(reader, readSize=READ_SIZE)  # type: ignore[arg-type]
        return make

    async def _create_multipart(self, key: str, headers: dict[str, str]) -> str:
        response = await self._request("POST", key, query=[("uploads", "")], headers=headers)
        if response.code != 200:
            raise await self._error(response, f"create multipart upload {key}")
        root = _xml(await self._read(response, ERROR_BODY_LIMIT))
        upload_id = _text(root, "UploadId") if root is not None else ""
        if not upload_id:
            raise S3Error(200, "MalformedAnswer", f"create multipart upload {key}: no UploadId")
        return upload_id

    async def _upload_part(self, key: str, upload_id: str, number: int, path: str,
                           offset: int, length: int) -> str:
        query = [("partNumber", str(number)), ("uploadId", upload_id)]
        response = await self._request("PUT", key, query=query,
                                       body=self._file_body(path, offset, length))
        if response.code != 200:
            raise await self._error(response, f"upload part {number} of {key}")
        discard(response)
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")
        if not etag:
            raise S3Error(200, "MalformedAnswer", f"upload part {number} of {key}: no ETag")
        return etag

    async def _complete_multipart(self, key: str, upload_id: str,
                                  parts: list[tuple[int, str]]) -> None:
        root = ET.Element("CompleteMultipartUpload")
        for number, etag in parts:
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = etag
        buf = io.BytesIO()
        ET.ElementTree(root).write(buf, encoding="utf-8", xml_declaration=True)
        xml = buf.getvalue()
        response = await self._request("POST", key, query=[("uploadId", upload_id)],
                                       headers={"Content-Type": "application/xml"},
                                       body=lambda progress: _BytesProducer(xml))
        if response.code != 200:
            raise await self._error(response, f"complete multipart upload {key}")
        # S3 may answer 200 and put the error in the body (it fails after sending headers).
        answer = _xml(await self._read(response, ERROR_BODY_LIMIT))
        if answer is not None and _tag(answer) == "Error":
            raise S3Error(200, _text(answer, "Code", "InternalError"),
                          self._scrub(f"complete multipart upload {key}: "
                                      f"{_text(answer, 'Message')}"))

    async def _abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            response = await self._request("DELETE", key, query=[("uploadId", upload_id)])
            discard(response)
            if response.code not in (204, 404):
                log.warn("aborting the multipart upload of {key} answered {status}",
                         key=key, status=response.code)
        except Exception as e:  # best effort: the upload's own failure is the news
            log.warn("could not abort the multipart upload of {key}: {why}", key=key,
                     why=self._scrub(str(e)))

    async def delete(self, key: str) -> None:
        """Delete `key`; an object already gone is fine."""
        response = await self._request("DELETE", key)
        if response.code in (200, 204, 404):
            discard(response)
            return
        raise await self._error(response, f"DELETE {key}")

    async def list(self, prefix: str, page_size: int = 1000) -> list[tuple[str, int]]:
        """Every (key, size) under `prefix`, all pages of ListObjectsV2 followed."""
        found: list[tuple[str, int]] = []
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(page_size))]
            if token:
                query.append(("continuation-token", token))
            response = await self._request("GET", query=query)
            if response.code != 200:
                raise await self._error(response, f"list {prefix!r}")
            root = _xml(await self._read(response, LIST_BODY_LIMIT))
            if root is None or _tag(root) != "ListBucketResult":
                raise S3Error(200, "MalformedAnswer", f"list {prefix!r}: not a listing")
            for item in _children(root, "Contents"):
                found.append((_text(item, "Key"), int(_text(item, "Size", "0") or 0)))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated").lower() != "true" or not token:
                return found

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._pool.closeCachedConnections()


def _status_code(status: int) -> str:
    return {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            412: "PreconditionFailed", 416: "InvalidRange", 500: "InternalError",
            503: "ServiceUnavailable"}.get(status, f"HTTP{status}")


def _describe(e: BaseException) -> str:
    """A short reason for a failed request (the wrapped failures of Twisted's client)."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() or r.type.__name__ for r in reasons)
    return str(e) or type(e).__name__
