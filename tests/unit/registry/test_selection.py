"""Which upstream a request is for: ns, then path prefix, then Host, then the default."""
import pytest

from docxy.registry.names import InvalidRequest
from docxy.registry.presets import PRESETS, Upstream
from docxy.registry.selection import NotMirrored, UpstreamTable

HUB = PRESETS["docker.io"]
GHCR = Upstream("ghcr.io", "https://ghcr.io", prefixes=("ghcr",), hosts=("ghcr.mirror.example",))
CORP = Upstream("corp.example", "https://corp.example", hosts=("corp.mirror.example:8443",))
TABLE = UpstreamTable((HUB, GHCR, CORP), "docker.io", ("mirror.example",))

M = b"/manifests/latest"


@pytest.mark.parametrize(
    "path, ns, host, upstream, via, upstream_path",
    [
        # 1. ns wins over everything, and the path is the upstream's as it is
        (b"/v2/library/alpine" + M, "docker.io", "ghcr.mirror.example", "docker.io", "ns", None),
        (b"/v2/org/app" + M, "ghcr.io", None, "ghcr.io", "ns", None),
        (b"/v2/ghcr.io/x/y" + M, "docker.io", None, "docker.io", "ns", None),
        (b"/v2/org/app" + M, "index.docker.io", None, "docker.io", "ns", None),
        (b"/v2/org/app" + M, "GHCR.IO", None, "ghcr.io", "ns", None),
        # 2. a path prefix (the upstream's name, or a configured one) is taken off
        (b"/v2/ghcr.io/org/app" + M, None, "mirror.example", "ghcr.io", "prefix", b"/v2/org/app" + M),
        (b"/v2/ghcr/org/app" + M, None, None, "ghcr.io", "prefix", b"/v2/org/app" + M),
        (b"/v2/docker.io/alpine" + M, None, None, "docker.io", "prefix", b"/v2/alpine" + M),
        (b"/v2/ghcr.io/org/app" + M, None, "corp.mirror.example:8443", "ghcr.io", "prefix", b"/v2/org/app" + M),
        # a prefix needs a name after it: /v2/ghcr/manifests/latest is Hub's library/ghcr
        (b"/v2/ghcr" + M, None, None, "docker.io", "default", None),
        # 3. the Host the request was sent to (with or without its port)
        (b"/v2/org/app" + M, None, "ghcr.mirror.example", "ghcr.io", "host", None),
        (b"/v2/org/app" + M, None, "GHCR.mirror.example:443", "ghcr.io", "host", None),
        (b"/v2/org/app" + M, None, "corp.mirror.example:8443", "corp.example", "host", None),
        # 4. the default: docxy's own names, addresses, localhost, no Host at all
        (b"/v2/org/app" + M, None, "mirror.example", "docker.io", "default", None),
        (b"/v2/org/app" + M, None, "127.0.0.1:5000", "docker.io", "default", None),
        (b"/v2/org/app" + M, None, "[::1]:5000", "docker.io", "default", None),
        (b"/v2/org/app" + M, None, "localhost", "docker.io", "default", None),
        (b"/v2/org/app" + M, None, None, "docker.io", "default", None),
        (b"/v2/", None, "ghcr.mirror.example", "ghcr.io", "host", None),
        (b"/v2/", "ghcr.io", None, "ghcr.io", "ns", None),
    ],
)
def test_selection_order(path, ns, host, upstream, via, upstream_path):
    selection = TABLE.select(path, ns, host)
    assert (selection.upstream.name, selection.via) == (upstream, via)
    assert selection.path == (upstream_path or path)


@pytest.mark.parametrize(
    "path, ns, host, message",
    [
        (b"/v2/x/y" + M, "evil.example", None, "registry 'evil.example' is not mirrored here"),
        (b"/v2/x/y" + M, "", "evil.example", "host 'evil.example' is not a registry mirrored here"),
        (b"/v2/quay.io/org/app" + M, None, None, "registry 'quay.io' is not mirrored here"),
        (b"/v2/", None, "evil.example:443", "host 'evil.example'"),
    ],
)
def test_unconfigured_registries_are_refused(path, ns, host, message):
    """An unknown ns, a registry-like prefix docker.io cannot have, or a foreign Host is
    refused with NAME_UNKNOWN (404): nothing is asked of any upstream."""
    with pytest.raises(NotMirrored) as info:
        TABLE.select(path, ns, host)
    assert info.value.code == "NAME_UNKNOWN" and info.value.status == 404
    assert message in info.value.message


def test_dotted_first_component_passes_to_a_default_that_allows_it():
    """Only docker.io, ghcr.io and quay.io forbid dots in namespaces; another default
    upstream gets `/v2/my.team/app/...` as it is."""
    table = UpstreamTable((CORP, GHCR), "corp.example")
    selection = table.select(b"/v2/my.team/app" + M, None, None)
    assert selection.upstream is CORP and selection.path == b"/v2/my.team/app" + M


def test_without_own_names_any_host_gets_the_default():
    """Behind a proxy with no --public-url or --server-name, docxy cannot tell its own
    names from others: a Host that selects nothing gets the default."""
    table = UpstreamTable((HUB, GHCR), "docker.io")
    assert table.select(b"/v2/x/y" + M, None, "whatever.example").upstream is HUB
    assert table.select(b"/v2/x/y" + M, None, "ghcr.mirror.example").upstream is GHCR


def test_realm_and_scope_prefix_follow_the_selection():
    """ns and Host get a named token endpoint; a prefix keeps the plain one and shows the
    client its scopes with the prefix."""
    assert TABLE.select(b"/v2/", "ghcr.io", None).realm_path == "/auth/token/ghcr.io"
    assert TABLE.select(b"/v2/", None, "ghcr.mirror.example").realm_path == "/auth/token/ghcr.io"
    prefixed = TABLE.select(b"/v2/ghcr/org/app" + M, None, None)
    assert prefixed.realm_path == "/auth/token" and prefixed.scope_prefix == "ghcr/"
    assert TABLE.select(b"/v2/org/app" + M, None, None).scope_prefix is None


@pytest.mark.parametrize(
    "realm_name, names, upstream, prefix",
    [
        ("ghcr.io", ["org/app"], "ghcr.io", None),
        ("ghcr.io", ["ghcr.io/org/app"], "ghcr.io", None),  # a named realm strips nothing
        (None, ["library/alpine", "org/app"], "docker.io", None),
        (None, [], "docker.io", None),
        (None, ["ghcr.io/org/app"], "ghcr.io", "ghcr.io"),
        (None, ["ghcr/org/app", "ghcr/org/other"], "ghcr.io", "ghcr"),
        (None, ["docker.io/library/alpine"], "docker.io", "docker.io"),
        (None, ["ghcr"], "docker.io", None),  # a bare name is Hub's library/ghcr
    ],
)
def test_token_selection(realm_name, names, upstream, prefix):
    chosen, strip = TABLE.select_token(realm_name, names)
    assert (chosen.name, strip) == (upstream, prefix)


def test_token_requests_naming_unknown_or_several_registries_are_refused():
    with pytest.raises(NotMirrored):
        TABLE.select_token("evil.example", ["x/y"])
    with pytest.raises(NotMirrored):
        TABLE.select_token(None, ["quay.io/org/app"])
    with pytest.raises(InvalidRequest, match="one registry only"):
        TABLE.select_token(None, ["ghcr.io/org/app", "library/alpine"])
