"""Parsing and rewriting Bearer challenges: quoted values with commas survive."""
import pytest

from docxy.registry.challenge import parse_challenge, rewrite_challenge


def test_parse_keeps_commas_in_quoted_values():
    """A scope with `pull,push` is one value, not two parameters."""
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/redis:pull,push"'
    )
    assert c.scheme == "Bearer"
    assert c.get("realm") == "https://auth.docker.io/token"
    assert c.get("service") == "registry.docker.io"
    assert c.get("scope") == "repository:library/redis:pull,push"


def test_rewrite_points_realm_at_mirror_and_keeps_the_rest():
    """Only the realm changes; service and scope stay, in order."""
    out = rewrite_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/redis:pull,push"',
        "https://mirror.example.com/auth/token",
    )
    assert out == (
        'Bearer realm="https://mirror.example.com/auth/token",service="registry.docker.io",'
        'scope="repository:library/redis:pull,push"'
    )


def test_rewrite_handles_escapes_and_spaces():
    out = rewrite_challenge(
        'Bearer  realm = "x" , service="a \\"b\\"", error="insufficient_scope"', "R"
    )
    c = parse_challenge(out)
    assert c.get("realm") == "R"
    assert c.get("service") == 'a "b"'
    assert c.get("error") == "insufficient_scope"


def test_rewrite_adds_a_missing_realm():
    assert parse_challenge(rewrite_challenge('Bearer service="s"', "R")).get("realm") == "R"


@pytest.mark.parametrize("header", ['Basic realm="Registry Realm"', "garbage ,,,", ""])
def test_non_bearer_passes_unchanged(header):
    """Basic challenges and nonsense are relayed as they are."""
    assert rewrite_challenge(header, "R") == header
