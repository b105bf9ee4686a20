"""Referrers (OCI 1.1) through the resource tree and the cache, in memory: relayed with the
client's credential and filter, refused before anything goes upstream when the digest or
filter is bad, kept and served stale while the upstream is down, filtered here then."""
import hashlib
import json
from urllib.parse import quote

from docxy.cache.referrers import ReferrersCache
from docxy.upstream.errors import UpstreamError

from ..fakes import FakeResponse, FakeUpstream, get, hub_config, make_site

INDEX_TYPE = b"application/vnd.oci.image.index.v1+json"
NOTATION = "application/vnd.cncf.notary.signature"
COSIGN = "application/vnd.dev.cosign.artifact.sig.v1+json"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
SUBJECT = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
SIG1 = "sha256:" + "1" * 64
SIG2 = "sha256:" + "2" * 64


def _descriptor(digest, artifact_type):
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
            "size": 500, "artifactType": artifact_type, "annotations": {"k": "v"}}


ALL = [_descriptor(SIG1, NOTATION), _descriptor(SIG2, COSIGN)]


def _index(descriptors):
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE.decode(),
                       "manifests": descriptors}).encode()


class Upstream:
    """A registry with the referrers API (filters applied unless `filters` is off), one
    manifest `x:t` (the subject); `state` switches it: "up", "down" (unreachable), "503",
    "no-api" (404 for referrers), "401"."""

    def __init__(self, filters=True):
        self.state = "up"
        self.filters = filters
        self.fake = FakeUpstream(self.respond)

    def respond(self, method, url, headers, body):
        if self.state == "down":
            return UpstreamError(502, "UNAVAILABLE", "upstream unreachable")
        if self.state == "503":
            return FakeResponse(503, {b"content-type": b"application/json"}, b"{}")
        if self.state == "401" or (self.state == "private" and not headers.hasHeader(b"authorization")):
            return FakeResponse(401, {b"www-authenticate": b'Bearer realm="https://auth.test/token",'
                                      b'service="registry.test",scope="repository:library/x:pull"',
                                      b"content-type": b"application/json"}, b'{"errors":[]}')
        if "/manifests/" in url:
            hdrs = {b"content-type": b"application/vnd.oci.image.manifest.v1+json",
                    b"docker-content-digest": SUBJECT.encode(),
                    b"content-length": str(len(MANIFEST)).encode()}
            return FakeResponse(200, hdrs, length=0) if method == b"HEAD" else FakeResponse(200, hdrs, MANIFEST)
        if "/referrers/" in url:
            if self.state == "no-api":
                return FakeResponse(404, {b"content-type": b"text/plain"}, b"404 page not found\n")
            wanted = url.partition("artifactType=")[2].replace("%2F", "/").replace("%2B", "+")
            hdrs = {b"content-type": INDEX_TYPE}
            descriptors = ALL
            if wanted and self.filters:
                descriptors = [d for d in ALL if d["artifactType"] == wanted]
                hdrs[b"oci-filters-applied"] = b"artifactType"
            return FakeResponse(200, hdrs, _index(descriptors))
        return FakeResponse(404)

    def referrer_calls(self):
        return [u for u in self.fake.urls() if "/referrers/" in u]


def _site(tmp_path, upstream=None, cache=True):
    upstream = upstream or Upstream()
    config = hub_config(cache_dir=str(tmp_path / "cache")) if cache else hub_config()
    site, _, clock = make_site(config, upstream.fake, with_cache=cache)
    return site, upstream


def _referrers(site, query="", headers=()):
    return get(site, f"/v2/x/referrers/{SUBJECT}{query}", headers).response()


def test_referrers_are_relayed_with_the_index_type(tmp_path):
    """All referrers: the upstream's index, its Content-Type, no OCI-Filters-Applied."""
    site, upstream = _site(tmp_path)
    status, headers, body = _referrers(site)
    assert status == 200 and headers[b"content-type"] == [INDEX_TYPE]
    assert json.loads(body)["manifests"] == ALL
    assert b"oci-filters-applied" not in headers
    assert upstream.referrer_calls() == [f"https://registry.test/v2/library/x/referrers/{SUBJECT}"]


def test_the_artifact_type_filter_goes_upstream_and_its_header_comes_back(tmp_path):
    site, upstream = _site(tmp_path)
    status, headers, body = _referrers(site, f"?artifactType={quote(NOTATION, safe='')}&ns=docker.io")
    assert status == 200 and headers[b"oci-filters-applied"] == [b"artifactType"]
    assert [d["digest"] for d in json.loads(body)["manifests"]] == [SIG1]
    assert upstream.referrer_calls() == [
        f"https://registry.test/v2/library/x/referrers/{SUBJECT}"
        "?artifactType=application%2Fvnd.cncf.notary.signature"]


