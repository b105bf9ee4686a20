"""Header hygiene between client, docxy and upstream."""
from twisted.web.http_headers import Headers

from docxy.registry.headers import (
    relayed_response_headers,
    upstream_request_headers,
    without_authorization,
)


def test_every_accept_line_is_forwarded_in_order():
    """dockerd sends Accept as several lines; all of them go upstream."""
    client = Headers()
    client.setRawHeaders(
        b"accept",
        [
            b"application/vnd.oci.image.index.v1+json",
            b"application/vnd.docker.distribution.manifest.v2+json",
            b"application/vnd.docker.distribution.manifest.list.v2+json, */*",
        ],
    )
    client.setRawHeaders(b"range", [b"bytes=10-"])
    client.setRawHeaders(b"cookie", [b"x=y"])
    client.setRawHeaders(b"authorization", [b"Bearer client"])
    out = upstream_request_headers(client, b"Bearer chosen")
    assert out.getRawHeaders(b"accept") == client.getRawHeaders(b"accept")
    assert out.getRawHeaders(b"range") == [b"bytes=10-"]
    assert out.getRawHeaders(b"authorization") == [b"Bearer chosen"]
    assert not out.hasHeader(b"cookie")


def test_no_authorization_unless_given():
    client = Headers({b"authorization": [b"Bearer client"]})
    assert not upstream_request_headers(client, None).hasHeader(b"authorization")


def test_hop_by_hop_and_private_headers_are_dropped():
    """Connection-level headers, those named in Connection, Location and cookies stay out."""
    upstream = Headers()
    for name, value in [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Location", b"https://cdn.example/signed?sig=secret"),
        (b"Set-Cookie", b"a=b"),
        (b"Docker-Content-Digest", b"sha256:abc"),
        (b"Content-Type", b"application/vnd.oci.image.index.v1+json"),
        (b"ETag", b'"sha256:abc"'),
        (b"ratelimit-remaining", b"99;w=21600"),
        (b"Link", b'</v2/x/tags/list?n=1&last=a>; rel="next"'),
    ]:
        upstream.addRawHeader(name, value)
    relayed = dict(relayed_response_headers(upstream))
    assert set(relayed) == {
        b"docker-content-digest",
        b"content-type",
        b"etag",
        b"ratelimit-remaining",
        b"link",
    }


def test_without_authorization_copies():
    h = Headers({b"authorization": [b"x"], b"accept": [b"y"]})
    out = without_authorization(h)
    assert not out.hasHeader(b"authorization") and out.hasHeader(b"accept")
    assert h.hasHeader(b"authorization")
