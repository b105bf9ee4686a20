"""A deliberately simple upstream registry for transport tests: it serves one endless-ish
blob as fast as the socket takes it, logs when each transfer opens and how it ends, and can
die mid-body.  Run as `python -m harness.blobserver --port P --size N --log F [--die-after B]`.

It is not the Hub-like upstream (see upstream.py); it exists so that backpressure, client
disconnects and upstream deaths can be asserted from the upstream's side.
"""
from __future__ import annotations

import argparse
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # quiet; we log our own events
        pass

    def _event(self, text: str) -> None:
        with self.server.lock, open(self.server.log_path, "a") as f:
            f.write(text + "\n")

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        if self.path.rstrip("/") == "/v2":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            if body:
                self.wfile.write(b"{}")
            return
        if "/blobs/" not in self.path:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = self.server.size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("Docker-Content-Digest", self.path.rsplit("/", 1)[1])
        self.end_headers()
        if not body:
            return
        serial = self.server.next_serial()
        self._event(f"open {serial} {self.command} {self.path}")
        sent = 0
        pattern = self.server.pattern
        try:
            while sent < size:
                n = min(CHUNK, size - sent)
                start = sent % len(pattern)
                piece = (pattern[start:] + pattern)[:n]
                self.wfile.write(piece)
                sent += n
                if self.server.die_after is not None and sent >= self.server.die_after:
                    self.wfile.flush()
                    self._event(f"dying {serial} sent={sent}")
                    os._exit(17)
            self.wfile.flush()
            self._event(f"complete {serial} sent={sent}")
        except (BrokenPipeError, ConnectionResetError):
            self._event(f"closed-early {serial} sent={sent}")
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, size: int, log_path: str, die_after: int | None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.size = size
        self.log_path = log_path
        self.die_after = die_after
        self.lock = threading.Lock()
        self._serial = 0
        self.pattern = random.Random(7).randbytes(1024 * 1024)

    def next_serial(self) -> int:
        with self.lock:
            self._serial += 1
            return self._serial


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--die-after", type=int, default=None)
    args = parser.parse_args()
    server = _Server(args.port, args.size, args.log, args.die_after)
    server.serve_forever()


if __name__ == "__main__":
    main()
