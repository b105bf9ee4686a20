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


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds from `90s`, `15m`, `6h`, `30d`, `2w` (a bare number is seconds)."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"a duration is like 30d, 6h, 15m or 90s, not {text!r}")
    value = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    if value <= 0:
        raise ValueError(f"a duration must be positive, not {text!r}")
    return value