def test_an_upstream_that_ignores_the_filter_is_relayed_unfiltered(tmp_path):
    """No OCI-Filters-Applied upstream: none here either (the client filters itself)."""
    site, _ = _site(tmp_path, Upstream(filters=False))
    status, headers, body = _referrers(site, f"?artifactType={quote(NOTATION, safe='')}")
    assert status == 200 and b"oci-filters-applied" not in headers
    assert json.loads(body)["manifests"] == ALL


def test_bad_digest_or_filter_never_goes_upstream(tmp_path):
    """400 DIGEST_INVALID for a subject that is no digest, 400 for a filter that is no media
    type: JSON errors, and no request upstream."""
    site, upstream = _site(tmp_path)
    for path in ("/v2/x/referrers/sha256:abc", "/v2/x/referrers/latest",
                 f"/v2/x/referrers/sha256-{SUBJECT[7:]}"):
        status, headers, body = get(site, path).response()
        assert status == 400 and headers[b"content-type"] == [b"application/json"]
        assert json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
    status, _, body = _referrers(site, "?artifactType=nonsense")
    assert status == 400 and b"UNSUPPORTED" in body
    assert upstream.fake.calls == []


def test_a_challenge_is_relayed_with_docxys_realm(tmp_path):
    site, upstream = _site(tmp_path)
    upstream.state = "401"
    status, headers, _ = _referrers(site)
    assert status == 401
    challenge = headers[b"www-authenticate"][0]
    assert b'realm="http://127.0.0.1:5000/auth/token"' in challenge
    assert b"repository:x:pull" in challenge or b"repository:library/x:pull" in challenge


def test_the_clients_credential_goes_upstream(tmp_path):
    site, upstream = _site(tmp_path)
    _referrers(site, headers={"Authorization": "Bearer client-token"})
    sent = [h for _, u, h, _ in upstream.fake.calls if "/referrers/" in u]
    assert sent[0].getRawHeaders(b"authorization") == [b"Bearer client-token"]


def test_a_registry_without_the_api_answers_404(tmp_path):
    """A 404 is relayed as it came, so that the client falls back to the tag schema."""
    site, upstream = _site(tmp_path)
    upstream.state = "no-api"
    status, _, body = _referrers(site)
    assert status == 404 and body == b"404 page not found\n"


def test_kept_referrers_are_served_while_the_upstream_is_down(tmp_path):
    """Unreachable or 503: the last index is served, all of it or filtered here (with
    OCI-Filters-Applied), to the client the upstream said yes to."""
    site, upstream = _site(tmp_path)
    assert _referrers(site)[0] == 200
    for state in ("down", "503"):
        upstream.state = state
        status, headers, body = _referrers(site)
        assert status == 200 and json.loads(body)["manifests"] == ALL
        assert headers[b"content-type"] == [INDEX_TYPE] and b"oci-filters-applied" not in headers
        status, headers, body = _referrers(site, f"?artifactType={quote(COSIGN, safe='')}")
        assert status == 200 and headers[b"oci-filters-applied"] == [b"artifactType"]
        assert [d["digest"] for d in json.loads(body)["manifests"]] == [SIG2]
        assert json.loads(body)["manifests"][0]["annotations"] == {"k": "v"}


def test_an_index_the_upstream_filtered_is_served_as_kept(tmp_path):
    """A client that only ever asked with a filter is served that answer during an outage."""
    site, upstream = _site(tmp_path)
    assert _referrers(site, f"?artifactType={quote(NOTATION, safe='')}")[0] == 200
    upstream.state = "down"
    status, headers, body = _referrers(site, f"?artifactType={quote(NOTATION, safe='')}")
    assert status == 200 and headers[b"oci-filters-applied"] == [b"artifactType"]
    assert [d["digest"] for d in json.loads(body)["manifests"]] == [SIG1]
    assert _referrers(site)[0] == 502, "the unfiltered index was never seen"


def test_a_404_is_answered_again_while_the_upstream_is_down(tmp_path):
    """A registry without the API, then down: its 404 is answered again, so that clients
    still go to the tag schema (served from the cache)."""
    site, upstream = _site(tmp_path)
    assert get(site, "/v2/x/manifests/t").response()[0] == 200  # the upstream's yes
    upstream.state = "no-api"
    assert _referrers(site)[0] == 404
    upstream.state = "down"
    status, headers, body = _referrers(site, f"?artifactType={quote(NOTATION, safe='')}")
    assert status == 404 and headers[b"content-type"] == [b"application/json"]
    assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_nothing_kept_is_served_to_a_client_the_upstream_never_let_in(tmp_path):
    """A private repository: the index kept for one client is not served to another
    (without a credential) while the upstream cannot be asked."""
    site, upstream = _site(tmp_path)
    upstream.state = "private"
    assert _referrers(site, headers={"Authorization": "Bearer alice"})[0] == 200
    assert _referrers(site)[0] == 401
    upstream.state = "down"
    assert _referrers(site, headers={"Authorization": "Bearer alice"})[0] == 200
    status, _, body = _referrers(site)
    assert status == 502 and b"errors" in body


