"""The cluster secret and the keys derived from it: one for docxy's own client tokens (so a
token from node A is honoured by node B, and after restarts), one for the requests nodes
send each other.  Pure apart from reading the file; the secret itself is never sent."""
from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_SECRET = 16  # bytes
NODE_AUTH_SCHEME = b"DocxyNode"
MAX_SKEW = 60.0  # seconds a signed node request stays valid (clocks of the nodes differ)


class ClusterSecretError(Exception):
    """A cluster secret file that cannot be used; the message says why."""


def read_cluster_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ClusterSecretError(f"cannot read --cluster-secret {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise ClusterSecretError(
            f"--cluster-secret {path} holds {len(secret)} bytes; give every node the same "
            f"file of at least {MIN_SECRET} random bytes (e.g. `openssl rand -hex 32`)")
    return secret


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose: knowing one key tells nothing of the others."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"docxy-cluster",
                info=purpose.encode("ascii")).derive(secret)


class NodeAuth:
    """Signs and checks the requests nodes send each other: an HMAC of the method, the
    path and the time, valid for MAX_SKEW seconds."""

    def __init__(self, key: bytes, clock) -> None:
        self._key = key
        self._clock = clock

    def _mac(self, method: bytes, path: bytes, stamp: bytes) -> bytes:
        return hmac.new(self._key, b"\n".join((method, path, stamp)), hashlib.sha256).hexdigest().encode()

    def header(self, method: bytes, path: bytes) -> bytes:
        stamp = b"%d" % int(self._clock.seconds())
        return NODE_AUTH_SCHEME + b" " + stamp + b":" + self._mac(method, path, stamp)

    def verify(self, value: bytes | None, method: bytes, path: bytes) -> bool:
        if not value or not value.startswith(NODE_AUTH_SCHEME + b" "):
            return False
        stamp, _, mac = value[len(NODE_AUTH_SCHEME) + 1:].partition(b":")
        if not stamp.isdigit() or abs(self._clock.seconds() - int(stamp)) > MAX_SKEW:
            return False
        return hmac.compare_digest(mac, self._mac(method, path, stamp))
