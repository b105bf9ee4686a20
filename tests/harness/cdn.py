"""The "CDN": nginx serving the registry's storage directory over HTTPS on another host name.

The registry's `redirect` middleware sends blob GET/HEAD to `<baseurl>/docker/registry/v2/
blobs/sha256/<ab>/<hex>/data`; nginx serves that path from the storage root directory, with
Range support, and logs each request as JSON including `auth=yes/no` (never the value) and
the `range` and `if_range` asked for.

`restart(mode=...)` makes it misbehave: "ok", "slow" (rate-limited to `slow_rate`), "error"
(503), "missing" (404), "corrupt" (same length, one byte flipped in every blob),
"expire-first" (403 to the first request for each path, as to a signed URL that expired,
then served: harness.expirygate keeps the state), "forbidden" (403 always), "norange"
(served, but Range is ignored: 200 with the whole body, `max_ranges 0`), "single-use" (each
URL, path and query, is served to one GET and refused 403 afterwards, as a signed URL that
is good for one fetch; a HEAD is answered without using the URL up; with the front's `sign_redirects` every redirect carries its own
`?sig=`, so a client that asks the registry again gets a URL that works, and one that
re-uses an old URL is refused; expirygate keeps the state). A connection cut mid-body is
`stop()` during a transfer, or harness.cutter in front of it (Upstream's `cdn_cutter`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from .nginx import JSON_LOG_FORMAT, NginxProcess
from .pki import ServerCert
from .procs import ManagedProcess, free_port, wait_for_port

CdnMode = Literal["ok", "slow", "error", "missing", "corrupt", "expire-first", "forbidden",
                  "norange", "single-use"]
_GATED_MODES = ("expire-first", "single-use")
# The harness's JSON access log plus the request's If-Range (resumes send it with the ETag).
_CDN_LOG_FORMAT = JSON_LOG_FORMAT.replace("harness_json", "harness_cdn_json").replace(
    '"range":"$http_range",', '"range":"$http_range","if_range":"$http_if_range",')


class Cdn:
    """nginx on https://<host>:<port>/ serving `storage_dir` (the registry rootdirectory)."""

    def __init__(self, workdir: Path, storage_dir: Path, cert: ServerCert,
                 host: str = "localhost", port: int = 0, interface: str = "127.0.0.1",
                 mode: CdnMode = "ok", slow_rate: str = "1m") -> None:
        self.workdir = Path(workdir)
        self.storage_dir = Path(storage_dir)
        self.cert = cert
        self.host = host
        self.interface = interface
        self.port = port or free_port(interface)
        self.mode: CdnMode = mode
        self.slow_rate = slow_rate
        self.nginx = NginxProcess("cdn-nginx", self.workdir, self.port, "", interface)
        self.gate_port = free_port()
        self.gate: ManagedProcess | None = None  # harness.expirygate, in _GATED_MODES

    @property
    def url(self) -> str:
        """The base URL the registry redirects to (host name differs from the registry's)."""
        return f"https://{self.host}:{self.port}"

    def _location(self) -> str:
        if self.mode == "ok":
            return f"root {self.storage_dir};"
        if self.mode == "slow":
            return f"root {self.storage_dir}; limit_rate {self.slow_rate};"
        if self.mode == "error":
            return 'return 503 "cdn unavailable\\n";'
        if self.mode == "missing":
            return "return 404;"
        if self.mode == "corrupt":
            return f"root {self._corrupt_tree()};"
        if self.mode in _GATED_MODES:
            return f"auth_request /_gate; root {self.storage_dir};"
        if self.mode == "forbidden":
            return 'return 403 "signature expired\\n";'
        if self.mode == "norange":
            return f"root {self.storage_dir}; max_ranges 0;"
        raise ValueError(f"unknown CDN mode {self.mode!r}")

    def _corrupt_tree(self) -> Path:
        """A copy of every blob with its middle byte flipped (same length, wrong digest)."""
        root = self.workdir / "corrupt"
        shutil.rmtree(root, ignore_errors=True)
        blobs = self.storage_dir / "docker/registry/v2/blobs"
        for data in blobs.rglob("data"):
            target = root / data.relative_to(self.storage_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, target)
            size = target.stat().st_size
            if size:
                with open(target, "r+b") as f:
                    f.seek(size // 2)
                    b = f.read(1)
                    f.seek(size // 2)
                    f.write(bytes([b[0] ^ 0xFF]))
        return root

    def _http_body(self) -> str:
        return f"""
    {_CDN_LOG_FORMAT}
    server {{
        access_log {self.nginx.access_log_path} harness_cdn_json;
        listen {self.interface}:{self.port} ssl;
        server_name {self.host};
        ssl_certificate {self.cert.chain_path};
        ssl_certificate_key {self.cert.key_path};
        location = /health {{ return 200 "ok\\n"; }}
        location /docker/ {{
            {self._location()}
        }}
        location = /_gate {{
            internal;
            proxy_pass http://127.0.0.1:{self.gate_port}/check;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
        location / {{ return 404; }}
    }}
"""

    def start(self, timeout: float = 30.0) -> "Cdn":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.mode in _GATED_MODES:
            self._start_gate(timeout)
        self.nginx.http_body = self._http_body()
        self.nginx.start(timeout)
        return self

    def _start_gate(self, timeout: float) -> None:
        tests_dir = str(Path(__file__).resolve().parent.parent)
        self.gate = ManagedProcess(
            "cdn-gate", [sys.executable, "-m", "harness.expirygate", "--port", str(self.gate_port),
                         "--mode", self.mode],
            self.workdir / "gate.log", env={"PYTHONPATH": tests_dir})
        self.gate.start()
        wait_for_port("127.0.0.1", self.gate_port, timeout, self.gate)

    def stop(self) -> None:
        self.nginx.stop()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None

    def running(self) -> bool:
        return self.nginx.running()

    def restart(self, mode: CdnMode | None = None) -> "Cdn":
        """Restart on the same port, optionally in another mode."""
        self.stop()
        if mode is not None:
            self.mode = mode
        return self.start()

    def access_log_lines(self) -> list[str]:
        return self.nginx.access_log_lines()

    def access_log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log_lines() if line.strip()]

    def __enter__(self) -> "Cdn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