def test_a_paginated_or_foreign_answer_is_relayed_not_kept(tmp_path):
    """An index with a Link (a next page) and a 200 that is not an index are relayed."""
    answers = iter([
        FakeResponse(200, {b"content-type": INDEX_TYPE, b"link": b'</v2/x/referrers/d?n=1>; rel="next"'},
                     _index(ALL[:1])),
        FakeResponse(200, {b"content-type": b"text/html"}, b"<html>"),
    ])
    upstream = Upstream()
    upstream.fake.responder = lambda m, u, h, b: next(answers) if "/referrers/" in u else FakeResponse(404)
    site, _ = _site(tmp_path, upstream)
    status, headers, _ = _referrers(site)
    assert status == 200 and headers[b"link"] == [b'</v2/x/referrers/d?n=1>; rel="next"']
    status, headers, body = _referrers(site)
    assert status == 200 and body == b"<html>"
    assert not list((tmp_path / "cache" / "referrers").rglob("*.json"))


def test_an_index_in_utf16_is_answered_not_kept(tmp_path):
    """JSON may come in UTF-16: answered as it came, not kept (the files hold UTF-8)."""
    body = _index(ALL).decode().encode("utf-16")
    upstream = Upstream()
    upstream.fake.responder = lambda m, u, h, b: FakeResponse(200, {b"content-type": INDEX_TYPE}, body)
    site, _ = _site(tmp_path, upstream)
    status, _, answered = _referrers(site)
    assert status == 200 and answered == body
    assert not list((tmp_path / "cache" / "referrers").rglob("*.json"))


def test_an_index_that_does_not_parse_is_refused(tmp_path):
    upstream = Upstream()
    upstream.fake.responder = lambda m, u, h, b: FakeResponse(
        200, {b"content-type": INDEX_TYPE}, b'{"schemaVersion":2,"manifests":[{"digest":"x"}]}')
    site, _ = _site(tmp_path, upstream)
    status, _, body = _referrers(site)
    assert status == 502 and b"MANIFEST_INVALID" in body


def test_head_answers_the_headers_of_the_get(tmp_path):
    site, _ = _site(tmp_path)
    from ..fakes import Exchange

    ex = Exchange(site)
    ex.send("HEAD", f"/v2/x/referrers/{SUBJECT}")
    status, headers, body = ex.response()
    assert status == 200 and body == b""
    assert int(headers[b"content-length"][0]) == len(_index(ALL))


def test_without_the_cache_referrers_are_relayed(tmp_path):
    site, upstream = _site(tmp_path, cache=False)
    status, headers, body = _referrers(site, f"?artifactType={quote(NOTATION, safe='')}")
    assert status == 200 and headers[b"oci-filters-applied"] == [b"artifactType"]
    assert upstream.referrer_calls()[0].endswith("?artifactType=application%2Fvnd.cncf.notary.signature")
    status, _, _ = get(site, "/v2/x/referrers/sha256:abc").response()
    assert status == 400 and len(upstream.fake.calls) == 1


def test_kept_indexes_are_bounded_least_recently_used_first(tmp_path):
    """Over the bound the least recently used index goes; a restart keeps the rest."""
    from twisted.internet.task import Clock

    body = _index(ALL)
    one = ReferrersCache(tmp_path / "sizing", Clock())
    one._keep(tmp_path / "sizing" / "a.json", body, False)
    bound = 3 * one.total + 10  # room for three
    cache = ReferrersCache(tmp_path / "kept", Clock(), max_total=bound)
    paths = [cache.path("docker.io", "library/x", f"sha256:{i:064d}", None) for i in range(3)]
    for path in paths[:2]:
        cache._keep(path, body, False)
    assert cache.kept("docker.io", "library/x", f"sha256:{0:064d}", None).body == body  # used
    cache._keep(paths[2], body, False)
    cache._keep(cache.path("docker.io", "library/x", "sha256:" + "9" * 64, NOTATION), body, True)
    assert cache.total <= bound and len(list((tmp_path / "kept").rglob("*.json"))) == 3
    assert paths[0].exists() and not paths[1].exists()
    again = ReferrersCache(tmp_path / "kept", Clock(), max_total=bound)
    assert again.total == cache.total
    assert again.kept("docker.io", "library/x", "sha256:" + "9" * 64, NOTATION).filtered
