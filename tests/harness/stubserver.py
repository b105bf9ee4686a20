"""What the harness's small registry-side servers share (harness.tagpager,
harness.referrers): a JSON-error-speaking handler that asks the real registry behind it,
and the threaded server they run in.  Stdlib only: they run as `python -m harness.X`."""
from __future__ import annotations

import http.client
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    label = "stub"  # the log's prefix
    backend = ""  # the registry's base URL (plain HTTP)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.label}: " + (format % args) + "\n")

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, [("Content-Type", "application/json")], body)

    def _ask_registry(self, path: str, forwarded: tuple[str, ...]):
        """GET `path` of the registry with the caller's `forwarded` headers: (response,
        body), or None after answering 502 when the registry is unreachable."""
        target = urlsplit(self.backend)
        headers = {k: v for k in forwarded if (v := self.headers.get(k)) is not None}
        conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp, resp.read()
        except OSError as e:
            self._error(502, "UNAVAILABLE", f"registry unreachable: {e}")
            return None
        finally:
            conn.close()


def serve(handler: type[StubHandler], interface: str, port: int, what: str) -> None:
    """Serve until SIGTERM (or ^C), announcing `what` on standard output."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    httpd = Server((interface, port), handler)
    print(f"{handler.label} on {interface}:{port} -> {what}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
