"""What docxy mirrors: the upstream registries, the built-in presets for the well-known
ones, and the TOML file (`--config`) that declares them.

An `Upstream` is plain data.  How a request picks one is `docxy.registry.selection`; how docxy talks
to one is `docxy.upstream.proxy`.
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from urllib.parse import urlsplit

import attrs

from docxy.registry.units import parse_bandwidth, parse_duration

DEFAULT_UPSTREAM = "docker.io"


class ConfigFileError(Exception):
    """A configuration file that cannot be used; the message is shown as it is."""


@attrs.frozen
class Upstream:
    """One upstream registry and the ways a request selects it.

    `name` is the registry's own host name as clients know it (`ghcr.io`); containerd's
    `ns=` sends it, and it is the default path prefix.  `names` are more `ns` values for
    the same registry.  `repositories` are glob patterns a repository must match (empty:
    every repository)."""

    name: str
    url: str
    ca: str | None = None
    credentials: str | None = None
    auth_realm: str | None = None
    auth_service: str | None = None
    library: bool = False
    mirror_mode: bool = False
    repositories: tuple[str, ...] = ()
    deny_repositories: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    max_rate: float | None = None  # bytes per second for all its blob downloads together
    max_age: float | None = None  # retention: seconds since an image's last pull
    keep: tuple[str, ...] = ()  # retention: repositories (globs) never expired

    @property
    def base(self) -> str:
        return self.url.rstrip("/")

    @property
    def all_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.names)))

    @property
    def all_prefixes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.prefixes)))

    def allows(self, repository: str) -> bool:
        """Whether `repository` (as the upstream names it) may be pulled through docxy."""
        if any(fnmatch.fnmatchcase(repository, p) for p in self.deny_repositories):
            return False
        if not self.repositories:
            return True
        return any(fnmatch.fnmatchcase(repository, p) for p in self.repositories)


# The registries operators ask for most.  A preset is enabled by `--registry NAME` or by a
# table of that name in the configuration file, whose keys override the preset's.
PRESETS: dict[str, Upstream] = {
    u.name: u
    for u in (
        Upstream(
            "docker.io",
            "https://registry-1.docker.io",
            library=True,  # Hub's official images live under library/
            names=("index.docker.io", "registry-1.docker.io"),
        ),
        Upstream("ghcr.io", "https://ghcr.io"),
        Upstream("quay.io", "https://quay.io"),
        Upstream("gcr.io", "https://gcr.io"),
        Upstream("registry.k8s.io", "https://registry.k8s.io"),
        Upstream("mcr.microsoft.com", "https://mcr.microsoft.com"),
    )
}

# A registry host as clients write it: lower-case labels, an optional port.
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:\d{1,5})?")
# A path prefix is one name component (podman's `location = "mirror/ghcr.io"`).
_PREFIX_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def is_host_name(value: str) -> bool:
    return len(value) <= 253 and _HOST_RE.fullmatch(value) is not None


def check_url(what: str, value: str) -> str:
    """An http(s) base URL without query or fragment, or ValueError saying why not."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL, not {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query or fragment: {value!r}")
    return value.rstrip("/")


def preset_for_url(url: str) -> Upstream | None:
    """The preset whose registry lives at `url`'s host (`https://ghcr.io` is ghcr.io)."""
    host = (urlsplit(url).hostname or "").lower()
    for preset in PRESETS.values():
        if host == urlsplit(preset.url).hostname or host in preset.all_names:
            return preset
    return None


# --- the configuration file ---------------------------------------------------------------

_STRING_KEYS = ("url", "ca", "credentials", "auth_realm", "auth_service")
_BOOL_KEYS = ("library", "mirror_mode")
_LIST_KEYS = ("repositories", "deny_repositories", "names", "prefixes", "hosts", "keep")
# Daemon options a file may set too (the command line and DOCXY_* win): the cluster's.
FILE_OPTIONS = ("store", "s3_endpoint", "s3_credentials", "s3_region", "cluster",
                "cluster_secret", "node_listen", "node_url", "store_max_size")
FILE_NUMBERS = ("lease_ttl",)  # the same, as numbers
_TOP_KEYS = ("default", "upstream", "warm", "retention_interval") + FILE_OPTIONS + FILE_NUMBERS


