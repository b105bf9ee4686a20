"""`twistd docxy`: the command line and the environment.

This is the only module that reads options or environment variables.  It builds one
immutable `Config` and hands it to `docxy.service.build_service`.
"""
from __future__ import annotations

import os
import re
import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from docxy.admission.networks import is_local_endpoint, parse_networks
from docxy.admission.ratelimit import parse_rate
from docxy.config import Config
from docxy.ops.logs import LOG_FORMATS
from docxy.ops.memory import tune_allocator
from docxy.ops.tls import TLSConfigError
from docxy.registry.presets import (
    FILE_OPTIONS,
    ConfigFileError,
    FileSettings,
    Upstream,
    assemble,
    check_url,
    read_config_file,
)
from docxy.s3.location import parse_store_url
from docxy.service import (
    AccessConfigError,
    AdminConfigError,
    CacheConfigError,
    ClusterConfigError,
    build_service,
    raise_open_files_limit,
)
from docxy.upstream.auth import CredentialsError

log = Logger()


DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_list(value: str | None) -> list[str]:
    return value.split() if value else []


def _env_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise usage.UsageError(f"{name} must be one of 1/0, true/false, yes/no, on/off")


def _check_url(option: str, value: str) -> str:
    try:
        return check_url(option, value)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def default_cache_dir(env: dict[str, str]) -> str:
    """systemd's CacheDirectory=, else the XDG cache directory of the user running docxy."""
    if env.get("CACHE_DIRECTORY"):
        return env["CACHE_DIRECTORY"].split(":")[0]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "docxy")


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str, option: str = "--cache-max-size") -> int:
    """`123`, `500M`, `20G`, `1.5T` (powers of 1024; a trailing B or iB is allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise usage.UsageError(f"{option}: cannot read a size from {text!r}")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value < 1:
        raise usage.UsageError(f"{option} must be positive")
    return int(value)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = """docxy is a pull-through mirror for container registries.  Point Docker's
registry-mirrors, containerd's hosts.toml or podman's registries.conf at it.

It mirrors Docker Hub (docker.io) unless told otherwise.  More registries come from
--registry (presets: docker.io ghcr.io quay.io gcr.io registry.k8s.io mcr.microsoft.com,
or NAME=URL for any other) or from a TOML file given with --config; a request picks one by
containerd's ns= parameter, a path prefix (/v2/ghcr.io/...), or the Host it was sent to.
The --upstream* options, --auth-* and --library apply to the default registry and win
over the file.

Every option can also be given as an environment variable DOCXY_<OPTION> (upper case,
dashes as underscores; repeatable options take a space-separated list).  CERT_PATH and
KEY_PATH are read as in the original docxy.  The command line wins over the environment.

With --tls, each --listen endpoint only redirects to HTTPS (and answers /health).
Without --tls, --listen serves the API (for use behind nginx or a CDN).  With neither,
docxy listens on 127.0.0.1:8080.

