"""Which client networks may use the mirror, and who the client is when docxy sits behind
a proxy it trusts (nginx, a load balancer): pure functions over IP networks."""
from __future__ import annotations

import ipaddress
import re

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values, what: str) -> tuple[Network, ...]:
    """CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`, or a single address); ValueError names
    the bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not an IP network like 10.0.0.0/8") from None
    return tuple(out)


def _address(text: str):
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _within(address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


@attrs.frozen
class NetworkPolicy:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    trusted_proxies: tuple[Network, ...] = ()

    def permits(self, client: str) -> bool:
        """Deny wins; with an allow list, only its networks are let in.  A client whose
        address cannot be read (a unix socket) is let in only without an allow list."""
        address = _address(client)
        if address is None:
            return not self.allow
        if _within(address, self.deny):
            return False
        return not self.allow or _within(address, self.allow)

    def client_address(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: the peer's, unless the peer is a trusted proxy; then the
        nearest address in X-Forwarded-For that is not a trusted proxy itself (the ones
        further left are whatever the client claimed)."""
        address = _address(peer)
        if address is None or not _within(address, self.trusted_proxies):
            return peer
        hops = [h for line in forwarded_for for h in re.split(r"\s*,\s*", line.strip()) if h]
        for hop in reversed(hops):
            hop_address = _address(hop)
            if hop_address is None:
                return peer  # garbage: do not guess
            if not _within(hop_address, self.trusted_proxies):
                return str(hop_address)
        return peer


_LOOPBACK_INTERFACE = re.compile(r"(?:^|:)interface=(127\.[0-9.]+|\\:\\:1|::1|localhost)(?::|$)")


def is_local_endpoint(description: str) -> bool:
    """Whether a strports description listens on loopback or a unix socket only (a
    `systemd:` socket or one without an interface may face the internet)."""
    kind = description.split(":", 1)[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    return _LOOPBACK_INTERFACE.search(description) is not None
