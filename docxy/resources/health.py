"""`GET /health`: liveness, answered locally without asking the upstream."""
from __future__ import annotations

import json

from twisted.web.resource import Resource


class HealthResource(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        body = json.dumps({"status": "ok"}).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def render_HEAD(self, request) -> bytes:
        self.render_GET(request)
        return b""
