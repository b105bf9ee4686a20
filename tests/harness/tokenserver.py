"""A Docker token service (the Docker token auth spec) for tests, on Twisted.

It issues RS256 JWTs with the signing certificate in the `x5c` header, like auth.docker.io:
anonymous callers get `pull` on public repositories, configured users get `pull,push` on
everything; wrong credentials get 401. It serves `GET /token` (Docker clients) and the OAuth2
`POST /token` form flow (containerd: `grant_type=password` or `refresh_token`).

A service other than its own: like Hub, a token is still issued, with `aud` set to the
requested service, so the *registry* rejects it (401). `strict_service=True` answers 400
instead. Every request is logged as one JSON line (method, uri, whether Authorization was
present and its scheme, the parsed scopes, status) — never a credential or token.

Run it as a subprocess (`python -m harness.tokenserver --config cfg.json`, or flags; see
`--help`) so a test's reactor stays free; `TokenServerProcess` does that for the harness.
`TokenServer(config).listen(reactor)` runs it in-process.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import fnmatch
import hashlib
import json
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence
from urllib.parse import urlencode

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.web import resource, server
from twisted.web.http import Request

PULL = "pull"
PUSH = "push"


@dataclass
class TokenServerConfig:
    """Everything the token service needs; JSON-serialisable for the subprocess form."""

    service: str
    issuer: str
    signing_key_path: str
    signing_cert_path: str
    users: dict[str, str] = field(default_factory=dict)
    private_repos: list[str] = field(default_factory=list)  # fnmatch patterns on the name
    port: int = 0
    interface: str = "127.0.0.1"
    tls_cert_path: str | None = None   # leaf (+ chain) PEM; None = plain HTTP
    tls_key_path: str | None = None
    log_path: str | None = None
    expires_in: int = 300
    strict_service: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TokenServerConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Scope | None":
        """`repository:name:pull,push`; the name may hold `:` (a registry port), the type
        may carry a resource class (`repository(plugin)`)."""
        first = text.find(":")
        last = text.rfind(":")
        if first < 0 or first == last:
            return None
        rtype = text[:first].split("(", 1)[0]
        actions = tuple(a for a in text[last + 1:].split(",") if a)
        return cls(rtype, text[first + 1:last], actions)


def split_scopes(values: Sequence[str]) -> list[str]:
    """Every scope from repeated `scope` parameters, each of which may hold several
    space-separated scopes; order kept."""
    out: list[str] = []
    for v in values:
        out.extend(s for s in v.split(" ") if s)
    return out


def libtrust_key_id(cert: x509.Certificate) -> str:
    """The `kid` format of docker/libtrust: base32 of 240 bits of sha256(SPKI), in groups."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenIssuer:
    """Decides access and signs tokens; holds the refresh tokens it handed out."""

    def __init__(self, config: TokenServerConfig) -> None:
        self.config = config
        self._key_pem = Path(config.signing_key_path).read_bytes()
        pem = Path(config.signing_cert_path).read_bytes()
        certs = x509.load_pem_x509_certificates(pem)
        self._x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                     for c in certs]
        self._kid = libtrust_key_id(certs[0])
        self._refresh_tokens: dict[str, str] = {}

    def check_password(self, user: str, password: str) -> bool:
        expected = self.config.users.get(user)
        return expected is not None and secrets.compare_digest(expected, password)

    def is_private(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.config.private_repos)

    def grant(self, scope: Scope, user: str | None) -> tuple[str, ...]:
        if scope.type == "repository":
            if user is None:
                allowed = set() if self.is_private(scope.name) else {PULL}
            else:
                allowed = {PULL, PUSH, "delete", "*"}
        elif scope.type == "registry" and scope.name == "catalog":
            allowed = {"*"} if user is not None else set()
        else:
            allowed = set()
        return tuple(a for a in scope.actions if a in allowed)

    def new_refresh_token(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        self._refresh_tokens[token] = user
        return token

    def user_for_refresh_token(self, token: str) -> str | None:
        return self._refresh_tokens.get(token)

    def issue(self, service: str, scopes: list[str], user: str | None) -> dict[str, Any]:
        now = int(time.time())
        access = []
        for text in scopes:
            scope = Scope.parse(text)
            if scope is None:
                continue
            actions = self.grant(scope, user)
            if actions:
                access.append({"type": scope.type, "name": scope.name,
                               "actions": list(actions)})
        claims = {
            "iss": self.config.issuer, "sub": user or "", "aud": service,
            "exp": now + self.config.expires_in, "nbf": now - 10, "iat": now,
            "jti": secrets.token_hex(16), "access": access,
        }
        token = jwt.encode(claims, self._key_pem, algorithm="RS256",
                           headers={"x5c": self._x5c, "kid": self._kid})
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        return {"token": token, "access_token": token, "expires_in": self.config.expires_in,
                "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ")}


