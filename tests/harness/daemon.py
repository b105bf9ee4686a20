"""Runs the installed docxy as an operator would: `twistd -n --pidfile= docxy ...` in a
scratch directory (so the checkout is not on sys.path and the installed plugin is used)."""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from harness.procs import ManagedProcess, free_port, wait_for_port


def mirror_args(upstream, *extra: str, cache: Path | None = None,
                url: str | None = None) -> list[str]:
    """docxy's options for mirroring the test `upstream` as docker.io (library/ on); `url`
    replaces the registry's URL (a proxy of the test's own in front of it, with a
    certificate from the upstream's CA)."""
    args = ["--upstream", url or upstream.registry_url, "--upstream-ca", str(upstream.ca_path),
            "--library"]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    return args + list(extra)


def cached_blob(cache: Path, digest: str) -> Path:
    """Where docxy's store keeps a blob (docxy.cache.store.BlobStore.path)."""
    algorithm, _, hex_part = digest.partition(":")
    return cache / "blobs" / algorithm / hex_part[:2] / hex_part


def twistd_path() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


class Docxy:
    """One docxy daemon.  `port` serves plain HTTP; with `tls_port` it serves HTTPS there
    (then `port` only redirects)."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str] = (),
        *,
        tls: tuple[Path, Path] | None = None,
        env: dict[str, str] | None = None,
        name: str = "docxy",
        tls_host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_host = tls_host
        self.tls_port = free_port(tls_host) if tls else None
        argv = [twistd_path(), "-n", "--pidfile=", "docxy",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        if tls:
            interface = tls_host.replace(":", "\\:")  # strports escapes colons
            kind = "tcp6" if ":" in tls_host else "tcp"
            argv += ["--tls", f"{kind}:{self.tls_port}:interface={interface}",
                     "--cert", str(tls[0]), "--key", str(tls[1])]
        argv += list(args)
        if "--no-cache" not in args and "--cache-dir" not in args:
            # never the real ~/.cache: each daemon of the suite has its own cache
            argv += ["--cache-dir", str(self.workdir / "cache")]
        if os.environ.get("DOCXY_TEST_CHECKOUT"):
            # developers: run the checkout's docxy without reinstalling it
            checkout = str(Path(__file__).resolve().parents[2])
            env = {**(env or {}), "PYTHONPATH": checkout}
        self.process = ManagedProcess(name, argv, self.workdir / f"{name}.log",
                                      env=env, cwd=self.workdir)

    @property
    def url(self) -> str:
        """The API URL (HTTPS when TLS is on)."""
        if self.tls_port:
            host = f"[{self.tls_host}]" if ":" in self.tls_host else self.tls_host
            return f"https://{host}:{self.tls_port}"
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Docxy":
        self.process.start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
            if self.tls_port:
                wait_for_port(self.tls_host, self.tls_port, timeout)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{self.plain_url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        except Exception:
            self.process.stop()
            raise RuntimeError(f"docxy did not start:\n{self.log()}") from None
        return self

    def stop(self) -> None:
        self.process.stop()

    def log(self) -> str:
        try:
            return self.process.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def request(self, path: str, headers: dict | None = None, method: str = "GET",
                body: bytes | None = None, timeout: float = 60
                ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request to the plain-HTTP port: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def stream(self, path: str, headers: dict, out: dict, pause: float = 0.0,
               chunk: int = 1 << 20, go_fast: threading.Event | None = None) -> None:
        """GET `path` reading `chunk` bytes at a time, sleeping `pause` between reads
        (until `go_fast` is set); records in `out` the status, the bytes read and their
        digest, or the exception.  Meant to run in a thread while a test makes trouble."""
        h = hashlib.sha256()
        out["read"] = 0
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            out["status"] = response.status
            while data := response.read(chunk):
                h.update(data)
                out["read"] += len(data)
                if pause and not (go_fast is not None and go_fast.is_set()):
                    time.sleep(pause)
            out["digest"] = "sha256:" + h.hexdigest()
        except Exception as e:  # for the test to assert
            out["error"] = e
        finally:
            conn.close()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def __enter__(self) -> "Docxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Docxy", "cached_blob", "mirror_args", "twistd_path"]
