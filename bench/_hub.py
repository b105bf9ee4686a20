"""The Hub-like path for the benchmarks (not a benchmark itself): the suite's upstream
(tests/harness/upstream.py: distribution behind an nginx TLS front, token auth, blob GETs
answered 307 to an nginx TLS "CDN" on another host name) with its large layer as the blob,
and the proxies that pull it the way they would pull from Docker Hub: docxy, nginx
following the redirect itself, the distribution registry in proxy mode.

Every process is registered on the caller's ExitStack, so it is stopped on any exit.
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import _common as c
from harness.daemon import Docxy, cached_blob, mirror_args  # noqa: E402
from harness.nginx import NginxProcess  # noqa: E402
from harness.procs import free_port  # noqa: E402
from harness.registry import ProxySettings, Registry, RegistrySettings  # noqa: E402
from harness.upstream import Upstream  # noqa: E402

REPOSITORY = "library/large"
# The token service (harness.tokenserver) issues tokens for 300 s; a token is fetched right
# before the process that uses it starts, and refused if it has less left than this.
MIN_TOKEN_LIFETIME = 120.0


@dataclass(frozen=True)
class HubBlob:
    """The large layer of library/large in a running Hub-like upstream."""

    up: Upstream
    digest: str
    size: int

    @property
    def path(self) -> str:
        """The blob's registry path, as a client asks docxy, nginx or the proxy for it."""
        return f"/v2/{REPOSITORY}/blobs/{self.digest}"

    @property
    def cdn_path(self) -> str:
        """Where the registry's 307 sends a blob GET (the storage layout of distribution)."""
        hex_ = self.digest.split(":", 1)[1]
        return f"/docker/registry/v2/blobs/sha256/{hex_[:2]}/{hex_}/data"


def start_hub(stack: contextlib.ExitStack, work: Path, size: int,
              layer_cache: Path | None = None) -> HubBlob:
    """The upstream with a large layer of `size` random bytes (a gzip'd tar, a little
    larger), built in `layer_cache` (kept) or in the scratch directory (removed once pushed);
    then one unmeasured read from the CDN so the blob is in the page cache for every path."""
    t = time.monotonic()
    cache = layer_cache or work / "layer"
    up = Upstream.start(work / "upstream", large_layer_size=size, cache_dir=cache)
    stack.callback(up.stop)
    layer = max(up.images.large.manifest.layers, key=lambda b: b.size)
    if layer_cache is None:
        shutil.rmtree(cache, ignore_errors=True)  # the registry has its own copy
    blob = HubBlob(up, layer.digest, layer.size)
    print(f"Hub-like upstream with {blob.digest} ({blob.size} bytes) up in "
          f"{time.monotonic() - t:.1f}s", file=sys.stderr)
    warm = c.curl_pull(up.cdn_url + blob.cdn_path, 600, cacert=up.ca_path)
    if warm.get("status") != 200 or warm.get("bytes") != blob.size:
        raise RuntimeError(f"warm-up read from the CDN failed: {warm}")
    return blob


def upstream_pids(up: Upstream) -> list[int]:
    """The processes that serve a pull upstream: the registry, the front's and the CDN's
    nginx workers (not their masters, which only supervise)."""
    pids = []
    if up.registry.process is not None and up.registry.process.pid:
        pids.append(up.registry.process.pid)
    for n in (up.front.nginx, up.cdn.nginx):
        pids += c.nginx_worker_pids(n)
    return pids


# --- tokens -------------------------------------------------------------------------------

def token_expiry(token: str) -> float:
    """The `exp` claim of a JWT (seconds since the epoch), read without verifying it."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])


def upstream_token(up: Upstream, repository: str = REPOSITORY) -> str:
    """An anonymous pull token from the upstream's token service, as a client gets one."""
    token = up.fetch_token([up.pull_scope(repository)])
    left = token_expiry(token) - time.time()
    if left < MIN_TOKEN_LIFETIME:
        raise RuntimeError(f"the upstream token lives only {left:.0f}s more")
    return token


