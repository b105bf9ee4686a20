"""SigV4 for S3, as a pure function: `signed_headers` returns the headers of one request
signed by botocore's S3SigV4Auth for a given time, with the payload left unsigned
(`x-amz-content-sha256: UNSIGNED-PAYLOAD`) so bodies can stream without being hashed first."""
from __future__ import annotations

import datetime
import types
from typing import Mapping
from urllib.parse import urlsplit

from botocore.auth import SIGV4_TIMESTAMP, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
# S3SigV4Auth replaces x-amz-content-sha256 with its own payload hash (over plain HTTP: the
# hash of the body) unless the request's client config turns payload signing off.
_NO_PAYLOAD_SIGNING = types.SimpleNamespace(s3={"payload_signing_enabled": False})


class _SignerAt(S3SigV4Auth):
    """botocore's S3 signer with the signing time given instead of read from the clock."""

    def __init__(self, credentials: Credentials, region: str, now: datetime.datetime) -> None:
        super().__init__(credentials, "s3", region)
        self._now = now

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._now.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        string_to_sign = self.string_to_sign(request, self.canonical_request(request))
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


def host_header(url: str) -> str:
    """The Host header for `url` as Twisted's Agent would send it (no default port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def signed_headers(method: str, url: str, headers: Mapping[str, str], access: str,
                   secret: str, region: str, now: datetime.datetime) -> dict[str, str]:
    """`headers` plus Host, X-Amz-Date, x-amz-content-sha256 (UNSIGNED-PAYLOAD) and the
    Authorization of `method url` signed at `now` (UTC).  `url` must already be quoted the
    way S3 canonicalises it (each path segment percent-encoded, '/' kept)."""
    if now.tzinfo is not None:
        now = now.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    request = AWSRequest(method=method.upper(), url=url, headers=dict(headers))
    if "host" not in request.headers:
        request.headers["Host"] = host_header(url)
    if "x-amz-content-sha256" in request.headers:
        del request.headers["x-amz-content-sha256"]
    request.headers["x-amz-content-sha256"] = UNSIGNED_PAYLOAD
    request.context["client_config"] = _NO_PAYLOAD_SIGNING
    _SignerAt(Credentials(access, secret), region, now).add_auth(request)
    return dict(request.headers.items())
