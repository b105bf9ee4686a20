"""The state behind the CDN's gated modes: nginx asks it (`auth_request`) before serving a
blob, and it answers 204 (serve) or 403 (refuse). In "expire-first" (the default) it refuses
the first request for every path and allows the later ones, as a CDN refuses a signed URL
that expired before it was used. In "single-use" it allows the first GET of every URL
(path and query, so `?sig=` included) and refuses every later one, as a CDN refuses a signed
URL that was good for one fetch; a HEAD is allowed until a GET has used the URL.  Run as `python -m harness.expirygate --port P [--mode M]`;
it listens on 127.0.0.1 and keeps no files.
"""
from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("expire-first", "single-use")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        uri = self.headers.get("X-Original-URI") or ""
        if self.server.mode == "single-use":
            if self.headers.get("X-Original-Method") == "HEAD":
                status = 403 if self.server.seen(uri) else 204
            else:
                status = 403 if self.server.seen_before(uri) else 204
        else:
            status = 204 if self.server.seen_before(uri.split("?", 1)[0]) else 403
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, mode: str = "expire-first") -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.mode = mode
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, key: str) -> bool:
        with self._lock:
            return key in self._seen

    def seen_before(self, key: str) -> bool:
        """Whether `key` was seen before; it is seen from now on."""
        with self._lock:
            if key in self._seen:
                return True
            self._seen.add(key)
            return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, default="expire-first")
    args = parser.parse_args()
    _Server(args.port, args.mode).serve_forever()


if __name__ == "__main__":
    main()
