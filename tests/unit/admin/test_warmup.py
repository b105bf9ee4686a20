"""Which children of an index a warm-up takes, and how platforms are written."""
from __future__ import annotations

import pytest

from docxy.admin.warmup import Platform, choose

INDEX = {"manifests": [
    {"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "amd64"}},
    {"digest": "sha256:" + "2" * 64,
     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    {"digest": "sha256:" + "3" * 64, "platform": {"os": "unknown", "architecture": "unknown"}},
    {"digest": "not a digest", "platform": {"os": "linux", "architecture": "amd64"}},
]}


def test_every_platform_unless_narrowed():
    assert [c["digest"][7] for c in choose(INDEX, ())] == ["1", "2", "3"]
    assert [c["digest"][7] for c in choose(INDEX, (Platform.parse("linux/arm64"),))] == ["2"]
    assert choose(INDEX, (Platform.parse("linux/arm64/v7"),)) == []
    assert [c["digest"][7] for c in choose(INDEX, (Platform.parse("LINUX/ARM64/v8"),
                                                   Platform.parse("linux/amd64")))] == ["1", "2"]


@pytest.mark.parametrize("text", ["linux", "linux/", "a/b/c/d", ""])
def test_a_platform_is_os_arch_and_maybe_variant(text):
    with pytest.raises(ValueError):
        Platform.parse(text)
