"""One client's pull: the request, the upstream's proxy it goes to, the route it names and
the realm its challenges point at.  Built by the registry resource, handed whole to the
cache (blobs.py, manifests.py), which passes it on instead of four arguments."""
from __future__ import annotations

from typing import NamedTuple

from twisted.web.server import Request

from docxy.registry.challenge import Realm
from docxy.registry.names import Route
from docxy.upstream.proxy import RegistryProxy


class Pull(NamedTuple):
    request: Request
    proxy: RegistryProxy
    route: Route
    realm: Realm | None  # None: mirror mode, challenges are not shown to clients
