"""A TLS front of our own between docxy and the test upstream's registry, that answers as a
rate-limited Hub does when told to: nginx proxying to the upstream's front (so its access
log, its `ratelimit-*` headers and its redirects to the CDN are unchanged) in mode "pass",
and in mode "429" answering every `/v2/<name>/...` request, HEAD and GET, with
`429 TOOMANYREQUESTS`, `Retry-After` and Hub's `ratelimit-*` headers, while `/v2/` itself
(the ping, the challenge) still passes.

    front = FaultFront(workdir, upstream.registry_url, upstream.registry_cert).start()
    docxy --upstream front.url ...; front.set_mode("429")   # same port, new mode

It logs every request as JSON (harness.nginx); `entries()` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from .nginx import NginxProcess
from .pki import ServerCert
from .procs import free_port

FaultMode = Literal["pass", "429"]
RETRY_AFTER = "1"  # seconds; containers/image (podman, skopeo) waits this long before each
# of its own retries of a 429, so a 429 that reaches them costs seconds, not minutes
TOO_MANY = json.dumps({"errors": [{
    "code": "TOOMANYREQUESTS",
    "message": "You have reached your pull rate limit (fault injected by the test).",
    "detail": None}]})


class FaultFront:
    """nginx on https://127.0.0.1:`port` proxying to `backend_url` (an https URL)."""

    def __init__(self, workdir: Path, backend_url: str, cert: ServerCert,
                 mode: FaultMode = "pass", interface: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.backend_url = backend_url.rstrip("/")
        self.cert = cert
        self.interface = interface
        self.port = free_port(interface)
        self.mode: FaultMode = mode
        self.nginx = NginxProcess("fault-front", self.workdir, self.port, "", interface)

    @property
    def url(self) -> str:
        return f"https://{self.interface}:{self.port}"

    def _names_location(self) -> str:
        if self.mode == "pass":
            return f"proxy_pass {self.backend_url};"
        if self.mode == "429":
            body = TOO_MANY.replace("\\", "\\\\").replace("'", "\\'")
            return (f"default_type application/json;\n"
                    f"            add_header Retry-After {RETRY_AFTER} always;\n"
                    f'            add_header ratelimit-limit "100;w=21600" always;\n'
                    f'            add_header ratelimit-remaining "0;w=21600" always;\n'
                    f"            return 429 '{body}';")
        raise ValueError(f"unknown fault mode {self.mode!r}")

    def _http_body(self) -> str:
        i = self.interface
        return f"""
    server {{
        listen {i}:{self.port} ssl;
        server_name _;
        ssl_certificate {self.cert.chain_path};
        ssl_certificate_key {self.cert.key_path};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $proxy_host;
        proxy_ssl_server_name off;
        proxy_ssl_verify off;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_redirect off;
        proxy_read_timeout 900s;
        location = /v2/ {{
            proxy_pass {self.backend_url};
        }}
        location ~ ^/v2/.+/ {{
            {self._names_location()}
        }}
        location / {{
            proxy_pass {self.backend_url};
        }}
    }}
"""

    def start(self, timeout: float = 30.0) -> "FaultFront":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nginx.http_body = self._http_body()
        self.nginx.start(timeout)
        return self

    def stop(self) -> None:
        self.nginx.stop()

    def running(self) -> bool:
        return self.nginx.running()

    def set_mode(self, mode: FaultMode) -> "FaultFront":
        """Restart on the same port in `mode` (open connections are closed)."""
        self.stop()
        self.mode = mode
        return self.start()

    def entries(self) -> list[dict[str, Any]]:
        """The requests it answered, oldest first (nginx writes a line once it has answered)."""
        return [json.loads(line) for line in self.nginx.access_log_lines() if line.strip()]

    def __enter__(self) -> "FaultFront":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["FaultFront", "FaultMode", "RETRY_AFTER"]