class TokenResource(resource.Resource):
    """`/token`: GET for Docker clients, POST (OAuth2 form) for containerd."""

    isLeaf = True

    def __init__(self, issuer: TokenIssuer, log: IO[str] | None) -> None:
        super().__init__()
        self.issuer = issuer
        self.log = log

    # -- helpers -------------------------------------------------------------------------

    def _record(self, request: Request, status: int, extra: dict[str, Any]) -> None:
        if self.log is None:
            return
        auth = request.getHeader("authorization")
        args: dict[bytes, list[bytes]] = request.args or {}
        entry = {
            "time": time.time(),
            "method": request.method.decode(),
            "uri": request.uri.decode("utf-8", "replace"),
            "path": request.path.decode("utf-8", "replace"),
            "query": {k.decode(): [v.decode("utf-8", "replace") for v in vs]
                      for k, vs in args.items()}
            if request.method == b"GET" else {},
            "auth": auth is not None,
            "auth_scheme": auth.split(" ", 1)[0] if auth else None,
            "status": status,
        }
        entry.update(extra)
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()

    def _answer(self, request: Request, status: int, body: dict[str, Any],
                extra: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if status == 401:
            request.setHeader(b"www-authenticate", b'Basic realm="docxy test token service"')
        self._record(request, status, extra)
        return json.dumps(body).encode()

    def _service(self, service: str) -> tuple[str, bool]:
        """The audience for the token, and whether the service was acceptable."""
        if not service:
            return self.issuer.config.service, True
        ok = service == self.issuer.config.service or not self.issuer.config.strict_service
        return service, ok

    @staticmethod
    def _basic(request: Request) -> tuple[str, str] | None:
        """(user, password) from Basic auth; None when absent. Malformed credentials come
        back as ("", "") so that they fail like a wrong password."""
        header = request.getHeader("authorization")
        if header is None or not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        return user, password

    # -- GET -----------------------------------------------------------------------------

    def render_GET(self, request: Request) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}
        get = lambda k: [v.decode("utf-8", "replace") for v in args.get(k.encode(), [])]
        scopes = split_scopes(get("scope"))
        service, ok = self._service((get("service") or [""])[0])
        extra: dict[str, Any] = {"scopes": scopes, "service": service,
                                 "account": next(iter(get("account")), None)}
        if not ok:
            return self._answer(request, 400, {"details": f"unknown service {service!r}"},
                                extra)
        creds = self._basic(request)
        user: str | None = None
        if creds is not None and not self.issuer.check_password(*creds):
            return self._answer(request, 401, {"details": "incorrect username or password"},
                                extra)
        if creds is not None:
            user = creds[0]
        extra["sub"] = user or ""
        body = self.issuer.issue(service, scopes, user)
        offline = (get("offline_token") or ["false"])[0].lower() == "true"
        if user is not None and offline:
            body["refresh_token"] = self.issuer.new_refresh_token(user)
        return self._answer(request, 200, body, extra)

    # -- POST (OAuth2 form, containerd) --------------------------------------------------

    def render_POST(self, request: Request) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}
        get = lambda k: (args.get(k.encode()) or [b""])[0].decode("utf-8", "replace")
        scopes = split_scopes([v.decode("utf-8", "replace")
                               for v in args.get(b"scope", [])])
        grant_type = get("grant_type")
        service, ok = self._service(get("service"))
        extra: dict[str, Any] = {
            "scopes": scopes, "service": service, "grant_type": grant_type,
            "client_id": get("client_id"), "username": get("username") or None,
            "access_type": get("access_type") or None,
        }
        if not ok:
            return self._answer(request, 400, {"error": "invalid_request",
                                               "details": f"unknown service {service!r}"},
                                extra)
        if grant_type == "password":
            user = get("username")
            if not user or not self.issuer.check_password(user, get("password")):
                return self._answer(request, 401, {"error": "invalid_grant",
                                                   "details": "incorrect username or password"},
                                    extra)
        elif grant_type == "refresh_token":
            found = self.issuer.user_for_refresh_token(get("refresh_token"))
            if found is None:
                return self._answer(request, 401, {"error": "invalid_grant",
                                                   "details": "unknown refresh token"}, extra)
            user = found
        else:
            return self._answer(request, 400, {"error": "unsupported_grant_type"}, extra)
        extra["sub"] = user
        body = self.issuer.issue(service, scopes, user)
        body["refresh_token"] = (get("refresh_token") if grant_type == "refresh_token"
                                 else self.issuer.new_refresh_token(user))
        body["scope"] = " ".join(scopes)
        return self._answer(request, 200, body, extra)


