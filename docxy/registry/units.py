"""Bandwidths as operators write them (`max_rate = "50MB/s"`), as bytes per second."""
from __future__ import annotations

import re

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b|bit)\s*/\s*s\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bandwidth(text: str) -> float:
    """Bytes per second from `50MB/s`, `1.5GB/s`, `200MiB/s`, `400Mbit/s` (k, M, G, T
    are powers of 1000; Ki, Mi, Gi, Ti of 1024; bit is an eighth of a byte)."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"a rate is like 50MB/s, 200MiB/s or 400Mbit/s, not {text!r}")
    number, prefix, binary, unit = match.groups()
    value = float(number) * (1024 if binary else 1000) ** _POWERS[prefix.lower()]
    if unit.lower() == "bit":
        value /= 8
    if value < 1024:
        raise ValueError(f"{text!r} is below 1 KiB/s: no download would ever finish")
    return value
