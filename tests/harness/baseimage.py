"""A base image for building the project's Dockerfile here, where python:3.11-slim cannot be
fetched: Debian 12 with Python 3.11, made by mmdebstrap from the Debian mirrors apt uses on
this machine, kept as a root file system tarball between runs (`base_rootfs()`).

What the Dockerfile needs of its base is what the official image provides: `python` (here
python-is-python3), `python -m venv` with pip inside (python3-venv), pip itself
(python3-pip), `groupadd`/`useradd` (passwd) and CA certificates. Measured here (2 cores):
mmdebstrap `--variant=essential` about 40 s and 130 MB (minbase: 55 s; debootstrap
--variant=minbase: 140 s and 300 MB, usrmerge pulls in perl); nearly all of it is dpkg
unpacking and byte-compiling the standard library, the downloads take 3 s.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

from .upstream import default_cache_dir

SUITE = "bookworm"  # Python 3.11, as in python:3.11-slim
PACKAGES = ("passwd", "python3", "python3-venv", "python3-pip", "python-is-python3")
# merged /usr without the usrmerge package (and its perl); no docs, man pages or
# translations (as in the slim image); dpkg without fsync (the result is a tarball).
MMDEBSTRAP_OPTIONS = (
    "--variant=essential", "--mode=root", "--format=tar",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=force-unsafe-io",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
BUILD_TIMEOUT = 900.0


def apt_sources(suite: str = SUITE) -> list[str]:
    """`deb URI SUITE main` lines for the archives apt on this machine is configured with
    for `suite` (and its -updates and -security), whatever style of sources.list names
    them: the same mirrors mmdebstrap then fetches from."""
    out = subprocess.run(
        ["apt-get", "indextargets", "--no-release-info",
         "--format", "$(SITE) $(RELEASE) $(COMPONENT) $(IDENTIFIER)"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    lines: list[str] = []
    for target in out.splitlines():
        fields = target.split()
        if len(fields) != 4:
            continue
        site, release, component, identifier = fields
        if identifier == "Packages" and component == "main" \
                and release in (suite, f"{suite}-updates", f"{suite}-security"):
            entry = f"deb {site} {release} main"
            if entry not in lines:
                lines.append(entry)
    if not any(line.split()[2] == suite for line in lines):
        raise RuntimeError(f"apt on this machine has no {suite} main archive "
                           f"(apt-get indextargets):\n{out}")
    return sorted(lines, key=lambda entry: entry.split()[2] != suite)  # the release first


def _apt_proxy_options() -> list[str]:
    """The host's apt proxies, for the apt mmdebstrap runs with a configuration of its own."""
    out = subprocess.run(["apt-config", "dump"], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return [f"--aptopt={line.strip()}" for line in out.splitlines()
            if re.match(r"^Acquire::(https?|ftp)::Proxy(::\S+)?\s", line)]


def cache_key(sources: list[str]) -> str:
    """What the tarball is made from: a change in any of it makes a new one."""
    recipe = {"suite": SUITE, "packages": PACKAGES, "options": MMDEBSTRAP_OPTIONS,
              "sources": sources, "proxies": _apt_proxy_options()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def base_rootfs(cache_dir: Path | None = None, log: Path | None = None) -> Path:
    """The base image's root file system as a tarball, made once per machine (and recipe)
    in `cache_dir` ($DOCXY_TEST_CACHE or /tmp/docxy-test-cache) and reused after."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sources = apt_sources()
    tarball = cache / f"base-{SUITE}-python3-{cache_key(sources)}.tar"
    with open(cache / f"{tarball.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others wait and reuse
        if tarball.exists():
            return tarball
        partial = tarball.with_name(tarball.name + f".{os.getpid()}.partial")
        argv = ["mmdebstrap", *MMDEBSTRAP_OPTIONS, *_apt_proxy_options(),
                f"--include={','.join(PACKAGES)}", SUITE, str(partial), *sources]
        started = time.monotonic()
        try:
            result = subprocess.run(argv, capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"mmdebstrap took more than {BUILD_TIMEOUT} s") from None
        if log is not None:
            log.write_text(f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}"
                           f"--- {time.monotonic() - started:.1f} s, exit {result.returncode}\n")
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = "\n".join(result.stderr.splitlines()[-30:])
            raise RuntimeError(f"mmdebstrap exited {result.returncode}:\n{tail}")
        partial.rename(tarball)
        return tarball


__all__ = ["PACKAGES", "SUITE", "apt_sources", "base_rootfs", "cache_key"]
