"""Pure parsing of a `Range` header against a blob's size (RFC 9110, bytes, one range)."""
from __future__ import annotations

import enum
import re

_SPEC = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")



class Unsatisfiable(enum.Enum):
    """A range that starts past the end of the body: 416."""

    UNSATISFIABLE = "unsatisfiable"


UNSATISFIABLE = Unsatisfiable.UNSATISFIABLE
_HUGE = 10**18  # beyond any blob; also what any longer number counts as


def _number(digits: str) -> int:
    # int() refuses more than 4300 digits: a header must not be able to raise here.
    return int(digits) if len(digits) <= 18 else _HUGE


def parse_range(header: str | None, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """(start, end_exclusive) for one satisfiable range; UNSATISFIABLE; or None when the
    whole body is to be sent (no header, several ranges, or a header we do not parse:
    ignoring Range is always allowed)."""
    if not header or "," in header:
        return None
    match = _SPEC.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix: the last N bytes
        n = _number(last)
        if n == 0:
            return UNSATISFIABLE
        return max(size - n, 0), size
    start = _number(first)
    if start >= size:
        return UNSATISFIABLE
    end = size if last == "" else min(_number(last) + 1, size)
    if end <= start:
        return None  # last < first: syntactically invalid, ignore
    return start, end


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d{1,18})-(\d{1,18})/(\d{1,18}|\*)\s*$")
_UNSATISFIED = re.compile(r"^\s*bytes\s+\*/(\d{1,18})\s*$")


def parse_content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """(start, end_exclusive, total or None) of a 206's `Content-Range: bytes a-b/t`; None
    when there is none or it makes no sense."""
    match = _CONTENT_RANGE.match(header or "")
    if match is None:
        return None
    first, last, total = match.groups()
    start, end = int(first), int(last) + 1
    size = None if total == "*" else int(total)
    if end <= start or (size is not None and end > size):
        return None
    return start, end, size


def unsatisfied_size(header: str | None) -> int | None:
    """The size a 416's `Content-Range: bytes */N` gives, or None."""
    match = _UNSATISFIED.match(header or "")
    return int(match.group(1)) if match else None


def range_from(position: int, end: int | None) -> bytes:
    """The `Range` value asking for bytes [position, end) (to the end when `end` is None)."""
    if end is None:
        return b"bytes=%d-" % position
    return b"bytes=%d-%d" % (position, end - 1)
