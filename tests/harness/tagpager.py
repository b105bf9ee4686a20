"""Tag-list pagination in front of distribution 2.8, which ignores `n` and `last`.

`GET /v2/<name>/tags/list?n=&last=` is forwarded (with the caller's Authorization and Accept)
to the registry without the paging parameters; a 200 answer is sorted, cut after `last`, limited
to `n`, and given `Link: </v2/<name>/tags/list?n=N&last=X>; rel="next"` when more remain, as
Docker Hub does. Anything else the registry answers is relayed unchanged. Stdlib only; run as
`python -m harness.tagpager --port P --backend http://127.0.0.1:R`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Sequence
from urllib.parse import parse_qs, urlencode, urlsplit

from .stubserver import StubHandler, serve

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


def make_handler(backend: str) -> type[StubHandler]:
    class Handler(StubHandler):
        server_version = "harness-tagpager"
        label = "tagpager"

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
            asked = self._ask_registry(url.path, ("Authorization", "Accept", "User-Agent"))
            if asked is None:
                return
            resp, body = asked
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

    Handler.backend = backend
    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m harness.tagpager")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--backend", required=True, help="registry base URL (plain HTTP)")
    ns = p.parse_args(argv)
    serve(make_handler(ns.backend), ns.interface, ns.port, ns.backend)


if __name__ == "__main__":
    main()
