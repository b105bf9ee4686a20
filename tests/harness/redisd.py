"""A real redis-server for the tests, on 127.0.0.1 and a port picked at random, kept in the
foreground as a child of the test process (no persistence: `--save '' --appendonly no`).
It can be stopped and restarted on the same port to play "Redis went away and came back"."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from harness.procs import ManagedProcess, free_port, wait_for_port, wait_for_port_closed


class RedisServer:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process = ManagedProcess(
            "redis-server",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)],
            self.workdir / "redis.log", cwd=self.workdir)

    @classmethod
    def start(cls, workdir: Path) -> "RedisServer":
        """A running redis-server with its log and working directory in `workdir`."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(workdir, free_port())
        server._run()
        return server

    def _run(self, timeout: float = 15.0) -> None:
        self.process.start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout, process=self.process)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if self.cli("PING").strip() == "PONG":
                        return
                except subprocess.SubprocessError:
                    pass
                if time.monotonic() > deadline or not self.process.running():
                    raise RuntimeError(f"redis-server on port {self.port} does not answer PING; "
                                       f"log tail:\n{self.process.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        """Stop the server (idempotent); the port stays this object's for `restart`."""
        if self.process.running():
            self.process.stop()
            wait_for_port_closed("127.0.0.1", self.port)
        else:
            self.process.stop()  # reaps a child that died by itself

    def restart(self) -> None:
        """Start again on the same port (empty: nothing is persisted)."""
        self.stop()
        self._run()

    def running(self) -> bool:
        return self.process.running()

    def cli(self, *args: object, timeout: float = 10.0) -> str:
        """`redis-cli -p PORT args...`: its stdout (raises CalledProcessError on failure)."""
        result = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *map(str, args)],
            capture_output=True, text=True, timeout=timeout, check=True)
        return result.stdout

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