@attrs.frozen
class WarmSchedule:
    """A `[[warm]]` table: images warmed at the start and every `every` seconds."""

    images: tuple[str, ...]
    every: float
    platforms: tuple[str, ...] = ()


@attrs.frozen
class FileSettings:
    """What a configuration file declares: upstream tables (partial: the keys it set) and
    the default upstream's name, if it names one."""

    upstreams: tuple[tuple[str, dict], ...] = ()
    default: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # FILE_OPTIONS and FILE_NUMBERS it sets
    warm: tuple[WarmSchedule, ...] = ()  # [[warm]] tables
    retention_interval: float | None = None  # seconds between retention sweeps


def _check_warm(tables) -> tuple[WarmSchedule, ...]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError("warm must be tables: [[warm]] images = [...] every = \"6h\"")
    out = []
    for i, table in enumerate(tables, 1):
        where = f"[[warm]] number {i}"
        unknown = sorted(set(table) - {"images", "every", "platforms"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} "
                             "(expected images, every, platforms)")
        images = table.get("images")
        if not isinstance(images, list) or not images or not all(
                isinstance(v, str) and v.strip() for v in images):
            raise ValueError(f"{where}: images must be a non-empty list of references")
        if "every" not in table:
            raise ValueError(f'{where}: every is missing (e.g. every = "6h")')
        every = parse_duration(table["every"]) if isinstance(table["every"], str) else None
        if every is None:
            raise ValueError(f'{where}: every is a string like "6h"')
        if every < 60:
            raise ValueError(f"{where}: every must be at least a minute")
        platforms = table.get("platforms", [])
        if not isinstance(platforms, list) or not all(
                isinstance(p, str) and p.count("/") in (1, 2) for p in platforms):
            raise ValueError(f'{where}: platforms is a list like ["linux/arm64"]')
        out.append(WarmSchedule(tuple(v.strip() for v in images), every, tuple(platforms)))
    return tuple(out)


