"""Warm-up progress as `docker pull` shows it: a line per layer, redrawn in place on a
terminal; on anything else (a CI log, a pipe) a line per step, never a redraw."""
from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 40


def human(n: float) -> str:
    """Bytes as docker prints them (decimal units): 12.3MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def bar(done: int, size: int) -> str:
    if size <= 0:
        return f"{human(done)}"
    filled = min(WIDTH, int(WIDTH * done / size))
    arrow = ">" if filled < WIDTH else ""
    return f"[{'=' * max(filled - len(arrow), 0)}{arrow}{' ' * (WIDTH - filled)}] " \
           f"{human(done)}/{human(size)}"


class Progress:
    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self._order: list[str] = []
        self._lines: dict[str, str] = {}
        self._drawn = 0
        self.total = 0
        self.count = 0
        self._done: dict[str, int] = {}
        self._complete: set[str] = set()

    def event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self._print(f"{event.get('reference')}: Pulling from {event.get('repository')} "
                        f"({event.get('registry')})")
        elif kind == "manifest" and event.get("platform"):
            p = event["platform"]
            self._print(f"{'/'.join(str(p.get(k)) for k in ('os', 'architecture', 'variant') if p.get(k))}"
                        f": {event.get('digest')}")
        elif kind == "blobs":
            self.total, self.count = int(event.get("bytes") or 0), int(event.get("count") or 0)
        elif kind == "blob":
            self._blob(event)
        elif kind == "done":
            self._summary()
            self._print(f"Digest: {event.get('digest')}")
            self._print(f"Status: {event.get('blobs', 0) - event.get('already_cached', 0)} "
                        f"blob(s) downloaded ({human(event.get('downloaded', 0))}), "
                        f"{event.get('already_cached', 0)} already cached")
        elif kind == "error":
            self._print(f"Error: {event.get('error')}")

    def _blob(self, event: dict) -> None:
        key = str(event.get("id"))
        status = str(event.get("status"))
        size = int(event.get("size") or 0)
        done = int(event.get("done") or 0)
        self._done[key] = size if status in ("Already exists", "Pull complete") else done
        if status in ("Already exists", "Pull complete"):
            self._complete.add(key)
        if not self.tty:
            if status != "Downloading" or key not in self._lines:
                self._lines[key] = status
                self._print(f"{key}: {status}" + (f" {human(size)}" if status != "Downloading"
                                                  else ""))
            return
        line = f"{key}: {status} {bar(done, size)}" if status == "Downloading" else \
            f"{key}: {status}"
        if key not in self._lines:
            self._order.append(key)
        self._lines[key] = line
        self._redraw()

    def _summary(self) -> None:
        if self.tty and self.count:
            self._redraw()

    def _redraw(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F")
        layers = f"{len(self._complete)}/{self.count} layers"
        lines = [self._lines[k] for k in self._order] + [
            f"{layers} {bar(sum(self._done.values()), self.total)}"]
        for line in lines:
            self.out.write("\x1b[2K" + line + "\n")
        self._drawn = len(lines)
        self.out.flush()

    def _print(self, text: str) -> None:
        if self.tty and self._drawn:
            self._drawn = 0  # the bars stay above; new lines go below them
        self.out.write(text + "\n")
        self.out.flush()
