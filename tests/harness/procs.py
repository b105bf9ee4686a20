"""Process plumbing for the harness: free ports, waiting for a port, and a managed child.

A `ManagedProcess` owns one child started with `subprocess.Popen`, writes its output to a
log file, and always terminates and reaps it in `stop()` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the kernel picks it) and that
    this process has not handed out before: the kernel may offer a port again as soon as
    the probe socket closes, and a daemon given the same port for two listeners (plain and
    TLS, picked one after the other before it starts) fails with "Address already in use"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port after 100 tries")


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30.0,
                  process: "ManagedProcess | None" = None) -> None:
    """Block until host:port accepts connections; raise TimeoutError (or RuntimeError when
    `process` exits first, with the tail of its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if process is not None and not process.running():
            raise RuntimeError(
                f"{process.name} exited with {process.returncode} before listening on "
                f"{host}:{port}; log tail:\n{process.log_tail()}")
        time.sleep(0.05)
    tail = process.log_tail() if process is not None else ""
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s\n{tail}")


def wait_for_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until nothing accepts connections on host:port any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still accepts connections after {timeout}s")


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, read from /proc (Linux)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def descendants_of(pid: int) -> list[int]:
    """All descendants of `pid`, depth first."""
    result: list[int] = []
    for child in children_of(pid):
        result.append(child)
        result.extend(descendants_of(child))
    return result


class ManagedProcess:
    """One child process with its output in a log file; `stop()` always reaps it.

    The child runs in its own session so that a stray signal to the test's process group
    does not hit it, and so that `stop()` can also end grandchildren it may have spawned.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._group_cleaned = False

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else None

    def start(self) -> "ManagedProcess":
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.cwd, start_new_session=True)
        self._group_cleaned = False
        return self

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.running():
            assert self._popen is not None
            self._popen.send_signal(signum)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig` (SIGTERM), wait up to `timeout`, then SIGKILL the whole session; reap."""
        if self._popen is None:
            return None
        popen = self._popen
        if self._group_cleaned:
            return popen.returncode
        if popen.poll() is None:
            try:
                popen.send_signal(sig)
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout)
        # Anything left in the child's own process group (workers that outlived their master
        # after a SIGKILL) goes too; the group id cannot be reused while members remain.
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._group_cleaned = True
        return popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


T = TypeVar("T")


def poll_until(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Call `check` until it returns something truthy and return that; raise TimeoutError.
    For logs: nginx writes an access-log line only after the response is sent, so a client
    can finish reading before the line exists."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s (last: {result!r})")
        time.sleep(interval)
