"""The state behind the CDN's `expire-first` mode: nginx asks it (`auth_request`) before
serving a blob, and it refuses (403) the first request for every path and allows the later
ones, as a CDN refuses a signed URL that expired before it was used.  Run as
`python -m harness.expirygate --port P`; it listens on 127.0.0.1 and keeps no files.
"""
from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = (self.headers.get("X-Original-URI") or "").split("?", 1)[0]
        status = 204 if self.server.seen_before(path) else 403
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def seen_before(self, path: str) -> bool:
        with self._lock:
            if path in self._seen:
                return True
            self._seen.add(path)
            return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    _Server(parser.parse_args().port).serve_forever()


if __name__ == "__main__":
    main()
