"""Run the CNCF distribution registry (`docker-registry serve`, v2.8) from a generated config.

`RegistrySettings` says how: plain HTTP or TLS, token auth or none, the `redirect` storage
middleware (blob GET/HEAD -> 307 to a CDN base URL) or none, pull-through proxy mode or not.
`Registry` writes the config and runs the process; `restart(**changes)` keeps the storage.
The config is written as JSON, which is valid YAML for the registry's parser.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import ManagedProcess, free_port, wait_for_port, wait_for_port_closed

REGISTRY_BINARY = "docker-registry"


@dataclass(frozen=True)
class TokenAuth:
    """`auth.token`: the registry sends clients to `realm` and trusts tokens signed by a
    certificate chaining to `rootcertbundle` (the token signer's own certificate works)."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class ProxySettings:
    """`proxy`: pull-through cache mode against `remoteurl`. `ca_path` is exported as
    SSL_CERT_FILE so the Go TLS client trusts a test upstream."""

    remoteurl: str
    username: str | None = None
    password: str | None = None
    ca_path: Path | None = None


@dataclass(frozen=True)
class RegistrySettings:
    storage_dir: Path
    port: int = 0
    interface: str = "127.0.0.1"
    tls_cert_path: Path | None = None   # full chain PEM
    tls_key_path: Path | None = None
    token_auth: TokenAuth | None = None
    redirect_baseurl: str | None = None
    proxy: ProxySettings | None = None
    log_level: str = "info"
    delete_enabled: bool = True

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert_path else "http"
        return f"{scheme}://{self.interface}:{self.port}"


def registry_config(s: RegistrySettings) -> dict[str, Any]:
    """The distribution config for `s`, as a dict."""
    http: dict[str, Any] = {
        "addr": f"{s.interface}:{s.port}",
        "secret": secrets.token_hex(16),
        "headers": {"X-Content-Type-Options": ["nosniff"]},
    }
    if s.tls_cert_path:
        http["tls"] = {"certificate": str(s.tls_cert_path), "key": str(s.tls_key_path)}
    storage: dict[str, Any] = {
        "filesystem": {"rootdirectory": str(s.storage_dir)},
        "delete": {"enabled": s.delete_enabled},
        "maintenance": {"uploadpurging": {"enabled": False}},
    }
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": s.log_level, "formatter": "text",
                "fields": {"service": "registry"}},
        "storage": storage,
        "http": http,
        "health": {"storagedriver": {"enabled": False}},
    }
    if s.token_auth:
        t = s.token_auth
        config["auth"] = {"token": {
            "realm": t.realm, "service": t.service, "issuer": t.issuer,
            "rootcertbundle": str(t.rootcertbundle), "autoredirect": False,
        }}
    if s.redirect_baseurl:
        config["middleware"] = {"storage": [
            {"name": "redirect", "options": {"baseurl": s.redirect_baseurl}}]}
    if s.proxy:
        proxy: dict[str, Any] = {"remoteurl": s.proxy.remoteurl}
        if s.proxy.username:
            proxy["username"] = s.proxy.username
            proxy["password"] = s.proxy.password or ""
        config["proxy"] = proxy
    return config


class Registry:
    """One `docker-registry serve` process; stop/start/restart keep the storage directory."""

    def __init__(self, settings: RegistrySettings, workdir: Path, name: str = "registry") -> None:
        if not shutil.which(REGISTRY_BINARY):
            raise RuntimeError(f"{REGISTRY_BINARY} is not installed (apt install docker-registry)")
        if not settings.port:
            settings = dataclasses.replace(settings, port=free_port(settings.interface))
        self.settings = settings
        self.workdir = Path(workdir)
        self.name = name
        self.config_path = self.workdir / f"{name}.yml"
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> "Registry":
        if self.process is not None and self.process.running():
            raise RuntimeError(f"{self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path(self.settings.storage_dir).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(registry_config(self.settings), indent=2))
        env: dict[str, str] = {}
        if self.settings.proxy and self.settings.proxy.ca_path:
            env["SSL_CERT_FILE"] = str(self.settings.proxy.ca_path)
        self.process = ManagedProcess(
            self.name, [REGISTRY_BINARY, "serve", str(self.config_path)], self.log_path,
            env=env)
        self.process.start()
        wait_for_port(self.settings.interface, self.settings.port, timeout, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
            wait_for_port_closed(self.settings.interface, self.settings.port)

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def restart(self, **changes: Any) -> "Registry":
        """Stop, apply `changes` to the settings (e.g. `token_auth=None`), start again on the
        same port and storage."""
        self.stop()
        self.settings = dataclasses.replace(self.settings, **changes)
        return self.start()

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