def read_config_file(path: str) -> FileSettings:
    """Read and check a configuration file; ConfigFileError says what is wrong and where."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"configuration file {path} is not valid TOML: {e}") from None
    try:
        return parse_config(data)
    except ValueError as e:
        raise ConfigFileError(f"configuration file {path}: {e}") from None


def parse_config(data: dict) -> FileSettings:
    """Check the parsed TOML of a configuration file; ValueError says what is wrong."""
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} (expected: default, "
                         f"{', '.join(FILE_OPTIONS + FILE_NUMBERS)}, retention_interval, "
                         f"[upstream.\"NAME\"], [[warm]])")
    options = []
    for key in FILE_OPTIONS:
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"{key} must be a non-empty string")
            options.append((key, data[key]))
    for key in FILE_NUMBERS:
        if key in data:
            if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
                raise ValueError(f"{key} must be a number")
            options.append((key, data[key]))
    warm = _check_warm(data["warm"]) if "warm" in data else ()
    interval = None
    if "retention_interval" in data:
        if not isinstance(data["retention_interval"], str):
            raise ValueError('retention_interval is a string like "1h"')
        interval = parse_duration(data["retention_interval"])
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise ValueError("default must be a string naming an upstream")
    tables = data.get("upstream", {})
    if not isinstance(tables, dict):
        raise ValueError('upstream must be tables: [upstream."ghcr.io"]')
    upstreams = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f'upstream "{name}" must be a table: [upstream."{name}"]')
        upstreams.append((name.lower(), _check_table(name, table)))
    return FileSettings(tuple(upstreams), default.lower() if default else None, tuple(options),
                        warm, interval)


def _check_table(name: str, table: dict) -> dict:
    where = f'[upstream."{name}"]'
    if table and all(isinstance(v, dict) for v in table.values()):
        # `[upstream.ghcr.io]` is a table `ghcr` holding a table `io`.
        raise ValueError(f"{where} holds only tables: quote names with dots, "
                         f'[upstream."{name}.{next(iter(table))}"]')
    unknown = sorted(set(table) - set(_STRING_KEYS + _BOOL_KEYS + _LIST_KEYS
                                      + ("max_rate", "max_age")))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    out: dict = {}
    for key, value in table.items():
        if key == "max_rate":
            if not isinstance(value, str):
                raise ValueError(f'{where}: max_rate is a string like "50MB/s"')
            out[key] = parse_bandwidth(value)
        elif key == "max_age":
            if not isinstance(value, str):
                raise ValueError(f'{where}: max_age is a string like "30d"')
            try:
                out[key] = parse_duration(value)
            except ValueError as e:
                raise ValueError(f"{where}: max_age: {e}") from None
        elif key in _STRING_KEYS:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty string")
            out[key] = check_url(f"{where} {key}", value) if key in ("url", "auth_realm") else value
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {key} must be true or false")
            out[key] = value
        else:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{where}: {key} must be a list of strings")
            out[key] = tuple(v if key.endswith("repositories") or key == "keep" else v.lower()
                             for v in value)
    return out


def build_upstream(name: str, settings: dict) -> Upstream:
    """An upstream from its preset (if `name` is one) with `settings` on top; ValueError if
    it cannot be used (no URL for a registry docxy has no preset for, a malformed name)."""
    name = name.lower()
    if not is_host_name(name):
        raise ValueError(f"upstream name {name!r} is not a registry host name (like ghcr.io)")
    preset = PRESETS.get(name)
    if preset is None:
        if "url" not in settings:
            raise ValueError(
                f'upstream "{name}" needs a url (docxy has presets only for '
                f"{', '.join(PRESETS)})"
            )
        preset = Upstream(name, settings["url"])
    upstream = attrs.evolve(preset, **settings)
    for value in upstream.names + upstream.hosts:
        if not is_host_name(value):
            raise ValueError(f'upstream "{name}": {value!r} is not a host name')
    for value in upstream.prefixes:
        if _PREFIX_RE.fullmatch(value) is None:
            raise ValueError(
                f'upstream "{name}": prefix {value!r} must be one repository name component'
            )
    if upstream.credentials and not upstream.mirror_mode:
        raise ValueError(
            f'upstream "{name}": credentials are used only in mirror mode '
            "(mirror_mode = true, or --mirror-mode)"
        )
    return upstream


def check_distinct(upstreams: tuple[Upstream, ...]) -> None:
    """ValueError if two upstreams claim the same name, path prefix or host."""
    seen: dict[tuple[str, str], str] = {}
    for u in upstreams:
        # A name selects by ns= and a prefix by path: one namespace, or a client would
        # reach different registries through the same word.
        claims = [("name or prefix", n) for n in u.all_names + u.all_prefixes]
        claims += [("host", h) for h in u.hosts]
        for claim in claims:
            other = seen.setdefault(claim, u.name)
            if other != u.name:
                raise ValueError(
                    f"{claim[0]} {claim[1]!r} is claimed by both {other} and {u.name}"
                )


def assemble(
    settings: FileSettings,
    registries: list[str],
    default: str | None,
    overrides: dict,
    mirror_mode: bool,
    client_auth: bool = False,
) -> tuple[tuple[Upstream, ...], str]:
    """The upstreams and the default's name from a configuration file's `settings`, the
    `--registry` values (`NAME` or `NAME=URL`), `--default-registry`, and `overrides` of
    the default upstream's settings from the single-registry options (which win).  An
    `overrides` URL that is a preset's makes that preset the default.  ValueError says
    what cannot be used.  With `client_auth` docxy's own users pull, so every upstream is
    in mirror mode (its account, if any, stays docxy's)."""
    tables: dict[str, dict] = {name: dict(table) for name, table in settings.upstreams}
    for value in registries:
        name, sep, url = value.partition("=")
        table = tables.setdefault(name.strip().lower(), {})
        if sep:
            table["url"] = check_url(f"--registry {name}", url.strip())
    preset = preset_for_url(overrides["url"]) if "url" in overrides else None
    default = (
        (default or "").lower()
        or settings.default
        or (preset.name if preset else DEFAULT_UPSTREAM)
    )
    tables.setdefault(default, {}).update(overrides)
    upstreams = []
    for name, table in tables.items():
        if client_auth and table.get("mirror_mode") is False:
            raise ValueError(f'upstream "{name}": mirror_mode = false cannot be combined '
                             "with client authentication (--htpasswd)")
        if mirror_mode or client_auth:
            table.setdefault("mirror_mode", True)
        upstreams.append(build_upstream(name, table))
    check_distinct(tuple(upstreams))
    return tuple(upstreams), default