class HealthResource(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class TokenServer:
    """The token service as a twisted.web site; `listen()` runs it on a given reactor."""

    def __init__(self, config: TokenServerConfig) -> None:
        self.config = config
        self.issuer = TokenIssuer(config)
        self._log: IO[str] | None = (open(config.log_path, "a", encoding="utf-8")
                                     if config.log_path else None)
        root = resource.Resource()
        root.putChild(b"token", TokenResource(self.issuer, self._log))  # type: ignore[arg-type]
        root.putChild(b"health", HealthResource())  # type: ignore[arg-type]
        self.site = server.Site(root)
        self.site.displayTracebacks = False

    def endpoint_description(self) -> str:
        c = self.config
        iface = c.interface.replace(":", "\\:")
        if c.tls_cert_path:
            if not c.tls_key_path:
                raise ValueError("tls_cert_path needs tls_key_path")
            certs = x509.load_pem_x509_certificates(Path(c.tls_cert_path).read_bytes())
            desc = (f"ssl:port={c.port}:interface={iface}:privateKey={c.tls_key_path}"
                    f":certKey={c.tls_cert_path}")
            if len(certs) > 1:
                # certKey sends only the first certificate; the rest must be named apart.
                chain = Path(c.tls_cert_path).with_suffix(".extra-chain.pem")
                chain.write_bytes(b"".join(
                    x.public_bytes(serialization.Encoding.PEM) for x in certs[1:]))
                desc += f":extraCertChain={chain}"
            return desc
        return f"tcp:port={c.port}:interface={iface}"

    def listen(self, reactor: Any) -> Any:
        """Start listening; returns a Deferred firing with the IListeningPort."""
        from twisted.internet.endpoints import serverFromString
        return serverFromString(reactor, self.endpoint_description()).listen(self.site)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# -- subprocess form ---------------------------------------------------------------------

def _parse_args(argv: Sequence[str]) -> TokenServerConfig:
    p = argparse.ArgumentParser(prog="python -m harness.tokenserver",
                                description="Docker token service for tests")
    p.add_argument("--config", help="JSON file with TokenServerConfig fields "
                                    "(other options override it)")
    p.add_argument("--port", type=int)
    p.add_argument("--interface")
    p.add_argument("--service")
    p.add_argument("--issuer")
    p.add_argument("--key", dest="signing_key_path", help="JWT signing key (PEM)")
    p.add_argument("--cert", dest="signing_cert_path", help="JWT signing certificate (x5c)")
    p.add_argument("--tls-cert", dest="tls_cert_path")
    p.add_argument("--tls-key", dest="tls_key_path")
    p.add_argument("--users", nargs="*", default=None, metavar="USER:PASS")
    p.add_argument("--private-repos", nargs="*", default=None, metavar="PATTERN")
    p.add_argument("--log", dest="log_path")
    p.add_argument("--expires-in", type=int)
    p.add_argument("--strict-service", action="store_true", default=None)
    ns = p.parse_args(argv)
    data: dict[str, Any] = {}
    if ns.config:
        data.update(json.loads(Path(ns.config).read_text()))
    for key in ("port", "interface", "service", "issuer", "signing_key_path",
                "signing_cert_path", "tls_cert_path", "tls_key_path", "log_path",
                "expires_in", "strict_service"):
        value = getattr(ns, key)
        if value is not None:
            data[key] = value
    if ns.users is not None:
        data["users"] = dict(u.split(":", 1) for u in ns.users)
    if ns.private_repos is not None:
        data["private_repos"] = list(ns.private_repos)
    missing = [k for k in ("service", "issuer", "signing_key_path", "signing_cert_path")
               if not data.get(k)]
    if missing:
        p.error("missing: " + ", ".join(missing))
    return TokenServerConfig(**data)


def main(argv: Sequence[str] | None = None) -> None:
    config = _parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor as _reactor
    reactor: Any = _reactor
    app = TokenServer(config)

    def listening(port: Any) -> None:
        print(f"token service listening on {port.getHost()}", flush=True)

    def failed(f: Any) -> None:
        print(f"token service failed to listen: {f.getErrorMessage()}", flush=True)
        reactor.stop()

    app.listen(reactor).addCallbacks(listening, failed)
    reactor.run()
    app.close_log()


class TokenServerProcess:
    """Runs the token service as `python -m harness.tokenserver` with a JSON config."""

    def __init__(self, config: TokenServerConfig, workdir: Path) -> None:
        import dataclasses

        from .procs import ManagedProcess, free_port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(
            config, port=config.port or free_port(config.interface),
            log_path=config.log_path or str(self.workdir / "token-requests.jsonl"))
        self.config = config
        self.config_path = self.workdir / "tokenserver.json"
        self.config_path.write_text(config.to_json())
        tests_dir = str(Path(__file__).resolve().parent.parent)
        self.process = ManagedProcess(
            "tokenserver",
            [sys.executable, "-m", "harness.tokenserver", "--config", str(self.config_path)],
            self.workdir / "tokenserver.log",
            env={"PYTHONPATH": tests_dir, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert_path else "http"
        return f"{scheme}://{self.config.interface}:{self.config.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def log_path(self) -> Path:
        assert self.config.log_path is not None
        return Path(self.config.log_path)

    def start(self, timeout: float = 30.0) -> "TokenServerProcess":
        from .procs import wait_for_port
        self.process.start()
        wait_for_port(self.config.interface, self.config.port, timeout, self.process)
        return self

    def stop(self) -> None:
        self.process.stop()

    def log_entries(self) -> list[dict[str, Any]]:
        """The logged requests, oldest first (one dict per request)."""
        try:
            text = self.log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def token_url(self, service: str | None = None, scopes: Sequence[str] = ()) -> str:
        """A GET URL for a token request (handy in tests)."""
        q: list[tuple[str, str]] = [("service", service or self.config.service)]
        q += [("scope", s) for s in scopes]
        return f"{self.realm}?{urlencode(q)}"

    def __enter__(self) -> "TokenServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
