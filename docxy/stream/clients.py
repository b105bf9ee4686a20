"""The client end of a stream: whether a request can still be answered, and how to cut its
connection so that a body that cannot be whole never looks complete."""
from __future__ import annotations


def request_gone(request) -> bool:
    """Finished, or its connection lost (twisted.web drops `channel` when it goes)."""
    return bool(request.finished) or request.channel is None


def abort_client(request) -> None:
    """Cut the client's connection so that it sees a failed transfer, not a short one."""
    transport = getattr(request.channel, "transport", None) if request.channel else None
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()
