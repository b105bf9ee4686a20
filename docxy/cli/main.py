"""`docxy`: warm the cache, see what is in it, remove from it (the admin API of a running
docxy, `--admin-listen`).

    docxy --admin http://127.0.0.1:5002 warm docker.io/library/alpine:latest [--platform linux/arm64]
    docxy cache ls [--registry docker.io] [--json]
    docxy cache rm docker.io/library/alpine:latest    (or name@sha256:..., or sha256:...)
    docxy cache gc

Exit codes: 0 done; 1 the operation failed (a warm-up that did not complete, nothing
cached matching `cache rm`); 2 bad usage; 3 the admin API could not be used (unreachable,
refused the credentials, not docxy).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from docxy.cli.progress import Progress, human

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
DEFAULT_ADMIN = "http://127.0.0.1:5002"


class AdminUnusable(Exception):
    """The admin API cannot be used: the message says why (exit code 3)."""


class Client:
    def __init__(self, url: str, user: str | None, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdminUnusable(f"--admin must be an http(s) URL, not {url!r}")
        if parts.username is not None and user is None:
            user = f"{parts.username}:{parts.password or ''}"
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._auth = ("Basic " + base64.b64encode(user.encode()).decode()) if user else None
        self._timeout = timeout

    def _open(self, method: str, path: str, document: Any = None, timeout: float | None = None):
        data = json.dumps(document).encode() if document is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("content-type", "application/json")
        if self._auth:
            request.add_header("authorization", self._auth)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self._timeout)
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise AdminUnusable("the admin API wants a user of its --admin-htpasswd: give "
                                    "--user NAME:PASSWORD (or DOCXY_ADMIN_USER)") from None
            return e  # its status and JSON body are the answer
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminUnusable(f"cannot reach docxy's admin API at {self.base}: {reason}") \
                from None

    def call(self, method: str, path: str, document: Any = None) -> tuple[int, dict]:
        response = self._open(method, path, document)
        with response:
            body = response.read()
            status = response.status
        try:
            answer = json.loads(body) if body else {}
        except ValueError:
            raise AdminUnusable(f"{self.base} answered {status} with something that is not "
                                "JSON: is it docxy's --admin-listen?") from None
        return status, answer

    def stream(self, path: str, document: Any) -> tuple[int, Iterator[dict]]:
        response = self._open("POST", path, document, timeout=600)
        status = response.status

        def events() -> Iterator[dict]:
            with response:
                for line in response:
                    line = line.strip()
                    if line:
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise AdminUnusable(f"{self.base} sent a line that is not JSON") \
                                from None

        return status, events()


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="docxy", description="Steer a running docxy through its admin API "
        "(twistd docxy --admin-listen ...).",
        epilog="Exit codes: 0 done, 1 the operation failed, 2 bad usage, 3 the admin API "
        "could not be used.")
    top.add_argument("--admin", default=os.environ.get("DOCXY_ADMIN", DEFAULT_ADMIN),
                     help="the admin API's URL (default: $DOCXY_ADMIN, else %(default)s)")
    top.add_argument("--user", default=os.environ.get("DOCXY_ADMIN_USER"),
                     help="NAME:PASSWORD of an --admin-htpasswd user ($DOCXY_ADMIN_USER)")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    warm = commands.add_parser(
        "warm", help="fetch images into the cache before they are pulled",
        description="Fetch images into the cache through the same download path as a pull: "
        "every platform of a multi-arch image unless --platform narrows it.  Blobs already "
        "cached are not fetched again; a cached tag costs one HEAD upstream.")
    warm.add_argument("refs", nargs="+", metavar="REF",
                      help="registry/name:tag or registry/name@digest (docker.io/library/alpine:3.20)")
    warm.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                      help="only this platform of an index (repeatable), e.g. linux/arm64")
    warm.add_argument("--json", action="store_true",
                      help="print the progress events as JSON lines on standard output")
    warm.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")

    cache = commands.add_parser("cache", help="what is cached, and its removal",
                                description="List and remove what docxy has cached.")
    sub = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list cached images", description="List the cached tags "
                        "and images: digest, size, bytes on disk, pulls and last pull.")
    ls.add_argument("--registry", metavar="R", help="only this registry (docker.io, ghcr.io)")
    ls.add_argument("--json", action="store_true", help="JSON on standard output")
    rm = sub.add_parser("rm", help="remove a tag, an image or a digest", description=(
        "Remove REF: registry/name:tag removes the tag, and its image with the blobs no "
        "other cached image uses when no other tag names it; registry/name@digest removes "
        "that image (and its tags in that repository); a bare digest removes that manifest "
        "or blob wherever it is.  A download in progress is never cut."))
    rm.add_argument("ref", metavar="REF")
    rm.add_argument("--json", action="store_true", help="JSON on standard output")
    gc = sub.add_parser("gc", help="remove blobs no cached manifest refers to",
                        description="Remove every cached blob that no cached manifest names.")
    gc.add_argument("--json", action="store_true", help="JSON on standard output")

    status = commands.add_parser("status", help="what the status page shows, as JSON")
    status.add_argument("--json", action="store_true", default=True, help=argparse.SUPPRESS)
    return top


def _ago(when: float | None, now: float) -> str:
    if not when:
        return "never"
    seconds = max(0, now - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _table(images: list[dict], out) -> None:
    now = time.time()
    rows = [("REGISTRY", "REPOSITORY", "TAG", "DIGEST", "SIZE", "ON DISK", "PULLS", "LAST PULL")]
    for i in images:
        rows.append((i["registry"], i["repository"], i["tag"] or "<none>",
                     i["digest"][:19], human(i["size"]), human(i["stored"]), str(i["pulls"]),
                     _ago(i["last_pull"], now)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


def _warm(client: Client, args, out, err) -> int:
    failed = False
    for ref in args.refs:
        status, events = client.stream("/api/v1/warm", {"ref": ref, "platforms": args.platform})
        if status != 200:
            try:
                answer = next(iter(events), {})  # a refused warm-up: one JSON error
            except AdminUnusable:
                answer = {}
            err.write(f"docxy warm {ref}: {answer.get('error') or f'admin API answered {status}'}\n")
            failed = True
            if status == 400:
                return USAGE
            continue
        progress = None if (args.json or args.quiet) else Progress(err)
        ended = None
        for event in events:
            if args.json:
                out.write(json.dumps(event) + "\n")
                out.flush()
            elif progress is not None:
                progress.event(event)
            if event.get("event") in ("done", "error"):
                ended = event
        if ended is None or ended["event"] == "error":
            why = ended.get("error") if ended else "the admin API's answer ended early"
            if args.quiet or args.json:
                err.write(f"docxy warm {ref}: {why}\n")
            failed = True
    return FAILED if failed else OK


def run(argv: list[str], out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and USAGE
    try:
        client = Client(args.admin, args.user)
        if args.command == "warm":
            for p in args.platform:
                if p.count("/") not in (1, 2):
                    err.write(f"docxy: --platform is os/arch[/variant], not {p!r}\n")
                    return USAGE
            return _warm(client, args, out, err)
        if args.command == "status":
            status, answer = client.call("GET", "/api/v1/status")
            out.write(json.dumps(answer, indent=2) + "\n")
            return OK if status == 200 else FAILED
        if args.action == "ls":
            path = "/api/v1/cache" + (f"?registry={quote(args.registry)}" if args.registry else "")
            status, answer = client.call("GET", path)
        elif args.action == "rm":
            status, answer = client.call("POST", "/api/v1/cache/rm", {"ref": args.ref})
        else:
            status, answer = client.call("POST", "/api/v1/cache/gc", {})
    except AdminUnusable as e:
        err.write(f"docxy: {e}\n")
        return UNREACHABLE
    if status != 200:
        err.write(f"docxy cache {args.action}: {answer.get('error') or f'answered {status}'}\n")
        return USAGE if status == 400 else FAILED
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    elif args.action == "ls":
        _table(answer.get("images", []), out)
    else:
        _removed(args.action, answer, out)
    return OK


def _removed(action: str, answer: dict, out) -> None:
    for tag in answer.get("tags", []):
        out.write(f"Untagged: {tag}\n")
    for digest in answer.get("manifests", []):
        out.write(f"Deleted manifest: {digest}\n")
    for digest in answer.get("blobs", []):
        out.write(f"Deleted blob: {digest}\n")
    for digest in answer.get("kept", []):
        out.write(f"Kept: {digest} (another tag names it)\n")
    for digest in answer.get("busy", []):
        out.write(f"Kept: {digest} (being downloaded now; not cut)\n")
    if not any(answer.get(k) for k in ("tags", "manifests", "blobs")):
        out.write("Nothing to remove\n" if action == "gc" else "Nothing removed\n")


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
