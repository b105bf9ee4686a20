"""Pure parsing of a `Range` header against a blob's size (RFC 9110, bytes, one range)."""
from __future__ import annotations

import re

_SPEC = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")

UNSATISFIABLE = "unsatisfiable"


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
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
        n = int(last)
        if n == 0:
            return UNSATISFIABLE
        return max(size - n, 0), size
    start = int(first)
    if start >= size:
        return UNSATISFIABLE
    end = size if last == "" else min(int(last) + 1, size)
    if end <= start:
        return None  # last < first: syntactically invalid, ignore
    return start, end
