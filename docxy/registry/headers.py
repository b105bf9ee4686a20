"""Pure header hygiene: which client headers go upstream, which upstream headers come back.

Hop-by-hop headers never cross the proxy; `Location` never reaches a client (redirects are
followed by docxy, and a CDN's signed URL is not the client's business).
"""
from __future__ import annotations

import base64
import binascii

from twisted.web.http_headers import Headers

# Sent upstream as the client sent them (every line of a repeated header, in order).
FORWARDED_REQUEST_HEADERS = (
    b"accept",
    b"range",
    b"if-range",
    b"if-none-match",
    b"if-match",
    b"if-modified-since",
    b"if-unmodified-since",
    b"user-agent",
)

# What docxy itself accepts when it asks about a manifest (an access check): a registry
# answers 404 for an OCI index to a request that does not accept OCI types.
MANIFEST_ACCEPT = b", ".join(
    [
        b"application/vnd.oci.image.index.v1+json",
        b"application/vnd.oci.image.manifest.v1+json",
        b"application/vnd.docker.distribution.manifest.list.v2+json",
        b"application/vnd.docker.distribution.manifest.v2+json",
        b"*/*",
    ]
)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Upstream headers that are set by us (or are no business of the client's).
NOT_RELAYED = frozenset(
    {
        b"content-length",  # set from the upstream response length
        b"date",
        b"server",
        b"location",
        b"content-location",
        b"set-cookie",
        b"alt-svc",
        b"strict-transport-security",
    }
)


def upstream_request_headers(client: Headers, authorization: bytes | None) -> Headers:
    """The headers of the upstream request made on behalf of a client request."""
    out = Headers()
    for name in FORWARDED_REQUEST_HEADERS:
        values = client.getRawHeaders(name)
        if values:
            out.setRawHeaders(name, values)
    if authorization:
        out.setRawHeaders(b"authorization", [authorization])
    return out


def relayed_response_headers(upstream: Headers) -> list[tuple[bytes, list[bytes]]]:
    """The end-to-end headers of an upstream response, as (lower-case name, values)."""
    connection_named = set()
    for value in upstream.getRawHeaders(b"connection", []):
        connection_named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    out = []
    for name, values in upstream.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in NOT_RELAYED or lower in connection_named:
            continue
        out.append((lower, list(values)))
    return out


def without_authorization(headers: Headers) -> Headers:
    copy = headers.copy()
    copy.removeHeader(b"authorization")
    return copy


def basic_credentials(authorization: bytes | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header, or None."""
    if not authorization or not authorization[:6].lower() == b"basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep and user else None
