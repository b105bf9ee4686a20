"""The request log and the log format: the fields of one answered request (pure functions
of the request), its one-line text form, and the JSON-lines observer that twistd uses when
`--log-format json` is given.  No header value ever reaches a field, so no secret can."""
from __future__ import annotations

import re
import sys

from twisted.application import service
from twisted.logger import ILogObserver, jsonFileLogObserver

LOG_FORMATS = ("text", "json")

_PULL = re.compile(rb"^/v2/.+/(manifests|blobs|tags|referrers)/")
_KINDS = {b"manifests": "manifest", b"blobs": "blob", b"tags": "tags", b"referrers": "referrers"}
_FIXED = {b"/v2/": "ping", b"/v2": "ping", b"/health": "health", b"/ready": "health",
          b"/metrics": "metrics"}
_MAX_PATH = 200
CLIENT_GONE = 499  # nginx's status for a client that closed before the answer began


def endpoint_of(path: bytes) -> str:
    """The endpoint a raw request path is for, from a small fixed set (a metrics label:
    never a repository name)."""
    fixed = _FIXED.get(path)
    if fixed:
        return fixed
    if path == b"/auth/token" or path.startswith(b"/auth/token/"):
        return "token"
    match = _PULL.match(path)
    return _KINDS[match.group(1)] if match else "other"


def printable(raw: bytes, limit: int = _MAX_PATH) -> str:
    """`raw` safe for a log line: bytes outside printable ASCII percent-encoded, cut."""
    text = "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in raw[:limit])
    return text + ("..." if len(raw) > limit else "")


def _split_what(what: str) -> tuple[str | None, str | None]:
    """("docker.io/library/alpine") -> ("docker.io", "library/alpine"), as the registry
    resource records it (registry names hold no slash)."""
    registry, sep, repository = what.partition("/")
    return (registry, repository) if sep and registry and repository else (None, None)


def access_fields(request, now: float) -> dict:
    """The fields of the request log's event for `request` (finished or aborted)."""
    endpoint = endpoint_of(request.path or b"")
    what, reference = getattr(request, "docxy_what", ("-", ""))
    registry = repository = None
    if endpoint in ("manifest", "blob", "tags", "referrers"):
        registry, repository = _split_what(what)
    started = getattr(request, "started", None)
    # twisted.web drops a request's channel when its connection is lost; else log() runs
    # in finish(), with the channel still there.
    aborted = request.channel is None
    status = request.code
    if aborted and not getattr(request, "startedWriting", True):
        status = CLIENT_GONE  # it left before the answer began: its status is no one's
    client = getattr(request, "docxy_client", None)
    if not client:
        client = getattr(request.getClientAddress(), "host", None) or "-"
    return {
        "client": client,
        "user": getattr(request, "docxy_user", None),
        "method": printable(request.method or b"-", 16),
        "endpoint": endpoint,
        "path": printable(request.path or b""),
        "registry": registry,
        "repository": repository,
        "reference": reference or None,
        "status": status,
        "error": getattr(request, "docxy_status", "") or None,
        "bytes": request.sentLength,
        "source": getattr(request, "docxy_source", "local"),
        "duration": round(now - started, 6) if started is not None else 0.0,
        "aborted": aborted,
    }


def access_format(fields: dict) -> str:
    """The text form of a request's event: the fields an operator reads, absent ones left
    out (`127.0.0.1 GET docker.io/library/alpine latest 200 1472B upstream 0.021s`)."""
    parts = ["{client}"]
    if fields.get("user"):
        parts.append("user={user}")
    parts.append("{method}")
    parts.append("{registry}/{repository}" if fields.get("repository") else "{path}")
    if fields.get("reference"):
        parts.append("{reference}")
    parts.append("{status}")
    if fields.get("error"):
        parts.append("{error}")
    parts.append("{bytes}B")
    if fields.get("source") in ("cache", "upstream"):
        parts.append("{source}")
    parts.append("{duration:.3f}s")
    if fields.get("aborted"):
        parts.append("aborted")
    return " ".join(parts)


def log_observer(log_format: str, out=None):
    """The observer for `log_format`: None for text (twistd's own), else one JSON object
    per line (twisted.logger's JSON form, as `twist --log-format=json` writes it, without
    the record separator) on `out` (standard output)."""
    if log_format == "text":
        return None
    return jsonFileLogObserver(out if out is not None else sys.stdout, recordSeparator="")


class DocxyService(service.MultiService):
    """The daemon's top service.  twistd picks its log observer after makeService, from
    the Application's ILogObserver component: joining the Application sets it."""

    def __init__(self, observer=None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
