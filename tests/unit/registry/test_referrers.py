"""The referrers API's pure parts: the artifactType filter, OCI-Filters-Applied, and the
image index of referrer descriptors, read, checked and filtered."""
import json

import pytest

from docxy.registry.names import InvalidRequest
from docxy.registry.referrers import (
    INDEX_MEDIA_TYPE,
    InvalidIndex,
    artifact_type_filter,
    filter_index,
    filters_applied,
    is_index_type,
    parse_index,
    referrers_query,
    render_index,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
NOTATION = "application/vnd.cncf.notary.signature"
COSIGN = "application/vnd.dev.cosign.artifact.sig.v1+json"


def _index(*descriptors) -> dict:
    return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": list(descriptors)}


def _descriptor(digest, artifact_type=None, **extra) -> dict:
    d = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
         "size": 123, **extra}
    if artifact_type:
        d["artifactType"] = artifact_type
    return d


@pytest.mark.parametrize(
    "query, expected",
    [
        ([], None),
        ([("ns", "docker.io")], None),
        ([("artifactType", NOTATION)], NOTATION),
        ([("artifactType", COSIGN), ("artifactType", NOTATION)], COSIGN),
        ([("ns", "ghcr.io"), ("artifactType", "application/spdx+json")], "application/spdx+json"),
    ],
)
def test_artifact_type_filter_is_the_first_given(query, expected):
    """The first artifactType given is the filter; other parameters are not its business."""
    assert artifact_type_filter(query) == expected


@pytest.mark.parametrize(
    "value", ["", "notamediatype", "a/b/c", "a/b c", "a/b\r\nx: y", "/b", "a/", "é/x"]
)
def test_artifact_type_that_is_no_media_type_is_refused(value):
    """A filter that can match no descriptor is refused (400) before it goes upstream."""
    with pytest.raises(InvalidRequest) as info:
        artifact_type_filter([("artifactType", value)])
    assert info.value.status == 400


def test_referrers_query_is_encoded():
    assert referrers_query(None) == ""
    assert referrers_query(COSIGN) == "?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson"


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], frozenset()),
        ([b"artifactType"], {"artifactType"}),
        ([b"artifactType, other"], {"artifactType", "other"}),
        ([b"a", b"artifactType"], {"a", "artifactType"}),
    ],
)
def test_filters_applied_reads_every_line(values, expected):
    assert filters_applied(values) == expected


@pytest.mark.parametrize(
    "content_type, expected",
    [
        (INDEX_MEDIA_TYPE.encode(), True),
        (b"Application/Vnd.OCI.Image.Index.v1+json; charset=utf-8", True),
        (b"application/json", False),
        (b"text/plain; charset=utf-8", False),
        (None, False),
    ],
)
def test_is_index_type(content_type, expected):
    assert is_index_type(content_type) is expected


def test_parse_index_keeps_descriptors_with_annotations():
    index = _index(_descriptor(D1, NOTATION, annotations={"io.cncf.notary.x": "y"}))
    assert parse_index(json.dumps(index).encode()) == index


def test_parse_index_accepts_an_index_without_media_type_and_empty():
    assert parse_index(b'{"schemaVersion":2,"manifests":[]}')["manifests"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"schemaVersion":1,"manifests":[]}',
        b'{"schemaVersion":2}',
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","manifests":[]}',
        b'{"schemaVersion":2,"manifests":[{"mediaType":"x/y","digest":"sha256:abc","size":1}]}',
        b'{"schemaVersion":2,"manifests":[{"mediaType":"x/y","digest":"' + D1.encode() + b'","size":-1}]}',
        b'{"schemaVersion":2,"manifests":[{"mediaType":"x/y","digest":"' + D1.encode() + b'","size":true}]}',
        b'{"schemaVersion":2,"manifests":[{"digest":"' + D1.encode() + b'","size":1}]}',
        b'{"schemaVersion":2,"manifests":["' + D1.encode() + b'"]}',
        b"\xff\xfe",
    ],
)
def test_parse_index_refuses_what_is_not_an_index_of_descriptors(body):
    with pytest.raises(InvalidIndex):
        parse_index(body)


def test_filter_index_keeps_only_that_artifact_type():
    """Exact match on each descriptor's artifactType; the rest of the index is kept."""
    index = {**_index(_descriptor(D1, NOTATION), _descriptor(D2, COSIGN), _descriptor(D2)),
             "annotations": {"a": "b"}}
    filtered = filter_index(index, NOTATION)
    assert [d["digest"] for d in filtered["manifests"]] == [D1]
    assert filtered["annotations"] == {"a": "b"} and filtered["mediaType"] == INDEX_MEDIA_TYPE
    assert filter_index(index, "application/x-none")["manifests"] == []
    assert len(index["manifests"]) == 3, "the original index was changed"


def test_render_index_reads_back():
    index = _index(_descriptor(D1, NOTATION))
    assert parse_index(render_index(index)) == index
