"""The C allocator's settings for a daemon that streams large chunks.

Every read of a blob makes a bytes object of 256 KiB to 1 MiB, freed a moment later.  With
glibc's defaults such a chunk is at first mmap'ed and unmapped each time, and later, once
the heap's top is freed, the heap is trimmed and grown again: either way every chunk costs
fresh pages from the kernel, faulted in and zeroed.  Measured here on a warm 512 MiB pull
from a freshly started docxy: ~500 MB/s at 1.8 CPU s/GB with the defaults, ~1.3–1.9 GB/s at
0.4–0.6 CPU s/GB with these settings.  They keep chunks below 4 MiB in the heap and let up
to 32 MiB of free heap stay mapped (reused by the next chunks, not lost).

Only glibc has `mallopt`; elsewhere nothing is changed.  `MALLOC_*` variables set by the
operator win: glibc reads them at start, and docxy then leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from twisted.logger import Logger

log = Logger()

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {
    M_MMAP_THRESHOLD: 4 * 1024 * 1024,
    M_TRIM_THRESHOLD: 32 * 1024 * 1024,
    M_TOP_PAD: 4 * 1024 * 1024,
}


def tune_allocator(environ: dict[str, str] | None = None) -> bool:
    """Apply SETTINGS with glibc's mallopt; False (and nothing changed) where there is no
    glibc or the operator set MALLOC_* variables."""
    environ = os.environ if environ is None else environ
    if any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in environ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    if not ok:
        log.warn("could not tune the C allocator (mallopt refused); streaming costs more CPU")
    return ok