docxy does not start as an open relay: a listener that is not loopback needs --htpasswd
(docxy's own users) or an explicit --allow-anonymous."""

    optFlags = [
        ["mirror-mode", None, "Fetch upstream tokens as docxy itself (anonymously, or with "
         "--upstream-credentials); clients are never challenged. [DOCXY_MIRROR_MODE]"],
        ["library", None, "Add library/ to one-component names of the default registry "
         "(default: on only for docker.io). [DOCXY_LIBRARY=1]"],
        ["no-library", None, "Never add library/ to names of the default registry. "
         "[DOCXY_LIBRARY=0]"],
        ["no-cache", None, "Do not cache: every pull goes upstream. [DOCXY_NO_CACHE=1]"],
        ["allow-anonymous", None, "Serve clients without --htpasswd on a non-loopback "
         "address: anyone who can reach docxy pulls through it. [DOCXY_ALLOW_ANONYMOUS=1]"],
    ]

    optParameters = [
        ["cert", None, None, "PEM certificate chain for --tls (leaf first; every certificate "
         "is sent). [DOCXY_CERT, CERT_PATH]"],
        ["key", None, None, "PEM private key (EC, RSA or PKCS#8, unencrypted). "
         "[DOCXY_KEY, KEY_PATH]"],
        ["public-url", None, None, "The URL clients use to reach docxy; token realms and "
         "redirects are built from it. [DOCXY_PUBLIC_URL]"],
        ["config", None, None, "TOML file declaring the upstream registries (see the "
         "README). [DOCXY_CONFIG]"],
        ["htpasswd", None, None, "Users file (user:bcrypt-hash lines, htpasswd -B): clients "
         "must log in to docxy, which pulls upstream as itself (mirror mode). [DOCXY_HTPASSWD]"],
        ["rate-limit", None, None, "Per-client limit on manifest and token requests, e.g. "
         "100/h or 10/m (token bucket by user, else address); over it: 429 with "
         "Retry-After. [DOCXY_RATE_LIMIT]"],
        ["default-registry", None, None, "The registry a request gets when it names none "
         "(default: docker.io). [DOCXY_DEFAULT_REGISTRY]"],
        ["upstream", None, None, "Base URL of the default registry (default: its preset's, "
         "https://registry-1.docker.io for docker.io); a preset's URL selects that preset. "
         "[DOCXY_UPSTREAM]"],
        ["upstream-ca", None, None, "Extra PEM CA certificate(s) to trust for the default "
         "registry's TLS, in addition to the system's. [DOCXY_UPSTREAM_CA]"],
        ["upstream-credentials", None, None, "File with username:password (or JSON) for the "
         "default registry's account used in --mirror-mode. [DOCXY_UPSTREAM_CREDENTIALS]"],
        ["auth-realm", None, None, "Override the default registry's token realm (default: "
         "learned from its challenge). [DOCXY_AUTH_REALM]"],
        ["auth-service", None, None, "Override the default registry's token service name. "
         "[DOCXY_AUTH_SERVICE]"],
        ["connect-timeout", None, 10.0, "Seconds to connect to an upstream. "
         "[DOCXY_CONNECT_TIMEOUT]", float],
        ["header-timeout", None, 60.0, "Seconds to wait for an upstream's response headers. "
         "[DOCXY_HEADER_TIMEOUT]", float],
        ["cache-dir", None, None, "Where the cache lives (default: $CACHE_DIRECTORY from "
         "systemd, else $XDG_CACHE_HOME/docxy or ~/.cache/docxy). [DOCXY_CACHE_DIR]"],
        ["tag-ttl", None, 0.0, "Seconds a tag's digest is trusted without asking the "
         "upstream (a HEAD, free on Hub); 0 asks every time. [DOCXY_TAG_TTL]", float],
        ["cache-max-size", None, None, "Bound the cache: bytes, or with a K/M/G/T suffix "
         "(powers of 1024); least recently used blobs go first. [DOCXY_CACHE_MAX_SIZE]"],
        ["accel-redirect", None, None, "Behind nginx: answer a GET of a cached blob with "
         "X-Accel-Redirect: PREFIX/<path under <cache-dir>/blobs/> and no body, so that nginx "
         "sends the file itself (sendfile); PREFIX is an `internal` nginx location aliasing "
         "that directory (see the README). [DOCXY_ACCEL_REDIRECT]"],
        ["cert-check-interval", None, 60.0, "Seconds between checks of --cert and --key "
         "for a renewed certificate, loaded without a restart (0: only on SIGHUP). "
         "[DOCXY_CERT_CHECK_INTERVAL]", float],
        ["stop-timeout", None, 30.0, "Seconds running requests get to finish when docxy is "
         "stopped (SIGTERM) before they are cut. [DOCXY_STOP_TIMEOUT]", float],
        ["idle-timeout", None, 60.0, "Seconds an upstream body may stall before it is cut "
         "(and a blob resumed; no limit on total time). [DOCXY_IDLE_TIMEOUT]", float],
        ["resume-attempts", None, 5, "Times in a row a blob download cut or stalled upstream "
         "is asked again from the byte reached (Range) before its clients are failed; 0: "
         "never resume. [DOCXY_RESUME_ATTEMPTS]", int],
        ["upstream-connections", None, 32, "Requests at once to one upstream host (registry, "
         "CDN, token service); more wait their turn. [DOCXY_UPSTREAM_CONNECTIONS]", int],
        ["request-timeout", None, 30.0, "Seconds a client may take to send a whole request "
         "(headers and body), however steadily it trickles; 0: no limit. "
         "[DOCXY_REQUEST_TIMEOUT]", float],
        ["metrics-listen", None, None, "Serve /metrics on this endpoint (strports, e.g. "
         "tcp:9102:interface=127.0.0.1) instead of on the API's. [DOCXY_METRICS_LISTEN]"],
        ["log-format", None, "text", "text (one line per event) or json (one JSON object "
         "per line, on standard output). [DOCXY_LOG_FORMAT]"],
        ["store", None, None, "The shared store of blobs and manifests: s3://BUCKET/PREFIX "
         "(the bucket is made if missing); --cache-dir stays a bounded first-level cache in "
         "front of it. [DOCXY_STORE]"],
        ["s3-endpoint", None, None, "URL of any S3-compatible service (MinIO, Ceph RGW, R2); "
         "AWS when omitted. [DOCXY_S3_ENDPOINT]"],
        ["s3-credentials", None, None, "File holding access_key:secret_key (else the "
         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY variables). [DOCXY_S3_CREDENTIALS]"],
        ["s3-region", None, None, "The bucket's region, for signing (default us-east-1, or "
         "AWS_REGION). [DOCXY_S3_REGION]"],
        ["cluster", None, None, "Redis URL (redis://HOST:PORT/DB) coordinating the nodes: "
         "one upstream download per blob, shared tags, rate limits and tokens. [DOCXY_CLUSTER]"],
        ["cluster-secret", None, None, "File with a secret shared by every node (at least 16 "
         "bytes): signs node-to-node requests and docxy's client tokens. "
         "[DOCXY_CLUSTER_SECRET]"],
        ["node-listen", None, None, "Endpoint (strports) where the other nodes stream blobs "
         "from this one, e.g. tcp:5001:interface=10.0.0.5. [DOCXY_NODE_LISTEN]"],
        ["node-url", None, None, "The URL the other nodes reach --node-listen at, e.g. "
         "http://10.0.0.5:5001. [DOCXY_NODE_URL]"],
        ["store-max-size", None, None, "Bound the shared store (with --cluster): least "
         "recently used blobs across all nodes leave the bucket first; a size as for "
         "--cache-max-size. [DOCXY_STORE_MAX_SIZE]"],
        ["lease-ttl", None, 5.0, "Seconds a download's lease outlives a node that died "
         "holding it (renewed every third of it). [DOCXY_LEASE_TTL]", float],
        ["admin-listen", None, None, "Serve the admin API (the `docxy` command: warm, cache "
         "ls/rm/gc), the status page and /metrics on this endpoint, e.g. "
         "tcp:5002:interface=127.0.0.1. [DOCXY_ADMIN_LISTEN]"],
        ["admin-htpasswd", None, None, "Users file (htpasswd -B) of the admin API's users "
         "(HTTP Basic); required when --admin-listen is not loopback. [DOCXY_ADMIN_HTPASSWD]"],
    ]

    _ENV_SCALARS = {
        "cert": ("DOCXY_CERT", "CERT_PATH"),
        "key": ("DOCXY_KEY", "KEY_PATH"),
        "public-url": ("DOCXY_PUBLIC_URL",),
        "config": ("DOCXY_CONFIG",),
        "htpasswd": ("DOCXY_HTPASSWD",),
        "rate-limit": ("DOCXY_RATE_LIMIT",),
        "default-registry": ("DOCXY_DEFAULT_REGISTRY",),
        "upstream": ("DOCXY_UPSTREAM",),
        "upstream-ca": ("DOCXY_UPSTREAM_CA",),
        "upstream-credentials": ("DOCXY_UPSTREAM_CREDENTIALS",),
        "auth-realm": ("DOCXY_AUTH_REALM",),
        "auth-service": ("DOCXY_AUTH_SERVICE",),
        "connect-timeout": ("DOCXY_CONNECT_TIMEOUT",),
        "header-timeout": ("DOCXY_HEADER_TIMEOUT",),
        "idle-timeout": ("DOCXY_IDLE_TIMEOUT",),
        "resume-attempts": ("DOCXY_RESUME_ATTEMPTS",),
        "upstream-connections": ("DOCXY_UPSTREAM_CONNECTIONS",),
        "request-timeout": ("DOCXY_REQUEST_TIMEOUT",),
        "cache-dir": ("DOCXY_CACHE_DIR",),
        "cache-max-size": ("DOCXY_CACHE_MAX_SIZE",),
        "tag-ttl": ("DOCXY_TAG_TTL",),
        "accel-redirect": ("DOCXY_ACCEL_REDIRECT",),
        "cert-check-interval": ("DOCXY_CERT_CHECK_INTERVAL",),
        "stop-timeout": ("DOCXY_STOP_TIMEOUT",),
        "metrics-listen": ("DOCXY_METRICS_LISTEN",),
        "log-format": ("DOCXY_LOG_FORMAT",),
        "store": ("DOCXY_STORE",),
        "s3-endpoint": ("DOCXY_S3_ENDPOINT",),
        "s3-credentials": ("DOCXY_S3_CREDENTIALS",),
        "s3-region": ("DOCXY_S3_REGION", "AWS_REGION"),
        "cluster": ("DOCXY_CLUSTER",),
        "cluster-secret": ("DOCXY_CLUSTER_SECRET",),
        "node-listen": ("DOCXY_NODE_LISTEN",),
        "node-url": ("DOCXY_NODE_URL",),
        "lease-ttl": ("DOCXY_LEASE_TTL",),
        "store-max-size": ("DOCXY_STORE_MAX_SIZE",),
        "admin-listen": ("DOCXY_ADMIN_LISTEN",),
        "admin-htpasswd": ("DOCXY_ADMIN_HTPASSWD",),
    }

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self.environ = dict(os.environ if environ is None else environ)
        self["listen"] = []
        self["tls"] = []
        self["server-name"] = []
        self["registry"] = []
        self["allow-net"] = []
        self["deny-net"] = []
        self["trusted-proxy"] = []
        self._given: set[str] = set()

    def opt_listen(self, description: str) -> None:
        """Plain HTTP endpoint (strports description, repeatable), e.g.
        tcp:5000:interface=127.0.0.1 [DOCXY_LISTEN]"""
        self["listen"].append(description)

    def opt_tls(self, description: str) -> None:
        """HTTPS endpoint (a TCP-like strports description; docxy adds TLS; repeatable),
        e.g. tcp:443 [DOCXY_TLS]"""
        self["tls"].append(description)

    def opt_server_name(self, name: str) -> None:
        """A host name of this server (repeatable); a request's Host is trusted for token
        realms only if it is one of these or of the certificate's. [DOCXY_SERVER_NAMES]"""
        self["server-name"].append(name.lower())

    def opt_registry(self, value: str) -> None:
        """Mirror this registry too (repeatable): a preset name (ghcr.io, quay.io, gcr.io,
        registry.k8s.io, mcr.microsoft.com, docker.io) or NAME=URL for any other.
        [DOCXY_REGISTRIES]"""
        self["registry"].append(value)

    def opt_allow_net(self, cidr: str) -> None:
        """Only clients in these networks may use docxy (repeatable; /health and /ready
        always answer). [DOCXY_ALLOW_NETS]"""
        self["allow-net"].append(cidr)

    def opt_deny_net(self, cidr: str) -> None:
        """Clients in these networks are refused (repeatable; wins over --allow-net).
        [DOCXY_DENY_NETS]"""
        self["deny-net"].append(cidr)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """A proxy in front of docxy (nginx, a load balancer) whose X-Forwarded-For names
        the client (repeatable). [DOCXY_TRUSTED_PROXIES]"""
        self["trusted-proxy"].append(cidr)

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected arguments: {' '.join(args)}")

    def parseOptions(self, options=None) -> None:
        # Remember what the command line set, so the environment fills in only the rest.
        argv = list(sys.argv[1:] if options is None else options)
        for arg in argv:
            if arg.startswith("--"):
                self._given.add(arg[2:].split("=", 1)[0])
        super().parseOptions(options)

    def postOptions(self) -> None:
        env = self.environ
        for option, names in self._ENV_SCALARS.items():
            if option in self._given:
                continue
            for name in names:
                if env.get(name):
                    value = env[name]
                    coerce = next(p for p in self.optParameters if p[0] == option)
                    if len(coerce) > 4:
                        try:
                            value = coerce[4](value)
                        except ValueError:
                            raise usage.UsageError(f"{name} must be a number") from None
                    self[option] = value
                    break
        for option, name in (("listen", "DOCXY_LISTEN"), ("tls", "DOCXY_TLS")):
            if not self[option]:
                self[option] = _env_list(env.get(name))
        if not self["server-name"]:
            self["server-name"] = [n.lower() for n in _env_list(env.get("DOCXY_SERVER_NAMES"))]
        if not self["registry"]:
            self["registry"] = _env_list(env.get("DOCXY_REGISTRIES"))
        for option, name in (("allow-net", "DOCXY_ALLOW_NETS"), ("deny-net", "DOCXY_DENY_NETS"),
                             ("trusted-proxy", "DOCXY_TRUSTED_PROXIES")):
            if not self[option]:
                self[option] = _env_list(env.get(name))
            try:
                parse_networks(self[option], f"--{option}")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if "allow-anonymous" not in self._given and env.get("DOCXY_ALLOW_ANONYMOUS"):
            self["allow-anonymous"] = _env_bool("DOCXY_ALLOW_ANONYMOUS", env["DOCXY_ALLOW_ANONYMOUS"])
        if self["htpasswd"] and self["allow-anonymous"]:
            raise usage.UsageError("--htpasswd and --allow-anonymous contradict each other")
        self.rate_limit = None
        if self["rate-limit"]:
            try:
                self.rate_limit = parse_rate(self["rate-limit"])
            except ValueError as e:
                raise usage.UsageError(f"--rate-limit: {e}") from None
        if "mirror-mode" not in self._given and env.get("DOCXY_MIRROR_MODE"):
            self["mirror-mode"] = _env_bool("DOCXY_MIRROR_MODE", env["DOCXY_MIRROR_MODE"])
        if self["library"] and self["no-library"]:
            raise usage.UsageError("--library and --no-library contradict each other")
        self.library: bool | None = None
        if self["library"]:
            self.library = True
        elif self["no-library"]:
            self.library = False
        elif env.get("DOCXY_LIBRARY"):
            self.library = _env_bool("DOCXY_LIBRARY", env["DOCXY_LIBRARY"])

        if self["tls"] and not (self["cert"] and self["key"]):
            raise usage.UsageError("--tls needs --cert and --key (or CERT_PATH and KEY_PATH)")
        if not self["tls"] and not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["upstream"]:
            self["upstream"] = _check_url("--upstream", self["upstream"])
        if self["public-url"]:
            self["public-url"] = _check_url("--public-url", self["public-url"])
        if self["auth-realm"]:
            self["auth-realm"] = _check_url("--auth-realm", self["auth-realm"])
        if self["upstream-credentials"] and not self["mirror-mode"]:
            raise usage.UsageError("--upstream-credentials is used only with --mirror-mode")
        self.cache_max_size = (
            parse_size(self["cache-max-size"]) if self["cache-max-size"] else None
        )
        if "no-cache" not in self._given and env.get("DOCXY_NO_CACHE"):
            self["no-cache"] = _env_bool("DOCXY_NO_CACHE", env["DOCXY_NO_CACHE"])
        if self["no-cache"] and (self["cache-dir"] or self.cache_max_size):
            raise usage.UsageError("--no-cache contradicts --cache-dir and --cache-max-size")
        accel = self["accel-redirect"]
        if accel is not None:
            if self["no-cache"]:
                raise usage.UsageError("--accel-redirect needs the cache (not --no-cache)")
            if not accel.startswith("/") or any(c in accel for c in "?# \t\r\n"):
                raise usage.UsageError(
                    f"--accel-redirect: {accel!r} is not a URL path (e.g. /_docxy_blobs)")
            self["accel-redirect"] = accel.rstrip("/")
        if not self["no-cache"] and not self["cache-dir"]:
            self["cache-dir"] = default_cache_dir(env)
        if self["tag-ttl"] < 0:
            raise usage.UsageError("--tag-ttl must not be negative")
        self["log-format"] = self["log-format"].strip().lower()
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        for option in ("cert-check-interval", "stop-timeout", "request-timeout"):
            if not self[option] >= 0:
                raise usage.UsageError(f"--{option} must be a number of seconds, 0 or more")
        for option in ("connect-timeout", "header-timeout", "idle-timeout"):
            if not self[option] > 0:
                raise usage.UsageError(f"--{option} must be a positive number of seconds")
        if not 0 <= self["resume-attempts"] <= 100:
            raise usage.UsageError("--resume-attempts must be a whole number from 0 to 100")
        if not 1 <= self["upstream-connections"] <= 10000:
            raise usage.UsageError("--upstream-connections must be a whole number from 1 to 10000")
        if self["admin-htpasswd"] and not self["admin-listen"]:
            raise usage.UsageError("--admin-htpasswd needs --admin-listen")
        if self["admin-listen"] and not self["admin-htpasswd"] \
                and not is_local_endpoint(self["admin-listen"]):
            raise usage.UsageError(
                f"--admin-listen {self['admin-listen']} is not a loopback address: anyone who "
                "reaches it could remove the cache; give --admin-htpasswd FILE or listen on "
                "127.0.0.1")

    def upstreams(self, settings: FileSettings | None = None) -> tuple[tuple[Upstream, ...], str]:
        """The upstreams and the default's name, from the configuration file, --registry
        and the single-registry options (which win).  Raises ConfigFileError."""
        if settings is None:
            settings = read_config_file(self["config"]) if self["config"] else FileSettings()
        overrides = {
            key: self[option]
            for option, key in (("upstream", "url"), ("upstream-ca", "ca"),
                                ("upstream-credentials", "credentials"),
                                ("auth-realm", "auth_realm"), ("auth-service", "auth_service"))
            if self[option]
        }
        if self.library is not None:
            overrides["library"] = self.library
        try:
            return assemble(settings, self["registry"], self["default-registry"], overrides,
                            bool(self["mirror-mode"]), client_auth=bool(self["htpasswd"]))
        except ValueError as e:
            raise ConfigFileError(str(e)) from None

    def cluster_options(self, settings: FileSettings) -> dict:
        """The shared store's and the cluster's settings, the file filling in what the
        command line and the environment left; UsageError for a combination that cannot
        work."""
        from_file = dict(settings.options)
        values = {key: self[key.replace("_", "-")] or from_file.get(key) for key in FILE_OPTIONS}
        if values["store"]:
            try:
                parse_store_url(values["store"])
            except ValueError as e:
                raise usage.UsageError(f"--store: {e}") from None
            if self["no-cache"]:
                raise usage.UsageError("--store needs the local cache (not --no-cache): it is "
                                       "the first level in front of the bucket")
        elif values["s3_endpoint"] or values["s3_credentials"]:
            raise usage.UsageError("--s3-endpoint and --s3-credentials need --store s3://...")
        if values["s3_endpoint"]:
            values["s3_endpoint"] = _check_url("--s3-endpoint", values["s3_endpoint"])
        if values["cluster"]:
            if self["no-cache"]:
                raise usage.UsageError("--cluster needs the cache (not --no-cache)")
            if not values["cluster"].startswith("redis://"):
                raise usage.UsageError("--cluster must be a Redis URL: redis://HOST:PORT/DB")
            missing = [f"--{k.replace('_', '-')}" for k in ("cluster_secret", "node_listen",
                                                           "node_url") if not values[k]]
            if missing:
                raise usage.UsageError(f"--cluster needs {' and '.join(missing)}: the nodes "
                                       "stream downloads from each other")
            values["node_url"] = _check_url("--node-url", values["node_url"])
        elif values["node_listen"] or values["node_url"]:
            raise usage.UsageError("--node-listen and --node-url need --cluster redis://...")
        if "lease-ttl" not in self._given and not self.environ.get("DOCXY_LEASE_TTL") \
                and "lease_ttl" in from_file:
            self["lease-ttl"] = float(from_file["lease_ttl"])
        if not self["lease-ttl"] >= 1:
            raise usage.UsageError("--lease-ttl must be at least 1 second")
        values["s3_region"] = values["s3_region"] or "us-east-1"
        bound = self["store-max-size"] or from_file.get("store_max_size")
        if bound and not (values["store"] and values["cluster"]):
            raise usage.UsageError("--store-max-size needs --store and --cluster: the nodes "
                                   "keep the bucket's least-recently-used order in Redis")
        values["store_max_size"] = parse_size(bound, "--store-max-size") if bound else None
        return values

    def config(self) -> Config:
        settings = read_config_file(self["config"]) if self["config"] else FileSettings()
        upstreams, default = self.upstreams(settings)
        cluster = self.cluster_options(settings)
        if self["no-cache"] and (settings.warm or any(u.max_age for u in upstreams)):
            raise usage.UsageError("[[warm]] and max_age need the cache (not --no-cache): "
                                   "there is nothing to warm or expire without it")
        return Config(
            **cluster,
            lease_ttl=self["lease-ttl"],
            environ=tuple((k, v) for k, v in self.environ.items() if k.startswith("AWS_")),
            listen=tuple(self["listen"]),
            tls=tuple(self["tls"]),
            cert_path=self["cert"] if self["tls"] else None,
            key_path=self["key"] if self["tls"] else None,
            public_url=self["public-url"],
            server_names=tuple(self["server-name"]),
            upstreams=upstreams,
            default_upstream=default,
            connect_timeout=self["connect-timeout"],
            header_timeout=self["header-timeout"],
            idle_timeout=self["idle-timeout"],
            resume_attempts=self["resume-attempts"],
            upstream_connections=self["upstream-connections"],
            request_timeout=self["request-timeout"],
            cache_dir=None if self["no-cache"] else self["cache-dir"],
            cache_max_size=self.cache_max_size,
            accel_redirect=self["accel-redirect"],
            tag_ttl=self["tag-ttl"],
            metrics_listen=self["metrics-listen"],
            log_format=self["log-format"],
            cert_check_interval=self["cert-check-interval"],
            stop_timeout=self["stop-timeout"],
            htpasswd=self["htpasswd"],
            allow_anonymous=bool(self["allow-anonymous"]),
            allow_networks=tuple(self["allow-net"]),
            deny_networks=tuple(self["deny-net"]),
            trusted_proxies=tuple(self["trusted-proxy"]),
            rate_limit=self.rate_limit,
            admin_listen=self["admin-listen"],
            admin_htpasswd=self["admin-htpasswd"],
            warm=settings.warm,
            retention_interval=settings.retention_interval or 3600.0,
        )


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        raise_open_files_limit()  # the real daemon only, not the tests' clocks
        tune_allocator(options.environ)
    try:
        return build_service(options.config(), reactor)
    except (ConfigFileError, TLSConfigError, CredentialsError, CacheConfigError,
            AccessConfigError, ClusterConfigError, AdminConfigError, usage.UsageError) as e:
        raise SystemExit(f"docxy: {e}") from None

