"""One Docker-Hub-like upstream on 127.0.0.1, composed of the harness parts.

`Upstream.start(workdir)` creates a test PKI, pushes the test images into a fresh
distribution registry with auth off, starts the token service, restarts the registry with
token auth and the CDN redirect, and puts the nginx TLS front before it:

    registry_url  https://127.0.0.1:P1   (nginx front -> docker-registry, Hub's role)
    cdn_url       https://localhost:P2   (nginx serving the storage dir, blob redirects)
    token_url     https://127.0.0.1:P3/token   (the realm, auth.docker.io's role)

Options, all off by default: `cdn_cutter=True` puts a harness.cutter.Cutter (a TCP proxy
that cuts or stalls connections, TLS passing through) between the registry's redirects and
the CDN: the redirects name https://localhost:<cutter port>, and `up.cutter.budget = 1 << 20`
cuts every CDN connection after 1 MiB (None: no cuts). `signed_urls=True` makes the front
append a unique `?sig=` to every blob redirect (see harness.front), for the CDN's
"single-use" mode (`up.restart_cdn("single-use")`). `referrers_api=True` gives the front the
OCI 1.1 referrers API (harness.referrers; distribution 2.8 has none). `prepare(client, images)`
is called with a harness.images.RegistryClient on the registry while its auth is still off,
after the test images are pushed, to push more (signatures); what it returns is
`up.prepared`.

Use it as a context manager or call `stop()`; every process it started (and the cutter) is
stopped.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlencode

from . import images as images_mod
from .cdn import Cdn, CdnMode
from .cutter import Cutter
from .front import RegistryFront
from .pki import (
    CertificateAuthority,
    ServerCert,
    SigningCert,
    cert_dir_for,
    create_signing_cert,
)
from .registry import Registry, RegistrySettings, TokenAuth
from .tokenserver import TokenServerConfig, TokenServerProcess

DEFAULT_SERVICE = "registry.test"
DEFAULT_ISSUER = "docxy-test-token-issuer"
DEFAULT_USERS: Mapping[str, str] = {"alice": "wonderland-secret"}
DEFAULT_PRIVATE_REPOS: tuple[str, ...] = ("private/*",)


def default_cache_dir() -> Path:
    """Where the large layer is cached between runs: $DOCXY_TEST_CACHE or a temp dir."""
    env = os.environ.get("DOCXY_TEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "docxy-test-cache"


@dataclass
class Upstream:
    """A running test upstream. Build it with `Upstream.start(...)`."""

    workdir: Path
    service: str
    issuer: str
    users: dict[str, str]
    private_repos: tuple[str, ...]
    root_ca: CertificateAuthority
    intermediate_ca: CertificateAuthority
    registry_cert: ServerCert
    cdn_cert: ServerCert
    token_cert: ServerCert
    signing_cert: SigningCert
    cert_dir: Path
    registry: Registry
    front: RegistryFront
    cdn: Cdn
    token_server: TokenServerProcess
    images: images_mod.ImageSet = field(repr=False)
    auth: bool = True
    redirect: bool = True
    cutter: Cutter | None = None  # between the registry's redirects and the CDN
    signed_urls: bool = False
    prepared: Any = None  # what `prepare` returned

    # -- construction --------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path | str, large_layer_size: int = 300 << 20, auth: bool = True,
              redirect: bool = True, cache_dir: Path | str | None = None,
              service: str = DEFAULT_SERVICE, issuer: str = DEFAULT_ISSUER,
              users: Mapping[str, str] | None = None,
              private_repos: Sequence[str] = DEFAULT_PRIVATE_REPOS,
              cdn_host: str = "localhost", image_padding: int = 0,
              cdn_cutter: bool = False, signed_urls: bool = False,
              referrers_api: bool = False,
              prepare: Callable[[images_mod.RegistryClient, images_mod.ImageSet], Any] | None = None,
              ) -> "Upstream":
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        users = dict(users if users is not None else DEFAULT_USERS)

        pki_dir = workdir / "pki"
        root = CertificateAuthority.create_root(pki_dir, "root-ca")
        inter = root.issue_intermediate("intermediate-ca")
        registry_cert = inter.issue_server("registry", ["127.0.0.1", "localhost"])
        cdn_cert = inter.issue_server("cdn", [cdn_host])
        token_cert = inter.issue_server("token", ["127.0.0.1", "localhost"])
        signing = create_signing_cert(pki_dir, "token-signer")
        cert_dir = cert_dir_for(root.root_path, workdir / "certs.d")

        storage = workdir / "storage"
        registry = Registry(RegistrySettings(storage_dir=storage), workdir / "registry")
        cdn = Cdn(workdir / "cdn", storage, cdn_cert, host=cdn_host)
        token_server = TokenServerProcess(TokenServerConfig(
            service=service, issuer=issuer,
            signing_key_path=str(signing.key_path), signing_cert_path=str(signing.cert_path),
            users=users, private_repos=list(private_repos),
            tls_cert_path=str(token_cert.chain_path), tls_key_path=str(token_cert.key_path),
        ), workdir / "token")
        front = RegistryFront(workdir / "front", registry.port, registry_cert,
                              sign_redirects=signed_urls,
                              referrers_storage=storage if referrers_api else None)
        cutter = Cutter(cdn.port, cdn.interface) if cdn_cutter else None
        started: list[Any] = []
        try:
            registry.start()
            started.append(registry)
            image_set = images_mod.push_test_images(
                registry.url, cache, large_layer_size,
                private_repository=cls._private_example(private_repos),
                padding=image_padding)
            prepared = None
            if prepare is not None:
                with images_mod.RegistryClient(registry.url) as client:
                    prepared = prepare(client, image_set)
            cdn.start()
            started.append(cdn)
            token_server.start()
            started.append(token_server)
            if cutter is not None:
                cutter.start()
                started.append(cutter)
            up = cls(workdir=workdir, service=service, issuer=issuer, users=users,
                     private_repos=tuple(private_repos), root_ca=root, intermediate_ca=inter,
                     registry_cert=registry_cert, cdn_cert=cdn_cert, token_cert=token_cert,
                     signing_cert=signing, cert_dir=cert_dir, registry=registry, front=front,
                     cdn=cdn, token_server=token_server, images=image_set,
                     auth=auth, redirect=redirect, cutter=cutter, signed_urls=signed_urls,
                     prepared=prepared)
            registry.restart(**up._registry_changes(auth, redirect))
            front.start()
            started.append(front)
        except BaseException:
            for part in reversed(started):
                part.stop()
            registry.stop()
            raise
        return up

    @staticmethod
    def _private_example(patterns: Sequence[str]) -> str:
        for p in patterns:
            if not any(ch in p for ch in "*?["):
                return p
            if p.endswith("/*") and not any(ch in p[:-2] for ch in "*?["):
                return p[:-2] + "/secret"
        raise ValueError("give at least one private pattern like 'private/*'")

    def _registry_changes(self, auth: bool, redirect: bool) -> dict[str, Any]:
        token_auth = TokenAuth(realm=self.token_url, service=self.service, issuer=self.issuer,
                               rootcertbundle=self.signing_cert.cert_path) if auth else None
        return {"token_auth": token_auth,
                "redirect_baseurl": self.redirect_url if redirect else None}

    # -- addresses -----------------------------------------------------------------------

    @property
    def registry_url(self) -> str:
        """The upstream registry as clients see it (TLS, Hub's registry-1.docker.io)."""
        return self.front.url

    @property
    def registry_host(self) -> str:
        """`127.0.0.1:P` — for image references like `127.0.0.1:P/library/alpine`."""
        return f"{self.front.interface}:{self.front.port}"

    @property
    def registry_internal_url(self) -> str:
        """The registry process itself (plain HTTP, no front, no pagination)."""
        return self.registry.url

    @property
    def cdn_url(self) -> str:
        """The CDN nginx itself."""
        return self.cdn.url

    @property
    def redirect_url(self) -> str:
        """What the registry's blob redirects name: the cutter when there is one (same host
        name as the CDN, the cutter's port), else the CDN."""
        if self.cutter is None:
            return self.cdn.url
        return f"https://{self.cdn.host}:{self.cutter.port}"

    @property
    def token_url(self) -> str:
        """The token realm (auth.docker.io/token's role)."""
        return self.token_server.realm

    @property
    def ca_path(self) -> Path:
        """The root CA a client (or the mirror) must trust for registry, CDN and token."""
        return self.root_ca.root_path

    @property
    def user(self) -> tuple[str, str]:
        """The first configured (user, password)."""
        return next(iter(self.users.items()))

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything; safe to call twice."""
        stops = [self.front.stop, self.registry.stop, self.token_server.stop, self.cdn.stop]
        if self.cutter is not None:
            stops.append(self.cutter.stop)
        for stop in stops:
            try:
                stop()
            except Exception:  # keep stopping the others
                pass

    def stop_registry(self) -> None:
        """Outage: the registry and its front go away (connections to registry_url refused)."""
        self.front.stop()
        self.registry.stop()

    def start_registry(self) -> None:
        if not self.registry.running():
            self.registry.start()
        if not self.front.running():
            self.front.start()

    def restart_registry(self, auth: bool | None = None, redirect: bool | None = None) -> None:
        """Restart on the same ports and storage, optionally switching auth / redirect."""
        self.auth = self.auth if auth is None else auth
        self.redirect = self.redirect if redirect is None else redirect
        self.front.stop()
        self.registry.restart(**self._registry_changes(self.auth, self.redirect))
        self.front.start()

    def restart_cdn(self, mode: CdnMode = "ok") -> None:
        self.cdn.restart(mode)

    def __enter__(self) -> "Upstream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs ----------------------------------------------------------------------------

    def token_log_entries(self) -> list[dict[str, Any]]:
        """Requests the token service saw (JSON objects; see tokenserver)."""
        return self.token_server.log_entries()

    def token_log_lines(self) -> list[str]:
        return [json.dumps(e) for e in self.token_log_entries()]

    def cdn_log_lines(self) -> list[str]:
        return self.cdn.access_log_lines()

    def cdn_log_entries(self) -> list[dict[str, Any]]:
        return self.cdn.access_log_entries()

    def registry_log_lines(self) -> list[str]:
        """Requests that reached the registry through its front (nginx JSON lines)."""
        return self.front.access_log_lines()

    def registry_log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.registry_log_lines() if line.strip()]

    # -- small client helpers for tests --------------------------------------------------

    def fetch_token(self, scopes: Iterable[str] = (), credentials: tuple[str, str] | None = None,
                    service: str | None = None) -> str:
        """A Bearer token from the token service (GET flow), anonymous unless credentials."""
        q = [("service", service or self.service)] + [("scope", s) for s in scopes]
        req = urllib.request.Request(f"{self.token_url}?{urlencode(q)}")
        if credentials:
            raw = f"{credentials[0]}:{credentials[1]}".encode()
            req.add_header("Authorization", "Basic " + base64.b64encode(raw).decode())
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
            return str(json.loads(resp.read())["token"])

    def pull_scope(self, repository: str) -> str:
        return f"repository:{repository}:pull"
