"""The OCI 1.1 referrers API as pure functions: the `artifactType` filter a client asks for,
the `OCI-Filters-Applied` header that says a registry applied it, and the image index of
referrer descriptors, read, checked and filtered.

Nothing here does I/O (the caching is docxy.cache.referrers); table-tested in
tests/unit/registry/test_referrers.py.
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

from docxy.registry.names import InvalidRequest, is_valid_digest

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
FILTERS_APPLIED = b"oci-filters-applied"
ARTIFACT_TYPE = "artifactType"  # the query parameter, and its name in OCI-Filters-Applied

# A media type (RFC 6838 section 4.2): type/subtype, restricted-name characters only.  A
# filter outside it can match no descriptor, and it is never sent upstream.
_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE_RE = re.compile(rf"{_NAME}/{_NAME}")


class InvalidIndex(ValueError):
    """A body that is not an OCI image index of descriptors."""


def artifact_type_filter(query: list[tuple[str, str]]) -> str | None:
    """The `artifactType` a referrers request asks for (the first one given), or None for
    all referrers; raises InvalidRequest (400) for one that is not a media type."""
    for key, value in query:
        if key == ARTIFACT_TYPE:
            if not _MEDIA_TYPE_RE.fullmatch(value):
                raise InvalidRequest("UNSUPPORTED", "artifactType is not a media type")
            return value
    return None


def referrers_query(artifact_type: str | None) -> str:
    """The query string of the upstream request (`?artifactType=...`, or nothing)."""
    return f"?{urlencode([(ARTIFACT_TYPE, artifact_type)])}" if artifact_type else ""


def filters_applied(values: list[bytes]) -> frozenset[str]:
    """The filters an `OCI-Filters-Applied` header (every line of it) names."""
    return frozenset(
        item.strip().decode("latin-1")
        for value in values
        for item in value.split(b",")
        if item.strip()
    )


def is_index_type(content_type: bytes | None) -> bool:
    """Whether a Content-Type is the OCI image index's (parameters aside): what a registry
    that implements the API answers with, and what clients check before trusting it."""
    if not content_type:
        return False
    return content_type.split(b";")[0].strip().lower() == INDEX_MEDIA_TYPE.encode()


def parse_index(body: bytes) -> dict[str, Any]:
    """The referrers index in `body`, checked: a JSON object of schema version 2 whose
    `manifests` are descriptors (a media type, a valid digest, a size).  Raises InvalidIndex."""
    try:
        index = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidIndex("not JSON") from None
    if not isinstance(index, dict) or index.get("schemaVersion") != 2:
        raise InvalidIndex("not an image index of schema version 2")
    if index.get("mediaType", INDEX_MEDIA_TYPE) != INDEX_MEDIA_TYPE:
        raise InvalidIndex(f"media type {index.get('mediaType')!r} is not an image index's")
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidIndex("no list of manifests")
    for descriptor in manifests:
        if not _is_descriptor(descriptor):
            raise InvalidIndex("a manifest entry is not a descriptor")
    return index


def _is_descriptor(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("mediaType"), str)
        and isinstance(value.get("digest"), str)
        and is_valid_digest(value["digest"])
        and isinstance(value.get("size"), int)
        and not isinstance(value.get("size"), bool)
        and value["size"] >= 0
    )


def filter_index(index: dict[str, Any], artifact_type: str) -> dict[str, Any]:
    """`index` with only the descriptors of that `artifactType` (exact match, as the spec
    filters), everything else in it kept."""
    kept = [d for d in index["manifests"] if d.get("artifactType") == artifact_type]
    return {**index, "manifests": kept}


def render_index(index: dict[str, Any]) -> bytes:
    """An index docxy made itself (a filtered one), as bytes to answer with."""
    return json.dumps(index, separators=(",", ":")).encode()
