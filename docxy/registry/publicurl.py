"""Pure functions for the URLs docxy hands to clients: the token realm and the redirect
from plain HTTP to HTTPS.

They come from `--public-url` when it is set.  Otherwise a request's `Host` is used only if
it names this server (a name from the certificate or `--server-name`, on the port the
request came in on); a forged `Host` falls back to the address the connection reached, so
it never steers a client anywhere else.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import attrs

DEFAULT_PORTS = {"http": 80, "https": 443}


@attrs.frozen
class Arrival:
    """What is known of how a request reached this server, none of it from the client."""

    scheme: str
    local_host: str
    local_port: int
    host_header: str | None = None


def split_host(host_header: str) -> tuple[str, int | None] | None:
    """Split `name[:port]` or `[v6]:port`; None if it is malformed."""
    value = host_header.strip().lower()
    if not value or any(c in value for c in "/?#@\\ \t"):
        return None
    try:
        parsed = urlsplit(f"//{value}")
        return parsed.hostname or "", parsed.port
    except ValueError:
        return None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def name_matches(host: str, names: tuple[str, ...]) -> bool:
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and host.endswith(name[1:]) and host.count(".") == name.count("."):
            return True
    return False


def _format(scheme: str, host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    if DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def external_base(public_url: str | None, names: tuple[str, ...], arrival: Arrival) -> str:
    """The base URL a client should use to reach this server again."""
    if public_url:
        return public_url.rstrip("/")
    if arrival.host_header:
        split = split_host(arrival.host_header)
        if split is not None:
            host, port = split
            if port is None:
                port = DEFAULT_PORTS.get(arrival.scheme)
            own_name = name_matches(host, names) or host == arrival.local_host
            if own_name and port == arrival.local_port:
                return _format(arrival.scheme, host, port)
    return _format(arrival.scheme, arrival.local_host, arrival.local_port)


def https_redirect_base(
    public_url: str | None, names: tuple[str, ...], arrival: Arrival, https_port: int
) -> str:
    """Where a plain-HTTP request is sent when TLS is on."""
    if public_url:
        return public_url.rstrip("/")
    host = arrival.local_host
    if arrival.host_header:
        split = split_host(arrival.host_header)
        if split is not None and (split[0] == host or name_matches(split[0], names)):
            host = split[0]
    return _format("https", host, https_port)