def docxy_token(d: Docxy, up: Upstream, repository: str = REPOSITORY,
                cafile: Path | None = None) -> str:
    """A pull token from docxy's /auth/token (which relays the upstream's token service),
    over docxy's API URL (HTTPS, trusting `cafile`, when docxy serves TLS)."""
    query = urlencode({"service": up.service, "scope": f"repository:{repository}:pull"})
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    with urllib.request.urlopen(f"{d.url}/auth/token?{query}", timeout=30,
                                context=context) as r:
        return json.loads(r.read())["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the proxies ------------------------------------------------------------------------

def start_docxy(stack: contextlib.ExitStack, home: Path, up: Upstream, *extra: str,
                cache: Path | None = None, tls: tuple[Path, Path] | None = None) -> Docxy:
    """docxy mirroring the upstream as docker.io (`mirror_args`: --upstream <front>
    --upstream-ca <CA> --library), cache in `cache` (default home/cache) unless --no-cache."""
    if "--no-cache" not in extra and cache is None:
        cache = home / "cache"
    return c.run_docxy(stack, home, mirror_args(up, *extra, cache=cache), tls=tls)


def cache_file(d_cache: Path, digest: str) -> Path:
    return cached_blob(d_cache, digest)


NGINX_FOLLOW_NOTE = (
    "nginx proxy_pass to the registry's TLS front with the upstream token set in "
    "Authorization by nginx (a fresh token fetched right before nginx starts), "
    "proxy_intercept_errors on + error_page 301 302 307 = @cdn, and in @cdn "
    "`set $loc $upstream_http_location; proxy_pass $loc;` over TLS (proxy_ssl_verify on, "
    "proxy_ssl_trusted_certificate = the harness CA, proxy_ssl_server_name on); otherwise "
    "nginx's defaults (proxy_http_version 1.0, no upstream keep-alive)")


def nginx_follow_body(port: int, up: Upstream, token: str, buffering: bool) -> str:
    """The http{} body of an nginx that pulls a blob as a client of Hub does: the registry
    with a Bearer token, then the CDN URL of the 307, without the token.

    The CDN URL names host `localhost`: a `proxy_pass` with a variable needs a `resolver`
    for a host name unless an upstream of that name and port already exists. The internal
    location below declares one (resolved from /etc/hosts when nginx starts), so no
    resolver is needed; the TLS name checked and sent (SNI) is still `localhost`. nginx
    checks only DNS names of a certificate, never IP addresses: the front (reached as
    127.0.0.1) is checked as `localhost`, which its certificate also names."""
    cdn = urlsplit(up.redirect_url)
    buffering_line = "" if buffering else "proxy_buffering off;"
    return f"""
    server {{
        listen 127.0.0.1:{port};
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 3;
        proxy_ssl_trusted_certificate {up.ca_path};
        proxy_ssl_server_name on;
        proxy_read_timeout 900s;
        {buffering_line}
        location = /.declare-cdn-upstream {{
            internal;
            proxy_pass https://{cdn.hostname}:{cdn.port};
        }}
        location / {{
            proxy_pass {up.registry_url};
            proxy_ssl_name localhost;
            proxy_set_header Authorization "Bearer {token}";
            proxy_intercept_errors on;
            error_page 301 302 307 = @cdn;
        }}
        location @cdn {{
            set $loc $upstream_http_location;
            proxy_pass $loc;
        }}
    }}
"""


def start_nginx_follow(stack: contextlib.ExitStack, work: Path, up: Upstream,
                       buffering: bool = True, name: str = "nginx") -> NginxProcess:
    """nginx (one worker) following the upstream's redirect with a fresh upstream token."""
    port = free_port()
    n = NginxProcess(name, work / name, port,
                     nginx_follow_body(port, up, upstream_token(up), buffering))
    stack.callback(n.stop)
    n.start()
    return n


def start_distproxy(stack: contextlib.ExitStack, work: Path, up: Upstream,
                    name: str = "distproxy") -> Registry:
    """The distribution registry in proxy mode against the TLS front, logging in with the
    harness user (so it fetches its tokens itself), trusting the harness CA through
    SSL_CERT_FILE; storage `work/<name>-storage` (a fresh name is a cold proxy). Clients
    pull from it without auth."""
    user, password = up.user
    settings = RegistrySettings(
        storage_dir=work / f"{name}-storage", log_level="warn",
        proxy=ProxySettings(remoteurl=up.registry_url, username=user, password=password,
                            ca_path=up.ca_path))
    reg = Registry(settings, work, name=name)
    stack.callback(reg.stop)
    reg.start()
    return reg


def distproxy_blob_file(storage: Path, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


# --- what reached the upstream ----------------------------------------------------------

def log_marks(up: Upstream) -> tuple[int, int]:
    """How many entries the front's and the CDN's access logs hold now."""
    return len(up.registry_log_lines()), len(up.cdn_log_lines())


def traffic_since(up: Upstream, blob: HubBlob, marks: tuple[int, int]) -> dict:
    """The upstream requests logged after `marks`: the front's by method, its blob GETs and
    HEADs (each answered 307 or 401), and the CDN's GETs of the blob with the body bytes
    they sent (what the upstream paid for)."""
    front = up.registry_log_entries()[marks[0]:]
    cdn = up.cdn_log_entries()[marks[1]:]
    by_method: dict[str, int] = {}
    for e in front:
        by_method[e["method"]] = by_method.get(e["method"], 0) + 1
    blob_uri = blob.path
    cdn_gets = [e for e in cdn if e["method"] == "GET" and e["uri"].split("?")[0] == blob.cdn_path]
    cdn_bytes = sum(int(e["body_bytes_sent"]) for e in cdn_gets)
    return {
        "front_requests": len(front),
        "front_by_method": by_method,
        "front_blob_gets": sum(1 for e in front if e["method"] == "GET"
                               and e["uri"].split("?")[0] == blob_uri),
        "front_blob_heads": sum(1 for e in front if e["method"] == "HEAD"
                                and e["uri"].split("?")[0] == blob_uri),
        "cdn_blob_gets": len(cdn_gets),
        "cdn_blob_gets_complete": sum(1 for e in cdn_gets if e.get("completion") == "OK"),
        "cdn_body_bytes": cdn_bytes,
        "bytes_ratio": round(cdn_bytes / blob.size, 4),
        "requests_list": [f"front {e['method']} {e['uri']} {e['status']}" for e in front]
        + [f"cdn {e['method']} {e['uri'].split('?')[0][-24:]} {e['status']} "
           f"{e['body_bytes_sent']}B {e.get('completion') or '-'}" for e in cdn],
    }


def wait_for_logs(seconds: float = 1.0) -> None:
    """nginx writes an access-log line once the response is done; curl may be faster."""
    time.sleep(seconds)


def tls_pair(work: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")):
    """A CA and a server certificate from the harness pki, for serving TLS (docxy and nginx
    get the same certificate and key)."""
    from harness.pki import CertificateAuthority
    ca = CertificateAuthority.create_root(work / "serve-pki", "bench-root-ca")
    return ca, ca.issue_server("bench-server", list(names))
