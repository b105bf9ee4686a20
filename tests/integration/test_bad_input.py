"""Bad input against the real daemon, over raw sockets: slowloris, huge headers, path
tricks, invalid UTF-8, an oversized manifest, absurd ranges, a forged Host, a token request
with a thousand scopes.  Each gets a clear error (a registry JSON body), nothing bad reaches
the upstream, and a normal pull right after still succeeds."""
from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import time
from urllib.parse import urlencode

import pytest
from harness.daemon import Docxy
from harness.faultserver import FaultServer

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT = 3  # docxy's --request-timeout here
LINGER = 2  # docxy.web.channel.LINGER


# --- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def docxy(upstream, tmp_path_factory):
    """docxy with its cache, in front of the Hub-like upstream, cutting slow requests at 3 s."""
    workdir = tmp_path_factory.mktemp("docxy-bad-input")
    args = ["--upstream", upstream.registry_url, "--upstream-ca", str(upstream.ca_path),
            "--library", "--request-timeout", str(REQUEST_TIMEOUT)]
    with Docxy(workdir, args) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def docxy_no_cache(upstream, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("docxy-bad-input-no-cache")
    args = ["--upstream", upstream.registry_url, "--upstream-ca", str(upstream.ca_path),
            "--library", "--no-cache"]
    with Docxy(workdir, args) as daemon:
        yield daemon


def _raw(docxy: Docxy, data: bytes, timeout: float = 15) -> bytes:
    """Send raw bytes, read until docxy closes (or `timeout`); what came back."""
    received = b""
    with socket.create_connection(("127.0.0.1", docxy.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if _complete(received):
                    break
        except (ConnectionError, socket.timeout):
            pass
    return received


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    assert raw, "docxy answered nothing"
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _json_error(raw: bytes) -> tuple[int, str, str]:
    """(status, code, message) of a registry JSON error answer."""
    status, headers, body = _parse(raw)
    assert headers.get("content-type") == "application/json", (status, headers, body[:200])
    error = json.loads(body)["errors"][0]
    return status, error["code"], error["message"]




def _token(docxy: Docxy, repository: str) -> str:
    query = urlencode({"scope": f"repository:{repository}:pull"})
    status, _, body = docxy.request(f"/auth/token?{query}")
    assert status == 200, body[:300]
    return json.loads(body)["token"]


def _normal_pull_works(docxy: Docxy, upstream) -> None:
    """A client right after the bad one: token, manifest and a blob of alpine."""
    image = upstream.images.alpine
    auth = {"Authorization": f"Bearer {_token(docxy, image.short_name)}"}
    status, _, body = docxy.request(f"/v2/{image.short_name}/manifests/{image.tag}",
                               {**auth, "Accept": image.media_type})
    assert status == 200 and hashlib.sha256(body).hexdigest() == image.digest.split(":")[1]
    blob = image.blobs[0]
    status, _, body = docxy.request(f"/v2/{image.short_name}/blobs/{blob.digest}", auth)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest


def _upstream_requests(upstream) -> int:
    return len(upstream.registry_log_entries()) + len(upstream.token_log_entries())


# --- slowloris ----------------------------------------------------------------------------

def _trickle(docxy: Docxy, opening: bytes, byte: bytes, limit: float = 20) -> tuple[float, bytes]:
    """Send `opening`, then `byte` every half second until docxy closes the connection;
    returns (seconds until it did, what it answered)."""
    received = b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", docxy.port), timeout=10) as sock:
        sock.sendall(opening)
        sock.settimeout(0.5)
        while time.monotonic() - started < limit:
            try:
                sock.sendall(byte)
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return time.monotonic() - started, received


@pytest.mark.parametrize("opening, byte", [
    (b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Trickle: ", b"a"),
    (b"G", b"E"),  # even the request line
    (b"POST /auth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n", b"a"),  # a body
], ids=["headers", "request-line", "body"])
def test_slowloris_is_cut_at_the_request_timeout(docxy, upstream, opening, byte):
    """A client trickling its request a byte every half second is answered 408 and
    disconnected after --request-timeout (3 s), while others are served meanwhile."""
    elapsed, answer = _trickle(docxy, opening, byte)
    assert elapsed < REQUEST_TIMEOUT + LINGER + 3, f"cut only after {elapsed:.1f}s"
    assert elapsed >= REQUEST_TIMEOUT - 0.5, f"cut too early ({elapsed:.1f}s)"
    status, code, _ = _json_error(answer)
    assert status == 408 and code == "TIMEOUT"
    _normal_pull_works(docxy, upstream)


def test_other_clients_are_served_during_a_slowloris(docxy, upstream):
    """Twenty trickling connections do not keep a normal client from pulling."""
    socks = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", docxy.port), timeout=10)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        started = time.monotonic()
        _normal_pull_works(docxy, upstream)
        assert time.monotonic() - started < REQUEST_TIMEOUT, "the pull waited for the slow clients"
    finally:
        for sock in socks:
            sock.close()


# --- oversized requests -------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * (1 << 20) + b"\r\n",  # one header of 1 MB
    (b"X-Many: " + b"b" * 1000 + b"\r\n") * 1024,  # 1 MB of headers
], ids=["one-header", "many-headers"])
def test_a_megabyte_of_headers_is_refused(docxy, upstream, headers):
    """1 MB of request headers gets 431 with a JSON error; the next client pulls."""
    answer = _raw(docxy, b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
    status, code, message = _json_error(answer)
    assert status == 431 and code == "SIZE_INVALID", message
    _normal_pull_works(docxy, upstream)


def test_a_huge_request_line_or_body_is_refused(docxy, upstream):
    """A 100 kB request line gets 414, a body announced at 10 GB (or 5000 digits) 413."""
    answer = _raw(docxy, b"GET /v2/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _json_error(answer)[:2] == (414, "SIZE_INVALID")
    for length in (b"10000000000", b"9" * 5000):
        answer = _raw(docxy, b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                      + b"\r\n\r\nscope=x")
        assert _json_error(answer)[:2] == (413, "SIZE_INVALID")
    _normal_pull_works(docxy, upstream)


# --- path tricks and invalid UTF-8 --------------------------------------------------------

@pytest.mark.parametrize("target", [
    b"/v2/../v2/_catalog",
    b"/v2/library/../private/secret/manifests/latest",
    b"/v2/foo/..%2F..%2Fv2%2F_catalog/manifests/x",
    b"/v2/foo%2Fbar/manifests/latest",
    b"/v2/%2e%2e/%2e%2e/manifests/x",
    b"/v2/alpine/manifests/..",
    b"/v2/alpine/blobs/sha256:..%2F..%2Fetc%2Fpasswd",
    b"/v2//alpine/manifests/latest",
    b"/%2e%2e/%2e%2e/etc/passwd",
    b"/auth/token/..%2F..%2Fetc",
    b"/v2/\xff\xfe/manifests/latest",  # raw bytes that are not UTF-8
    b"/v2/%ff%fe/manifests/latest",  # the same, percent-encoded
    b"/v2/al%C3%28pine/manifests/latest",  # an invalid UTF-8 sequence
    b"/v2/alpine/manifests/latest?ns=%ff%fe",
    b"/auth/token?scope=repository:%ff%fe:pull",
    b"/auth/token?scope=repository:..%2F..:pull",
], ids=lambda t: t.decode("latin-1"))
def test_path_tricks_and_invalid_utf8_get_json_errors(docxy, upstream, target):
    """`..`, encoded slashes and invalid UTF-8 get a 4xx registry error; nothing reaches the upstream."""
    time.sleep(0.5)  # let the upstream's logs catch up with the test before
    before = _upstream_requests(upstream)
    answer = _raw(docxy, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, code, message = _json_error(answer)
    assert 400 <= status < 500, (status, code, message)
    time.sleep(0.5)  # nginx logs after answering
    assert _upstream_requests(upstream) == before, "a bad request reached the upstream"
    _normal_pull_works(docxy, upstream)


def test_invalid_utf8_in_headers_and_forms(docxy, upstream):
    """A Host of invalid UTF-8 and token forms of invalid UTF-8 get clear answers, never a 5xx."""
    answer = _raw(docxy, b"GET /v2/alpine/manifests/latest HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n")
    status, _, _ = _parse(answer)
    assert status in (200, 401, 404), status
    for form in (b"scope=repository%3A%ff%fe%3Apull", b"scope=repository:\xff\xfe:pull"):
        status, headers, body = docxy.request("/auth/token", method="POST", body=form,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 400, body
        assert headers["Content-Type"] == "application/json"
    _normal_pull_works(docxy, upstream)


# --- an oversized manifest ----------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    with FaultServer(tmp_path_factory.mktemp("faultserver")) as server:
        yield server


def test_manifest_larger_than_the_cap_is_refused_and_not_cached(faulty, tmp_path):
    """A 5 MiB manifest (with or without Content-Length, by tag or digest) gets a JSON
    error; nothing of it is cached; the next manifest pulls."""
    cache = tmp_path / "cache"
    huge = faulty.content.manifests[("fault/huge", "v1")]
    digest = "sha256:" + hashlib.sha256(huge).hexdigest()
    args = ["--upstream", faulty.url, "--no-library", "--cache-dir", str(cache)]
    with Docxy(tmp_path / "docxy", args) as docxy:
        for ref in ("v1", "chunked", digest):
            status, headers, body = docxy.request(f"/v2/fault/huge/manifests/{ref}")
            assert status == 502, (ref, status, body[:200])
            assert headers["Content-Type"] == "application/json"
            error = json.loads(body)["errors"][0]
            assert error["code"] == "MANIFEST_INVALID" and "4 MiB" in error["message"]
        assert not (cache / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
        assert not (cache / "tags").exists() or not list((cache / "tags").rglob("huge"))
        assert list((cache / "partial").iterdir()) == []
        status, _, body = docxy.request("/v2/fault/app/manifests/v1")
        assert status == 200 and body == faulty.content.manifests[("fault/app", "v1")]


# --- absurd ranges ------------------------------------------------------------------------

HUGE = "9" * 5000  # more digits than Python's int() takes


def _ranges(size: int) -> list[tuple[str, tuple[int, ...], slice]]:
    """(Range header, acceptable statuses, the bytes a 200/206 must carry)."""
    whole = slice(0, size)
    return [
        ("bytes=-0", (416,), whole),
        ("bytes=-1", (206,), slice(size - 1, size)),
        ("bytes=5-2", (200,), whole),
        ("bytes=-5-10", (200,), whole),
        ("bytes=--1", (200,), whole),
        ("bytes=abc", (200,), whole),
        ("items=0-1", (200,), whole),
        ("bytes=0-1,5-6", (200,), whole),
        (f"bytes={size}-", (416,), whole),
        ("bytes=99999999999999999999-", (416,), whole),
        (f"bytes={HUGE}-", (416, 200), whole),
        (f"bytes=0-{HUGE}", (206, 200), whole),
        (f"bytes=-{HUGE}", (206, 200), whole),
    ]


def test_negative_or_huge_ranges_of_a_cached_blob(docxy, upstream):
    """Every absurd Range on a cached blob is answered 416 or with the right bytes, never a 5xx."""
    image = upstream.images.namespaced
    blob = max(image.blobs, key=lambda b: b.size)
    path = f"/v2/{image.short_name}/blobs/{blob.digest}"
    auth = {"Authorization": f"Bearer {_token(docxy, image.short_name)}"}
    # The first (uncached) request starts the download with an absurd range too.
    status, _, data = docxy.request(path, {**auth, "Range": f"bytes=-{HUGE}"})
    assert status in (200, 206) and "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
    for header, statuses, part in _ranges(len(data)):
        status, headers, body = docxy.request(path, {**auth, "Range": header})
        assert status in statuses, (header[:40], status, body[:200])
        if status in (200, 206):
            assert body == data[part], header[:40]
    _normal_pull_works(docxy, upstream)


def test_negative_or_huge_ranges_relayed_without_cache(docxy_no_cache, upstream):
    """Without the cache the Range goes to the CDN: any answer but a 5xx, and docxy keeps serving."""
    image = upstream.images.namespaced
    blob = max(image.blobs, key=lambda b: b.size)
    path = f"/v2/{image.short_name}/blobs/{blob.digest}"
    auth = {"Authorization": f"Bearer {_token(docxy_no_cache, image.short_name)}"}
    for header, _, _ in _ranges(blob.size):
        status, _, body = docxy_no_cache.request(path, {**auth, "Range": header})
        assert status < 500, (header[:40], status, body[:200])
    _normal_pull_works(docxy_no_cache, upstream)


# --- a Host naming another site -----------------------------------------------------------

def _forged(docxy: Docxy, path: str, host: str, forwarded: str, context=None):
    """GET `path` with this Host and X-Forwarded-Host (HTTPS when given a context)."""
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=30)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", docxy.tls_port, context=context, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host)
    conn.putheader("X-Forwarded-Host", forwarded)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def _assert_own_realm(response, body: bytes, realm: str) -> None:
    if response.status == 404:  # a Host that is not docxy's selects no registry at all
        assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
        assert response.getheader("WWW-Authenticate") is None
        return
    assert response.status == 401, (response.status, body[:200])
    challenge = response.getheader("WWW-Authenticate")
    assert f'realm="{realm}"' in challenge and "evil" not in challenge, challenge


def test_forged_host_changes_no_realm_and_no_redirect(docxy_plain, docxy_tls, upstream):
    """A Host (and X-Forwarded-Host) naming another site: challenges still send clients to
    docxy's own realm (or name no registry), and the plain port still redirects to docxy's
    own HTTPS URL."""
    context = ssl.create_default_context(cafile=str(upstream.ca_path))
    for path in ("/v2/", "/v2/alpine/manifests/latest"):
        response, body = _forged(docxy_plain, path, "evil.example.net", "evil.example.net")
        assert response.status == 401
        _assert_own_realm(response, body, f"{docxy_plain.url}/auth/token")
        own_host = f"127.0.0.1:{docxy_tls.tls_port}"
        for host in (own_host, "evil.example.net", "evil.example.net:443"):
            response, body = _forged(docxy_tls, path, host, "evil.example.net", context)
            _assert_own_realm(response, body, f"{docxy_tls.url}/auth/token")
            if host == own_host:
                assert response.status == 401
    conn = http.client.HTTPConnection("127.0.0.1", docxy_tls.port, timeout=30)
    conn.putrequest("GET", "/v2/alpine/manifests/latest", skip_host=True)
    conn.putheader("Host", "evil.example.net:8443")
    conn.putheader("X-Forwarded-Host", "evil.example.net")
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status in (301, 308)
    assert response.getheader("Location") == f"{docxy_tls.url}/v2/alpine/manifests/latest"


# --- a token request with a thousand scopes -----------------------------------------------

def test_token_request_with_a_thousand_scopes_is_refused_locally(docxy, upstream):
    """1 000 scopes (POST form, or a GET too long to read) and 101 short ones are refused
    with a 4xx JSON error without asking the token service; 100 are still forwarded."""
    before = len(upstream.token_log_entries())
    scopes = [("scope", f"repository:org/app{i}:pull") for i in range(1000)]
    status, headers, body = docxy.request("/auth/token", method="POST",
                                     body=urlencode(scopes).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DENIED", body[:300]
    assert "100" in json.loads(body)["errors"][0]["message"]

    answer = _raw(docxy, f"GET /auth/token?{urlencode(scopes)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _json_error(answer)[:2] == (414, "SIZE_INVALID")

    short = [("scope", f"repository:a{i}:pull") for i in range(101)]
    status, _, body = docxy.request(f"/auth/token?{urlencode(short)}")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DENIED", body[:300]
    one_value = [("scope", " ".join(f"repository:a{i}:pull" for i in range(101)))]
    status, _, body = docxy.request(f"/auth/token?{urlencode(one_value)}")
    assert status == 400, body[:300]
    time.sleep(0.5)
    assert len(upstream.token_log_entries()) == before, "a refused token request went upstream"

    status, _, body = docxy.request(f"/auth/token?{urlencode(short[:100])}")
    assert status == 200, body[:300]
    _normal_pull_works(docxy, upstream)
