"""Realms and redirects never follow a forged Host."""
import pytest

from docxy.registry.publicurl import Arrival, external_base, https_redirect_base

NAMES = ("mirror.example.com", "*.mirror.example.com", "127.0.0.1")


@pytest.mark.parametrize(
    "arrival, expected",
    [
        (Arrival("https", "10.0.0.5", 443, "mirror.example.com"), "https://mirror.example.com"),
        (Arrival("https", "10.0.0.5", 5443, "mirror.example.com:5443"), "https://mirror.example.com:5443"),
        (Arrival("https", "10.0.0.5", 443, "ghcr.mirror.example.com"), "https://ghcr.mirror.example.com"),
        # forged names fall back to the address the connection reached
        (Arrival("https", "10.0.0.5", 443, "evil.example.net"), "https://10.0.0.5"),
        (Arrival("https", "10.0.0.5", 443, "a.b.mirror.example.com"), "https://10.0.0.5"),
        (Arrival("https", "10.0.0.5", 443, "mirror.example.com:8443"), "https://10.0.0.5"),
        (Arrival("https", "10.0.0.5", 443, "mirror.example.com@evil"), "https://10.0.0.5"),
        (Arrival("https", "10.0.0.5", 443, "evil/x"), "https://10.0.0.5"),
        (Arrival("http", "127.0.0.1", 5000, "127.0.0.1:5000"), "http://127.0.0.1:5000"),
        (Arrival("http", "127.0.0.1", 5000, None), "http://127.0.0.1:5000"),
        (Arrival("http", "::1", 5000, None), "http://[::1]:5000"),
    ],
)
def test_external_base_trusts_only_own_names(arrival, expected):
    """Host is used only when it is one of this server's names on the arrival port."""
    assert external_base(None, NAMES, arrival) == expected


def test_public_url_wins():
    arrival = Arrival("http", "127.0.0.1", 5000, "evil.example.net")
    assert external_base("https://m.example.com/", NAMES, arrival) == "https://m.example.com"


def test_https_redirect_uses_tls_port_and_own_names_only():
    """The plain listener sends clients to the TLS port of this server, never elsewhere."""
    good = Arrival("http", "10.0.0.5", 80, "mirror.example.com")
    assert https_redirect_base(None, NAMES, good, 443) == "https://mirror.example.com"
    forged = Arrival("http", "10.0.0.5", 80, "evil.example.net")
    assert https_redirect_base(None, NAMES, forged, 5443) == "https://10.0.0.5:5443"
    assert https_redirect_base("https://pub.example", NAMES, forged, 5443) == "https://pub.example"
