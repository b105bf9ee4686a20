"""The cluster secret: keys derived per purpose, node requests signed and checked."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from docxy.cluster.secret import (
    ClusterSecretError,
    NodeAuth,
    derive,
    read_cluster_secret,
)


def test_keys_differ_by_purpose_and_repeat_for_the_same_secret():
    """Each purpose gets its own key; every node derives the same one from the same file."""
    secret = b"s" * 32
    assert derive(secret, "client-tokens") == derive(secret, "client-tokens")
    assert derive(secret, "client-tokens") != derive(secret, "node-requests")
    assert derive(secret, "client-tokens") != derive(b"t" * 32, "client-tokens")
    assert len(derive(secret, "node-requests")) == 32


def test_short_or_missing_secret_is_refused_with_a_reason(tmp_path):
    """A secret under 16 bytes, or no file, stops the daemon with a message that says what to do."""
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ClusterSecretError, match="at least 16"):
        read_cluster_secret(str(short))
    with pytest.raises(ClusterSecretError, match="cannot read"):
        read_cluster_secret(str(tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123\n")
    assert read_cluster_secret(str(good)) == b"0123456789abcdef0123"


@pytest.mark.parametrize("change", ["path", "method", "key", "old", "garbage", "none"])
def test_node_signature_checks_path_method_key_and_time(change):
    """A signed node request is accepted as signed, and refused when its path, method,
    key or age differ, or when it carries no signature."""
    clock = Clock()
    clock.advance(1_000_000)
    signer = NodeAuth(derive(b"k" * 32, "node-requests"), clock)
    checker = NodeAuth(derive(b"k" * 32, "node-requests"), clock)
    header = signer.header(b"GET", b"/_docxy/v1/blobs/sha256:aa")
    assert checker.verify(header, b"GET", b"/_docxy/v1/blobs/sha256:aa")
    if change == "path":
        assert not checker.verify(header, b"GET", b"/_docxy/v1/blobs/sha256:bb")
    elif change == "method":
        assert not checker.verify(header, b"HEAD", b"/_docxy/v1/blobs/sha256:aa")
    elif change == "key":
        other = NodeAuth(derive(b"x" * 32, "node-requests"), clock)
        assert not other.verify(header, b"GET", b"/_docxy/v1/blobs/sha256:aa")
    elif change == "old":
        clock.advance(61)
        assert not checker.verify(header, b"GET", b"/_docxy/v1/blobs/sha256:aa")
    elif change == "garbage":
        assert not checker.verify(b"DocxyNode x:y", b"GET", b"/_docxy/v1/blobs/sha256:aa")
    else:
        assert not checker.verify(None, b"GET", b"/_docxy/v1/blobs/sha256:aa")
