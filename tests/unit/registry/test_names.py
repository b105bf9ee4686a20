"""The registry grammar and the library/ rule, table-driven."""
import pytest

from docxy.registry.names import (
    InvalidRequest,
    Route,
    is_valid_digest,
    is_valid_name,
    is_valid_tag,
    parse_route,
    rewrite_scope,
    scope_repositories,
    upstream_name,
    upstream_path,
)

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "path, route",
    [
        (b"/v2/redis/manifests/latest", Route("redis", "manifests", "latest")),
        (b"/v2/library/redis/manifests/7.2", Route("library/redis", "manifests", "7.2")),
        (b"/v2/org/app/blobs/" + D.encode(), Route("org/app", "blobs", D)),
        (b"/v2/a/b/c/d/e/manifests/" + D.encode(), Route("a/b/c/d/e", "manifests", D)),
        (b"/v2/org/app/tags/list", Route("org/app", "tags", "list")),
        (b"/v2/my-app_x.y/manifests/v1.0_rc-1", Route("my-app_x.y", "manifests", "v1.0_rc-1")),
        # a component named like an endpoint is still part of the name
        (b"/v2/x/manifests/y/manifests/t", Route("x/manifests/y", "manifests", "t")),
        (b"/v2/a__b/manifests/t", Route("a__b", "manifests", "t")),
    ],
)
def test_valid_paths_parse(path, route):
    """Every name the distribution grammar allows routes, with any number of slashes."""
    assert parse_route(path) == route


@pytest.mark.parametrize(
    "path, code, status",
    [
        (b"/v2/../etc/manifests/latest", "NAME_INVALID", 404),
        (b"/v2/foo/..%2Fbar/manifests/x", "NAME_INVALID", 404),
        (b"/v2/foo%2Fbar/manifests/x", "NAME_INVALID", 404),
        (b"/v2/foo//bar/manifests/x", "NAME_INVALID", 404),
        (b"/v2/Foo/manifests/x", "NAME_INVALID", 404),
        (b"/v2/foo/manifests/", "NAME_INVALID", 404),
        (b"/v2/foo-/manifests/x", "NAME_INVALID", 404),
        # references that cannot exist are "not found" (OCI distribution spec, pull)
        (b"/v2/foo/manifests/-bad", "MANIFEST_UNKNOWN", 404),
        (b"/v2/foo/manifests/.INVALID_MANIFEST_NAME", "MANIFEST_UNKNOWN", 404),
        (b"/v2/foo/manifests/" + b"t" * 129, "MANIFEST_UNKNOWN", 404),
        (b"/v2/foo/manifests/sha256:totallywrong", "MANIFEST_UNKNOWN", 404),
        (b"/v2/foo/manifests/sha256:" + b"0" * 63, "MANIFEST_UNKNOWN", 404),
        (b"/v2/foo/blobs/latest", "BLOB_UNKNOWN", 404),
        (b"/v2/foo/blobs/sha256:abc", "BLOB_UNKNOWN", 404),
        (b"/v2/foo/blobs/sha256:" + b"A" * 64, "BLOB_UNKNOWN", 404),
        (b"/v2/foo/tags/other", "UNSUPPORTED", 404),
        (b"/v2/caf\xc3\xa9/manifests/x", "NAME_INVALID", 400),
        (b"/v2/" + b"a/" * 1100 + b"manifests/x", "NAME_INVALID", 400),
        (b"/v2/" + b"a" * 256 + b"/manifests/x", "NAME_INVALID", 400),
    ],
)
def test_invalid_paths_refused(path, code, status):
    """Bad names are refused with NAME_INVALID; a tag or digest outside the grammar is
    a manifest or blob that cannot exist: 404 MANIFEST_UNKNOWN / BLOB_UNKNOWN."""
    with pytest.raises(InvalidRequest) as info:
        parse_route(path)
    assert (info.value.code, info.value.status) == (code, status)


def test_pathological_name_is_fast():
    """A long almost-valid name does not make the matcher backtrack for ages."""
    import time

    path = b"/v2/" + b"a-" * 120 + b"!/manifests/x"
    start = time.perf_counter()
    with pytest.raises(InvalidRequest):
        parse_route(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "name, library, expected",
    [
        ("redis", True, "library/redis"),
        ("redis", False, "redis"),
        ("org/app", True, "org/app"),
        ("library/redis", True, "library/redis"),
    ],
)
def test_library_rule(name, library, expected):
    """Bare names are official images under library/ only when the rule is on."""
    assert upstream_name(name, library) == expected


