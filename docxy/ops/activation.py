"""systemd socket activation: the port of a listening socket handed over by systemd, so
that redirects to HTTPS name the port the socket unit really listens on.  Adopting the
socket itself is Twisted's `systemd:` strports endpoint (which also consumes LISTEN_FDS)."""
from __future__ import annotations

import socket

from twisted.internet.endpoints import AdoptedStreamServerEndpoint


def adopted_port(endpoint: object) -> int | None:
    """The TCP port of the inherited socket an endpoint adopts (`systemd:domain=INET...`),
    or None for any other endpoint or a socket without a port (UNIX)."""
    if not isinstance(endpoint, AdoptedStreamServerEndpoint):
        return None
    try:
        sock = socket.socket(fileno=endpoint.fileno)
    except OSError:
        return None
    try:
        address = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays the endpoint's to adopt
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
        return address[1]
    return None
