"""The registry's public face: nginx terminating TLS in front of distribution, as Hub has.

It proxies everything to the registry unchanged (streaming, no buffering, Location headers
untouched), sends tag-list requests to `tagpager` because distribution 2.8 does not paginate
them, adds Hub's `ratelimit-*` headers to manifest answers, and logs every request as JSON
(with `auth=yes/no`, never the value) so tests can see what reached the upstream.

With `referrers_storage` (the registry's storage directory) it sends
`/v2/<name>/referrers/<digest>` to `harness.referrers`, which implements the OCI 1.1
referrers API that distribution 2.8 lacks; without it those paths reach the registry, which
answers 404, as a registry without the API does.

With `sign_redirects` it appends `?sig=<nginx $request_id>` to every redirect into the
storage tree (the registry's blob 307s to the CDN), so each redirect hands out a URL of its
own, as Hub's signed CDN URLs are; the CDN's "single-use" mode then refuses a URL used twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .nginx import NginxProcess
from .pki import ServerCert
from .procs import ManagedProcess, free_port, wait_for_port


class RegistryFront:
    """nginx (TLS on `port`) + the tag pager, in front of a plain-HTTP registry."""

    def __init__(self, workdir: Path, backend_port: int, cert: ServerCert, port: int = 0,
                 interface: str = "127.0.0.1", sign_redirects: bool = False,
                 referrers_storage: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.sign_redirects = sign_redirects
        self.backend_port = backend_port
        self.cert = cert
        self.interface = interface
        self.port = port or free_port(interface)
        self.pager_port = free_port(interface)
        tests_dir = str(Path(__file__).resolve().parent.parent)
        self.referrers: ManagedProcess | None = None
        if referrers_storage is not None:
            self.referrers_port = free_port(interface)
            self.referrers = ManagedProcess(
                "referrers",
                [sys.executable, "-m", "harness.referrers", "--port", str(self.referrers_port),
                 "--interface", interface, "--backend", f"http://{interface}:{backend_port}",
                 "--storage", str(referrers_storage)],
                self.workdir / "referrers.log", env={"PYTHONPATH": tests_dir})
        self.nginx = NginxProcess("front-nginx", self.workdir, self.port, self._http_body(),
                                  interface)
        self.pager = ManagedProcess(
            "tagpager",
            [sys.executable, "-m", "harness.tagpager", "--port", str(self.pager_port),
             "--interface", interface, "--backend", f"http://{interface}:{backend_port}"],
            self.workdir / "tagpager.log", env={"PYTHONPATH": tests_dir})

    @property
    def url(self) -> str:
        return f"https://{self.interface}:{self.port}"

    def _http_body(self) -> str:
        i = self.interface
        return f"""
    upstream harness_registry {{ server {i}:{self.backend_port}; keepalive 16; }}
    upstream harness_tagpager {{ server {i}:{self.pager_port}; keepalive 4; }}
    server {{
        listen {i}:{self.port} ssl;
        server_name _;
        ssl_certificate {self.cert.chain_path};
        ssl_certificate_key {self.cert.key_path};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_buffering off;
        proxy_request_buffering off;
        {self._redirect_rule()}
        proxy_read_timeout 900s;
        proxy_send_timeout 900s;
        location ~ ^/v2/.+/tags/list$ {{
            proxy_pass http://harness_tagpager;
        }}
        {self._referrers_location()}
        location ~ ^/v2/.+/manifests/ {{
            add_header ratelimit-limit "100;w=21600" always;
            add_header ratelimit-remaining "99;w=21600" always;
            add_header docker-ratelimit-source "127.0.0.1" always;
            proxy_pass http://harness_registry;
        }}
        location / {{
            proxy_pass http://harness_registry;
        }}
    }}
"""

    def _referrers_location(self) -> str:
        if self.referrers is None:
            return ""
        return (f"location ~ ^/v2/.+/referrers/ {{\n"
                f"            proxy_pass http://{self.interface}:{self.referrers_port};\n"
                f"        }}")

    def _redirect_rule(self) -> str:
        if not self.sign_redirects:
            return "proxy_redirect off;"
        # Only a Location into the storage tree without a query of its own: blob redirects.
        return r'proxy_redirect "~^([^?]*/docker/registry/v2/[^?]*)$" "$1?sig=$request_id";'

    def start(self, timeout: float = 30.0) -> "RegistryFront":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nginx.http_body = self._http_body()
        self.pager.start()
        wait_for_port(self.interface, self.pager_port, timeout, self.pager)
        if self.referrers is not None:
            self.referrers.start()
            wait_for_port(self.interface, self.referrers_port, timeout, self.referrers)
        self.nginx.start(timeout)
        return self

    def stop(self) -> None:
        self.nginx.stop()
        self.pager.stop()
        if self.referrers is not None:
            self.referrers.stop()

    def running(self) -> bool:
        return self.nginx.running()

    def access_log_lines(self) -> list[str]:
        return self.nginx.access_log_lines()

    def __enter__(self) -> "RegistryFront":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