def test_upstream_path_uses_library_rule():
    """The upstream path carries the library/ prefix for a bare name."""
    assert upstream_path(Route("redis", "blobs", D), True) == f"/v2/library/redis/blobs/{D}"


@pytest.mark.parametrize(
    "scope, expected",
    [
        ("repository:redis:pull", "repository:library/redis:pull"),
        ("repository:org/app:pull", "repository:org/app:pull"),
        ("repository:redis:pull,push", "repository:library/redis:pull,push"),
        (
            "repository:redis:pull repository:org/x:pull",
            "repository:library/redis:pull repository:org/x:pull",
        ),
        ("registry:catalog:*", "registry:catalog:*"),
        ("repository(plugin):redis:pull", "repository(plugin):library/redis:pull"),
        ("repository:Bad Name:pull", "repository:Bad Name:pull"),
        ("garbage", "garbage"),
    ],
)
def test_scope_rewrite(scope, expected):
    """Each space-separated scope gets library/ on a bare repository name, in order."""
    assert rewrite_scope(scope, True) == expected


def test_scope_rewrite_off():
    """Without the library rule scopes are untouched."""
    assert rewrite_scope("repository:redis:pull", False) == "repository:redis:pull"


def test_scope_repositories():
    assert scope_repositories("repository:a:pull registry:catalog:* repository:b/c:pull") == [
        "a",
        "b/c",
    ]


def test_digest_and_name_checks():
    assert is_valid_digest(D)
    assert is_valid_digest("sha512:" + "b" * 128)
    assert not is_valid_digest("sha512:" + "b" * 64)
    assert is_valid_name("a/b-c/d__e")
    assert not is_valid_name("a" * 256)


HEX = "b" * 64


@pytest.mark.parametrize(
    "tag",
    [
        f"sha256-{HEX}",  # the referrers tag schema (OCI distribution spec 1.1): an index
        f"sha256-{HEX}.sig",  # cosign's signature tag
        f"sha256-{HEX}.att",  # cosign's attestation tag
        f"sha256-{HEX}.sbom",
        "sha512-" + "c" * 121,  # 128 characters: the longest tag there is
    ],
)
def test_referrers_tag_schema_tags_are_tags(tag):
    """The tags signing tools push where a registry has no referrers API are ordinary tags:
    they route as manifests by tag, like any other."""
    assert is_valid_tag(tag)
    path = f"/v2/org/app/manifests/{tag}".encode()
    assert parse_route(path) == Route("org/app", "manifests", tag)
    assert not parse_route(path).is_digest


def test_a_tag_past_128_characters_is_no_tag():
    assert not is_valid_tag("sha512-" + "c" * 122)


@pytest.mark.parametrize(
    "path, route",
    [
        (f"/v2/org/app/referrers/sha256:{HEX}".encode(), Route("org/app", "referrers", f"sha256:{HEX}")),
        (f"/v2/alpine/referrers/sha256:{HEX}".encode(), Route("alpine", "referrers", f"sha256:{HEX}")),
        # a component named like the endpoint is still part of the name
        (f"/v2/x/referrers/y/referrers/sha256:{HEX}".encode(),
         Route("x/referrers/y", "referrers", f"sha256:{HEX}")),
    ],
)
def test_referrers_paths_parse(path, route):
    """`/v2/<name>/referrers/<digest>` (OCI 1.1) routes, with the upstream path as is."""
    assert parse_route(path) == route
    assert upstream_path(route, True).endswith(f"/referrers/sha256:{HEX}")


@pytest.mark.parametrize(
    "ref",
    [b"latest", b"sha256:abc", b"sha256:" + b"A" * 64, f"sha256-{HEX}".encode(), b"sha256:" + b"0" * 63],
)
def test_referrers_of_no_digest_are_refused(ref):
    """The subject of referrers must be a digest: anything else is 400 DIGEST_INVALID."""
    with pytest.raises(InvalidRequest) as info:
        parse_route(b"/v2/org/app/referrers/" + ref)
    assert (info.value.code, info.value.status) == ("DIGEST_INVALID", 400)
