"""Pure functions for the registry's naming rules: the route grammar of pull paths, the
`library/` rule for Docker Hub's official images, and token-scope rewriting.

Nothing here does I/O; every function is table-tested in tests/unit/test_names.py.
"""
from __future__ import annotations

import re

import attrs

# The distribution reference grammar (distribution/reference/regexp.go).  The name
# components are separated by '/', so a name may have any number of them: we route on the
# raw path with this pattern, never on URL segments.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}"

NAME_MAX = 255  # distribution's limit on a whole repository name
PATH_MAX = 2048  # anything longer is not a pull path; refuse before matching

_NAME_RE = re.compile(NAME)
_TAG_RE = re.compile(TAG)
_DIGEST_RE = re.compile(DIGEST)
_KNOWN_DIGESTS = {"sha256": 64, "sha384": 96, "sha512": 128}

_ROUTE_RE = re.compile(
    rf"^/v2/(?P<name>{NAME})/(?P<kind>manifests|blobs|tags|referrers)/(?P<ref>[^/]+)$"
)


class InvalidRequest(ValueError):
    """A request that breaks the registry grammar; `code` is the registry error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@attrs.frozen
class Route:
    """A parsed pull request path: `kind` is manifests, blobs, tags or referrers (the OCI
    1.1 referrers API, whose reference is the subject's digest)."""

    name: str
    kind: str
    reference: str

    @property
    def is_digest(self) -> bool:
        return ":" in self.reference


def is_valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX and _NAME_RE.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return _TAG_RE.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    if _DIGEST_RE.fullmatch(digest) is None:
        return False
    algorithm, _, hex_part = digest.partition(":")
    expected = _KNOWN_DIGESTS.get(algorithm)
    if expected is None:
        return True  # an algorithm we do not know: the grammar is all we can check
    return len(hex_part) == expected and re.fullmatch(r"[a-f0-9]+", hex_part) is not None


def parse_route(path: bytes) -> Route:
    """Parse the raw request path of a pull request, or raise InvalidRequest.

    The path is the raw one from the request line: `%2F`, `..` and `//` never match the
    grammar, so they cannot reach another upstream path.
    """
    if len(path) > PATH_MAX:
        raise InvalidRequest("NAME_INVALID", "request path too long")
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidRequest("NAME_INVALID", "invalid repository name") from None
    match = _ROUTE_RE.fullmatch(text)
    if match is None:
        raise InvalidRequest("NAME_INVALID", "invalid repository name or path", 404)
    name, kind, ref = match.group("name", "kind", "ref")
    if len(name) > NAME_MAX:
        raise InvalidRequest("NAME_INVALID", "repository name too long")
    if kind == "tags":
        if ref != "list":
            raise InvalidRequest("UNSUPPORTED", "unknown tags endpoint", 404)
    elif kind == "blobs":
        if not is_valid_digest(ref):
            # No blob has that name: "not found", as the distribution spec answers.
            raise InvalidRequest("BLOB_UNKNOWN", "blob unknown: not a digest", 404)
    elif kind == "referrers":
        if not is_valid_digest(ref):
            # The spec names no "not found" for a subject: only a digest can be one.
            raise InvalidRequest("DIGEST_INVALID", "invalid digest: the subject of "
                                 "referrers must be a digest")
    elif not (is_valid_digest(ref) if ":" in ref else is_valid_tag(ref)):
        # Neither a tag nor a digest: no such manifest can exist (the OCI conformance
        # suite asks for `.INVALID_MANIFEST_NAME` and expects 404).
        raise InvalidRequest("MANIFEST_UNKNOWN", "manifest unknown: not a tag or a digest", 404)
    return Route(name=name, kind=kind, reference=ref)


def upstream_name(name: str, library: bool) -> str:
    """The repository name as the upstream knows it: bare names are official images
    under `library/` on Docker Hub."""
    if library and "/" not in name:
        return f"library/{name}"
    return name


def upstream_path(route: Route, library: bool) -> str:
    return f"/v2/{upstream_name(route.name, library)}/{route.kind}/{route.reference}"


def rewrite_scope(scope: str, library: bool, strip: str | None = None) -> str:
    """Rewrite one `scope` value, which may hold several space-separated scopes, into the
    upstream's names: `strip` (a path prefix like `ghcr.io/`) is taken off, and
    `repository:redis:pull` becomes `repository:library/redis:pull`.  Anything that is not
    a repository scope with a valid name is passed through unchanged."""
    return " ".join(_map_scope_name(s, lambda n: scope_name(n, library, strip))
                    for s in scope.split(" "))


def scope_name(name: str, library: bool, strip: str | None = None) -> str:
    """A repository name from a client's token scope, as the upstream names it."""
    return upstream_name(_strip(name, strip), library)


def prefix_scope(scope: str, prefix: str) -> str:
    """The client's view of an upstream scope when the client names the repository with a
    path prefix: `repository:org/app:pull` becomes `repository:ghcr.io/org/app:pull`."""
    return " ".join(_map_scope_name(s, lambda n: prefix + n) for s in scope.split(" "))


def _strip(name: str, prefix: str | None) -> str:
    if prefix and name.startswith(prefix) and len(name) > len(prefix):
        return name[len(prefix):]
    return name


def _map_scope_name(scope: str, change) -> str:
    parts = scope.split(":")
    # repository:NAME:ACTIONS, or repository(plugin):NAME:ACTIONS; a name has no ':'.
    if len(parts) != 3 or not parts[0].startswith("repository"):
        return scope
    resource_type, name, actions = parts
    if not is_valid_name(name):
        return scope
    return f"{resource_type}:{change(name)}:{actions}"


def scope_repositories(scope: str) -> list[str]:
    """The repository names that a `scope` value asks for, in order."""
    names = []
    for one in scope.split(" "):
        parts = one.split(":")
        if len(parts) == 3 and parts[0].startswith("repository"):
            names.append(parts[1])
    return names
