"""docxy.s3.signing: requests are signed with SigV4 the way S3 checks them, payload unsigned,
and the client builds the URLs (path style, canonical quoting) that the signature covers."""
from __future__ import annotations

import datetime
import hashlib
import hmac

import pytest

from docxy.s3.client import S3Client
from docxy.s3.signing import UNSIGNED_PAYLOAD, host_header, signed_headers

ACCESS = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NOW = datetime.datetime(2013, 5, 24, 0, 0, 0)


def _auth_fields(headers: dict[str, str]) -> dict[str, str]:
    scheme, _, rest = headers["Authorization"].partition(" ")
    assert scheme == "AWS4-HMAC-SHA256"
    return dict(part.strip().split("=", 1) for part in rest.split(","))


def _expected_signature(method: str, path: str, query: str, headers: dict[str, str],
                        signed: list[str], region: str = "us-east-1") -> str:
    """SigV4 computed independently of botocore, from the AWS documentation."""
    lower = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    canonical = "\n".join([
        method, path, query,
        "".join(f"{name}:{lower[name]}\n" for name in signed),
        ";".join(signed), UNSIGNED_PAYLOAD])
    scope = f"{NOW:%Y%m%d}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", f"{NOW:%Y%m%dT%H%M%SZ}", scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{SECRET}".encode()
    for part in (f"{NOW:%Y%m%d}", region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_signed_headers_cover_host_date_and_an_unsigned_payload():
    """The Authorization names host, x-amz-content-sha256 and x-amz-date, the payload hash
    is UNSIGNED-PAYLOAD, and the credential scope is the access key, day, region and s3."""
    headers = signed_headers("GET", "http://127.0.0.1:7480/bucket/key", {}, ACCESS, SECRET,
                             "us-east-1", NOW)
    fields = _auth_fields(headers)
    assert fields["Credential"] == f"{ACCESS}/20130524/us-east-1/s3/aws4_request"
    assert fields["SignedHeaders"] == "host;x-amz-content-sha256;x-amz-date"
    assert headers["X-Amz-Content-SHA256"] == UNSIGNED_PAYLOAD
    assert headers["X-Amz-Date"] == "20130524T000000Z"
    assert headers["Host"] == "127.0.0.1:7480"
    assert fields["Signature"] == _expected_signature(
        "GET", "/bucket/key", "",
        {"host": "127.0.0.1:7480", "x-amz-content-sha256": UNSIGNED_PAYLOAD,
         "x-amz-date": "20130524T000000Z"},
        ["host", "x-amz-content-sha256", "x-amz-date"])


def test_signature_covers_the_range_query_and_extra_headers():
    """Headers given (Range, If-None-Match) are signed too, and the query is canonical."""
    url = "https://s3.eu-west-1.amazonaws.com/b/a%20b/c?partNumber=2&uploadId=x%2Fy"
    given = {"Range": "bytes=5-9", "If-None-Match": "*"}
    headers = signed_headers("PUT", url, given, ACCESS, SECRET, "eu-west-1", NOW)
    fields = _auth_fields(headers)
    signed = ["host", "if-none-match", "range", "x-amz-content-sha256", "x-amz-date"]
    assert fields["SignedHeaders"] == ";".join(signed)
    assert headers["Host"] == "s3.eu-west-1.amazonaws.com"
    assert fields["Signature"] == _expected_signature(
        "PUT", "/b/a%20b/c", "partNumber=2&uploadId=x%2Fy",
        {**given, "host": "s3.eu-west-1.amazonaws.com",
         "x-amz-content-sha256": UNSIGNED_PAYLOAD, "x-amz-date": "20130524T000000Z"},
        signed, region="eu-west-1")


def test_a_payload_hash_given_by_the_caller_is_replaced():
    """Whatever x-amz-content-sha256 the caller set, the payload stays unsigned (a body
    streams without being hashed first)."""
    headers = signed_headers("PUT", "http://h:1/b/k", {"x-amz-content-sha256": "abc"},
                             ACCESS, SECRET, "us-east-1", NOW)
    assert [v for k, v in headers.items() if k.lower() == "x-amz-content-sha256"] == [
        UNSIGNED_PAYLOAD]


def test_signing_is_a_pure_function_of_its_inputs():
    """The same request at the same time signs the same; another second signs otherwise,
    and an aware UTC time signs as the naive one."""
    args = ("GET", "http://h:1/b/k", {}, ACCESS, SECRET, "us-east-1")
    first = signed_headers(*args, NOW)
    assert signed_headers(*args, NOW) == first
    assert signed_headers(*args, NOW.replace(tzinfo=datetime.timezone.utc)) == first
    assert signed_headers(*args, NOW + datetime.timedelta(seconds=1)) != first


def test_no_secret_in_the_signed_headers():
    """The secret key appears in no header (only the access key, in the scope)."""
    headers = signed_headers("GET", "http://h:1/b/k", {}, ACCESS, SECRET, "us-east-1", NOW)
    assert all(SECRET not in v for v in headers.values())


@pytest.mark.parametrize("url, host", [
    ("http://127.0.0.1:80/b", "127.0.0.1"),
    ("http://127.0.0.1:8080/b", "127.0.0.1:8080"),
    ("https://s3.us-east-1.amazonaws.com/b", "s3.us-east-1.amazonaws.com"),
    ("https://example.com:443/b", "example.com"),
    ("http://[::1]:9000/b", "[::1]:9000"),
])
def test_host_header_is_what_the_agent_sends(url, host):
    """The signed Host is the one Twisted's Agent sends: no default port."""
    assert host_header(url) == host


@pytest.mark.parametrize("endpoint, key, query, url", [
    ("http://127.0.0.1:9000", "a/b c/d", [], "http://127.0.0.1:9000/bkt/a/b%20c/d"),
    ("http://127.0.0.1:9000/", "x+y=z&ü", [], "http://127.0.0.1:9000/bkt/x%2By%3Dz%26%C3%BC"),
    (None, "k", [], "https://s3.us-east-1.amazonaws.com/bkt/k"),
    ("http://h:1", None, [("prefix", "a/b c"), ("list-type", "2")],
     "http://h:1/bkt?list-type=2&prefix=a%2Fb%20c"),
    ("http://h:1", "k", [("uploads", "")], "http://h:1/bkt/k?uploads="),
])
def test_client_builds_path_style_canonical_urls(endpoint, key, query, url):
    """Path-style URLs with keys quoted (slashes kept) and a sorted, encoded query."""
    client = S3Client(None, "bkt", ACCESS, SECRET, endpoint=endpoint)
    assert client.url(key, query) == url
    assert SECRET not in repr(client) and ACCESS not in repr(client)
