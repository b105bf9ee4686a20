"""Tag-list pagination in front of distribution 2.8, which ignores `n` and `last`.

`GET /v2/<name>/tags/list?n=&last=` is forwarded (with the caller's Authorization and Accept)
to the registry without the paging parameters; a 200 answer is sorted, cut after `last`, limited
to `n`, and given `Link: </v2/<name>/tags/list?n=N&last=X>; rel="next"` when more remain, as
Docker Hub does. Anything else the registry answers is relayed unchanged. Stdlib only; run as
`python -m harness.tagpager --port P --backend http://127.0.0.1:R`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import parse_qs, urlencode, urlsplit

TAGS_PATH = re.compile(r"^/v2/(?P<name>.+)/tags/list$")
RELAYED_HEADERS = ("content-type", "www-authenticate", "docker-distribution-api-version",
                   "docker-content-digest", "retry-after")


def paginate(tags: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The page after `last` of at most `n` tags (sorted), and whether more remain."""
    ordered = sorted(tags)
    if last:
        ordered = [t for t in ordered if t > last]
    if n is None:
        return ordered, False
    return ordered[:n], len(ordered) > n


def make_handler(backend: str) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(backend)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "harness-tagpager"

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write("tagpager: " + (format % args) + "\n")

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

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            m = TAGS_PATH.match(url.path)
            if not m:
                return self._error(404, "NOT_FOUND", "only tag lists are served here")
            query = parse_qs(url.query)
            n: int | None = None
            if "n" in query:
                try:
                    n = int(query["n"][0])
                    if n < 0:
                        raise ValueError
                except ValueError:
                    return self._error(400, "PAGINATION_NUMBER_INVALID", "invalid n")
            last = query.get("last", [None])[0]
            headers = {k: v for k in ("Authorization", "Accept", "User-Agent")
                       if (v := self.headers.get(k)) is not None}
            conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
            try:
                conn.request("GET", url.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except OSError as e:
                return self._error(502, "UNAVAILABLE", f"registry unreachable: {e}")
            finally:
                conn.close()
            relayed = [(k, v) for k, v in resp.getheaders() if k.lower() in RELAYED_HEADERS]
            if resp.status != 200:
                return self._send(resp.status, relayed, body)
            data = json.loads(body)
            page, more = paginate(data.get("tags") or [], n, last)
            if more:
                q = urlencode({"n": n, "last": page[-1]})
                relayed.append(("Link", f'<{url.path}?{q}>; rel="next"'))
            out = json.dumps({"name": data.get("name", m.group("name")), "tags": page})
            self._send(200, relayed, out.encode() + b"\n")

        do_HEAD = do_GET

    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.tagpager")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--backend", required=True, help="registry base URL (plain HTTP)")
    ns = p.parse_args(argv)
    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

    httpd = Server((ns.interface, ns.port), make_handler(ns.backend))
    print(f"tagpager on {ns.interface}:{ns.port} -> {ns.backend}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
