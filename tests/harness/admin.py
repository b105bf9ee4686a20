"""The `docxy` command as an operator runs it against a daemon's --admin-listen: the
installed console script (or, with DOCXY_TEST_CHECKOUT, the checkout's module)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs


@attrs.frozen
class Ran:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def docxy_command() -> list[str]:
    if os.environ.get("DOCXY_TEST_CHECKOUT"):
        return [sys.executable, "-m", "docxy.cli.main"]
    script = Path(sys.executable).parent / "docxy"
    return [str(script) if script.exists() else "docxy"]


def run_cli(admin_url: str | None, *args: str, timeout: float = 300,
            env: dict[str, str] | None = None) -> Ran:
    """Run `docxy [--admin URL] ARGS...` with no standard input, as a script would."""
    environ = {**os.environ, **(env or {})}
    if os.environ.get("DOCXY_TEST_CHECKOUT"):
        environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    argv = docxy_command() + (["--admin", admin_url] if admin_url else []) + list(args)
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=environ)
    return Ran(done.returncode, done.stdout, done.stderr)
