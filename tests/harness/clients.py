"""Drivers that run the real container clients against a registry (mirror) on 127.0.0.1.

`DockerDaemon` (dockerd 20.10 + the docker CLI), `Containerd` (containerd 1.6 + ctr),
`Podman` (4.3) and `Skopeo` (1.9) each keep all of their state under one work directory,
start and stop whatever daemon they need, and return `PullResult`/`CopyResult` values a test
can assert on. A failed or timed-out client raises `ClientError` carrying its stderr.
Nothing here knows about docxy: a mirror is just a URL.

What was needed on this machine (Debian 12, root, no systemd, cgroup v1, no internet), and why:

* Private mount namespaces. Every daemon and every podman/skopeo call runs under
  `unshare --mount --propagation private -- sh -c 'mount -n ...; exec "$@"'`, so mounts they
  make (dockerd bind-mounts its data root onto itself; containerd mounts during unpack) die
  with them even after SIGKILL, and hard-coded system paths are covered by private dirs:
  - dockerd 20.10 writes `/etc/docker/key.json` (the trust key; the path is not
    configurable, `--deprecated-key-path` does not exist in 20.10) and creates
    `/run/docker/plugins`: `/etc/docker` gets a private bind, `/run` a private tmpfs.
    The private `/etc/docker` also holds `certs.d/<host:port>/ca.crt`, which is where dockerd
    looks for a registry's or a mirror's CA (`SSL_CERT_FILE` = system bundle + test CA works
    too, but certs.d is the documented way and is per host).
  - podman and skopeo (as root) always write their blob-info cache to
    `/var/lib/containers/cache/blob-info-cache-v1.boltdb`, whatever `--root` says:
    `/var/lib/containers` gets a private bind. `/etc/containers/registries.conf.d` gets an
    empty one so that system drop-ins cannot add mirrors or aliases to ours.
  - `mount -n`: without it util-linux records the mount in `/run/mount/utab` on the host.
* dockerd: `dockerd --config-file D/daemon.json --containerd D/containerd/containerd.sock
  --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none --data-root D/data
  --exec-root D/exec -H unix://D/docker.sock --pidfile D/docker.pid`. Its own containerd is
  started by us (`--containerd`), because the one dockerd manages itself writes
  `/opt/containerd/{bin,lib}` (its `opt` plugin path cannot be set through dockerd).
  `daemon.json` holds `registry-mirrors`; plain-HTTP mirrors also go into
  `insecure-registries`. Mirrors are used for docker.io images only, so `docker pull
  alpine` reaches the mirror as `/v2/library/alpine/...`; with no internet, a pull that
  succeeds came through the mirror (the fallback to Hub fails on DNS).
* dockerd never checks certificates on 127.0.0.0/8: that range is built into its
  insecure registries (not removable), and any name resolving into it (`localhost`)
  counts too, so over TLS it skips verification (and may fall back to plain HTTP). A test
  of certificate handling through dockerd needs the mirror on `[::1]`, where dockerd does
  verify (measured: no CA or a wrong CA -> "x509: certificate signed by unknown
  authority", CA in certs.d/[::1]:PORT/ca.crt -> pull works).
* The docker CLI: `/usr/bin/docker` (docker.io, 20.10), not the first `docker` on PATH
  (here `/usr/local/bin/docker` is a 28.x CLI), always with `--config D/cli` so that
  `docker login` does not write `/root/.docker/config.json`. Passwords go via stdin.
* containerd: a config with `root`, `state`, `grpc.address`, `ttrpc.address` and the `opt`
  plugin path under D, the CRI plugin and the unusable snapshotters disabled.
  `ctr -a D/containerd.sock -n test image pull --hosts-dir D/hosts --snapshotter native
  --platform linux/amd64 docker.io/library/alpine:latest` pulls and unpacks; `native` needs
  no mounts. `hosts.toml` per registry: `server = "https://registry-1.docker.io"` and
  `[host."<mirror url>"] capabilities = ["pull", "resolve"]` plus `ca = "<path>"` for a test
  CA; an `http://` host URL is plain HTTP. containerd adds `?ns=docker.io` to every
  request it sends to a mirror. ctr wants fully qualified references. containerd 1.6
  rejects a hosts.toml without a `[host]` table ("invalid `host` tree", logged, then it
  silently uses its defaults), so a registry used directly is written as its own host.
* podman: private `storage.conf` (vfs, graphroot, runroot), `containers.conf`
  (cgroupfs, file events, tmp_dir, volume_path, network_config_dir), `registries.conf`,
  auth file and signature policy via `CONTAINERS_STORAGE_CONF`, `CONTAINERS_CONF`,
  `CONTAINERS_REGISTRIES_CONF`, `REGISTRY_AUTH_FILE`, `--signature-policy`, and
  `TMPDIR` (else big temporary files go to /var/tmp). A mirror's CA: `--cert-dir DIR`
  (a dir with `ca.crt`) applies to every host contacted, the mirror included; podman 4.3
  has no environment variable for it. Plain-HTTP mirror: `insecure = true`. The runroot
  must be at most 50 characters ("the specified runroot is longer than 50 characters"), so
  it lives in a short mkdtemp under /tmp, removed by stop().
  `podman image inspect` `.Digest` is the digest of what the tag named (the index for a
  multi-arch image); `.RepoDigests` holds the index and the instance.
* skopeo 1.9 ignores `CONTAINERS_REGISTRIES_CONF`: the hidden `--registries-conf FILE` is
  needed for mirrors. `skopeo inspect` lists tags from the primary location (Hub) unless
  `--no-tags` is given, so through a mirror it needs `--no-tags`. `copy ... dir:` keeps the
  manifest bytes, so sha256(manifest.json) is the pulled digest; `oci:` converts Docker
  manifests to OCI (a different digest).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from .procs import ManagedProcess, descendants_of, poll_until

PULL_TIMEOUT = 120.0
START_TIMEOUT = 60.0
CLIENT_TIMEOUT = 60.0

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_LINE = re.compile(r"^Digest: (sha256:[0-9a-f]{64})\s*$", re.MULTILINE)


# -- running clients ----------------------------------------------------------------------

class ClientError(RuntimeError):
    """A client command failed or timed out; carries its (redacted) argv and output."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 timeout: float | None = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timeout is not None
        what = f"timed out after {timeout}s" if timeout is not None else f"exited {returncode}"
        tail = "\n".join((stderr or stdout).strip().splitlines()[-25:])
        super().__init__(f"{shlex.join(self.argv)} {what}:\n{tail}")


def _redact(argv: Sequence[str], secrets: Iterable[str]) -> list[str]:
    out = list(argv)
    for secret in secrets:
        if secret:
            out = [a.replace(secret, "***") for a in out]
    return out


def run_client(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               timeout: float = CLIENT_TIMEOUT, input: str | None = None,
               secrets: Iterable[str] = (), check: bool = True, binary: bool = False,
               ) -> subprocess.CompletedProcess[Any]:
    """Run one client command with a deadline. On timeout the whole process group is
    killed (the client runs in its own session); with `check`, failure raises ClientError.
    `secrets` are replaced by *** in the argv an error shows. With `binary`, stdout stays
    bytes (a raw manifest must hash as sent)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if input is not None else
                            subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=full_env, start_new_session=True)
    try:
        out, err = proc.communicate(input.encode() if input is not None else None,
                                    timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        raise ClientError(_redact(argv, secrets), None, out.decode(errors="replace"),
                          err.decode(errors="replace"), timeout) from None
    stdout: Any = out if binary else out.decode(errors="replace")
    stderr = err.decode(errors="replace")
    if check and proc.returncode != 0:
        raise ClientError(_redact(argv, secrets), proc.returncode,
                          out.decode(errors="replace"), stderr)
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


# -- private mount namespaces -------------------------------------------------------------

_mountpoint_lock = threading.Lock()
_mountpoints: dict[Path, list[Any]] = {}  # path -> [users, created by us]


def _acquire_mountpoint(path: Path) -> None:
    """Make sure `path` exists as a directory to mount over; remember whether we made it."""
    with _mountpoint_lock:
        entry = _mountpoints.get(path)
        if entry is None:
            created = not path.exists()
            if created:
                path.mkdir(parents=True)
            entry = _mountpoints[path] = [0, created]
        entry[0] += 1


def _release_mountpoint(path: Path) -> None:
    """Drop one user; the last one removes the directory if we created it (it stays empty:
    everything written there went to the private directory mounted over it)."""
    with _mountpoint_lock:
        entry = _mountpoints.get(path)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del _mountpoints[path]
            if entry[1]:
                try:
                    path.rmdir()
                except OSError:
                    pass


def in_private_mounts(argv: Sequence[str], binds: Mapping[str, Path] = {},
                      tmpfs: Sequence[str] = ()) -> list[str]:
    """`argv` run in a new private mount namespace where each `tmpfs` target is covered by an
    empty tmpfs and each `binds` target by the given directory. The command is exec'd, so
    the pid of the returned argv is the command's own pid."""
    steps = [f"mount -n -t tmpfs -o mode=0755,size=64m tmpfs {shlex.quote(t)}" for t in tmpfs]
    steps += [f"mount -n --bind {shlex.quote(str(src))} {shlex.quote(target)}"
              for target, src in binds.items()]
    steps.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-ec", " && ".join(steps), "sh", *argv]


def mounts_under(path: Path) -> list[str]:
    """Mount points (in this process's namespace) at or below `path`."""
    prefix = str(Path(path).resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(mount_point)
    return found


def _unmount_all_under(path: Path) -> None:
    """Defensive: lazily unmount anything a crashed client left below `path`."""
    for mount_point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_tree(process: ManagedProcess, timeout: float) -> None:
    """Stop a daemon and anything it spawned in other process groups (shims, helpers)."""
    children = descendants_of(process.pid) if process.pid and process.running() else []
    process.stop(timeout=timeout)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rmtree(path: Path) -> None:
    if path.is_dir():
        _unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# -- mirror configuration files -----------------------------------------------------------

@dataclass(frozen=True)
class MirrorURL:
    """A mirror given as a URL: `http://127.0.0.1:5000` or `https://host:port/prefix`."""

    scheme: str
    host: str      # host:port
    path: str      # "" or "/prefix"

    @classmethod
    def parse(cls, url: str) -> "MirrorURL":
        u = urlsplit(url if "://" in url else f"https://{url}")
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"mirror must be http(s)://host[:port][/prefix]: {url!r}")
        return cls(u.scheme, u.netloc, u.path.rstrip("/"))

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def insecure(self) -> bool:
        return self.scheme == "http"


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def registries_conf(mirrors: Mapping[str, Sequence[str]]) -> str:
    """A containers-registries.conf(5) v2 file: for each registry (`docker.io`, `ghcr.io`)
    its mirrors, in order; a mirror location is host:port plus an optional path prefix."""
    lines = ['unqualified-search-registries = ["docker.io"]', 'short-name-mode = "permissive"']
    for registry, urls in mirrors.items():
        lines += ["", "[[registry]]", f"prefix = {_toml_str(registry)}",
                  f"location = {_toml_str(registry)}"]
        for url in urls:
            m = MirrorURL.parse(url)
            lines += ["", "[[registry.mirror]]", f"location = {_toml_str(m.host + m.path)}"]
            if m.insecure:
                lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def hosts_toml(registry: str, mirrors: Sequence[str], ca_path: Path | None = None,
               skip_verify: bool = False) -> str:
    """containerd's certs.d `hosts.toml` for `registry` (Hub's server is
    registry-1.docker.io): the mirrors first, with pull and resolve, then the server.
    Without mirrors the registry itself is the one host (a registry used directly):
    containerd 1.6 rejects a hosts.toml without any [host] table ("invalid `host` tree")
    and then silently falls back to its defaults."""
    server = "https://registry-1.docker.io" if registry == "docker.io" else f"https://{registry}"
    # `_default` serves every registry without a directory of its own: no server of its own.
    lines = [] if registry == "_default" else [f"server = {_toml_str(server)}"]
    for url in mirrors or [server]:
        m = MirrorURL.parse(url)
        lines += ["", f"[host.{_toml_str(m.url)}]", '  capabilities = ["pull", "resolve"]']
        if m.scheme == "https" and ca_path is not None:
            lines.append(f"  ca = {_toml_str(str(ca_path))}")
        if m.scheme == "https" and skip_verify:
            lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


# -- results ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PullResult:
    """What a client pulled: `digest` is the manifest (or index) digest the reference
    resolved to; `image_id` the local image id (config digest) where the client has one."""

    ref: str
    digest: str
    image_id: str | None
    repo_digests: tuple[str, ...]
    output: str = field(repr=False)


@dataclass(frozen=True)
class CopyResult:
    """What skopeo copied: the manifest as written, its digest, the child manifests of an
    index (with --all) and the blobs (config and layers) that were stored."""

    ref: str
    path: Path
    digest: str
    manifest: bytes = field(repr=False)
    media_type: str | None
    children: tuple[str, ...]
    blobs: tuple[str, ...]
    output: str = field(repr=False)

    def blob_path(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        direct = self.path / hex_
        return direct if direct.exists() else self.path / "blobs" / "sha256" / hex_


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- common lifecycle ---------------------------------------------------------------------

class _Driver:
    """Start/stop and context-manager plumbing shared by the drivers."""

    def __init__(self, workdir: Path | str, keep_data: bool) -> None:
        self.workdir = Path(workdir).resolve()
        self.keep_data = keep_data
        self._started = False

    def start(self) -> "_Driver":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_ca_dir(ca_path: Path, directory: Path) -> Path:
    """A directory holding `ca.crt` (podman/skopeo --cert-dir, docker certs.d/<host>)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(Path(ca_path).read_bytes())
    return directory


def _wait_ready(process: ManagedProcess, timeout: float, check: Callable[[], bool]) -> None:
    """Poll `check` until the daemon answers; fail at once, with its log, if it exits."""
    def ready() -> bool:
        if not process.running():
            raise RuntimeError(f"{process.name} exited {process.returncode}:\n"
                               f"{process.log_tail()}")
        return check()

    poll_until(ready, timeout=timeout, interval=0.1)


def _is_root() -> bool:
    return os.geteuid() == 0


# -- containerd + ctr ---------------------------------------------------------------------

class Containerd(_Driver):
    """A private containerd (in its own mount namespace) and `ctr` pulls through a hosts
    directory. `mirrors` maps a registry (`docker.io`, `ghcr.io`) to mirror URLs;
    `tls_registries` are host:port's pulled from directly; `ca_path` is the CA for both."""

    def __init__(self, workdir: Path | str, mirrors: Mapping[str, Sequence[str]] | None = None,
                 ca_path: Path | None = None, tls_registries: Sequence[str] = (),
                 skip_verify: bool = False, namespace: str = "test",
                 snapshotter: str = "native", keep_data: bool = False) -> None:
        super().__init__(workdir, keep_data)
        self.mirrors = {k: list(v) for k, v in (mirrors or {}).items()}
        for host in tls_registries:
            self.mirrors.setdefault(host, [])
        self.ca_path = Path(ca_path) if ca_path else None
        self.skip_verify = skip_verify
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "containerd.toml"
        self.hosts_dir = self.workdir / "hosts"
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.process: ManagedProcess | None = None

    def _config(self) -> str:
        disabled = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]
        return "\n".join([
            "version = 2",
            f"root = {_toml_str(str(self.root))}",
            f"state = {_toml_str(str(self.state))}",
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]", f"  address = {_toml_str(self.address)}",
            "[ttrpc]", f"  address = {_toml_str(self.address + '.ttrpc')}",
            "[debug]", '  level = "info"',
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f"    path = {_toml_str(str(self.workdir / 'opt'))}",
        ]) + "\n"

    def start(self, timeout: float = START_TIMEOUT) -> "Containerd":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.state, self.hosts_dir):  # always a fresh daemon
            _rmtree(d)
        self.config_path.write_text(self._config())
        for registry, urls in self.mirrors.items():
            d = self.hosts_dir / registry
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts.toml").write_text(
                hosts_toml(registry, urls, self.ca_path, self.skip_verify))
        self.hosts_dir.mkdir(exist_ok=True)
        argv = ["containerd", "--config", str(self.config_path)]
        if _is_root():
            argv = in_private_mounts(argv)
        self.process = ManagedProcess("containerd", argv, self.workdir / "containerd.log")
        self.process.start()
        self._started = True
        _wait_ready(self.process, timeout, lambda: os.path.exists(self.address) and self.ctr(
            "version", timeout=10, check=False).returncode == 0)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop_tree(self.process, timeout=20)
            self.process = None
        if self._started and not self.keep_data:
            _rmtree(self.root)
            _rmtree(self.state)
        self._started = False

    def ctr(self, *args: str, timeout: float = CLIENT_TIMEOUT, check: bool = True,
            secrets: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
        return run_client(["ctr", "-a", self.address, "-n", self.namespace, *args],
                          timeout=timeout, check=check, secrets=secrets)

    def pull(self, ref: str, platform: str | None = "linux/amd64", all_platforms: bool = False,
             user: tuple[str, str] | None = None, timeout: float = PULL_TIMEOUT) -> PullResult:
        """`ctr image pull --hosts-dir` (and unpack with the snapshotter); `ref` must be fully
        qualified (`docker.io/library/alpine:latest`)."""
        args = ["image", "pull", "--hosts-dir", str(self.hosts_dir),
                "--snapshotter", self.snapshotter]
        if all_platforms:
            args.append("--all-platforms")
        elif platform:
            args += ["--platform", platform]
        secrets: list[str] = []
        if user:
            args += ["--user", f"{user[0]}:{user[1]}"]
            secrets.append(user[1])
        result = self.ctr(*args, ref, timeout=timeout, secrets=secrets)
        digest = self.image_digest(ref)
        return PullResult(ref, digest, None, (f"{ref.rsplit(':', 1)[0]}@{digest}",),
                          result.stdout + result.stderr)

    def image_digest(self, ref: str) -> str:
        """The digest `ctr image ls` records for `ref`."""
        out = self.ctr("image", "ls", f"name=={ref}").stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0] == ref:
                return cols[2]
        raise ClientError(["ctr", "image", "ls", f"name=={ref}"], 0, out,
                          f"{ref} not in the image list")

    def remove_image(self, ref: str) -> None:
        self.ctr("image", "rm", "--sync", ref)


# -- dockerd + docker CLI -----------------------------------------------------------------

def docker_cli() -> str:
    """The docker CLI that belongs to the installed dockerd (docker.io puts it in /usr/bin);
    another one earlier on PATH may speak a newer API."""
    for candidate in ("/usr/bin/docker",):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("docker")
    if not found:
        raise RuntimeError("no docker CLI installed (apt install docker.io)")
    return found


def _unix_http_ok(sock_path: str, path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(sock_path)
        conn = http.client.HTTPConnection("localhost", timeout=2)
        conn.sock = s
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        s.close()


class DockerDaemon(_Driver):
    """A fresh dockerd (vfs, no networking) with its own containerd and CLI config.

    `mirrors` become `registry-mirrors` (docker.io images only); `ca_path` is trusted for
    every https mirror and every host in `tls_registries`; `insecure_registries` may be
    reached over plain HTTP (http mirrors are added automatically).
    """

    def __init__(self, workdir: Path | str, mirrors: Sequence[str] = (),
                 ca_path: Path | None = None, tls_registries: Sequence[str] = (),
                 insecure_registries: Sequence[str] = (),
                 extra_config: Mapping[str, Any] | None = None, keep_data: bool = False) -> None:
        super().__init__(workdir, keep_data)
        self.mirrors = [MirrorURL.parse(m) for m in mirrors]
        self.ca_path = Path(ca_path) if ca_path else None
        self.tls_registries = list(tls_registries)
        self.insecure_registries = list(insecure_registries)
        self.extra_config = dict(extra_config or {})
        self.socket = str(self.workdir / "docker.sock")
        self.host = f"unix://{self.socket}"
        self.config_path = self.workdir / "daemon.json"
        self.etc_dir = self.workdir / "etc-docker"   # mounted over /etc/docker
        self.cli_config = self.workdir / "cli"
        self.data_root = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.containerd = Containerd(self.workdir / "containerd", keep_data=keep_data)
        self.process: ManagedProcess | None = None
        self._mountpoint: Path | None = None

    def daemon_config(self) -> dict[str, Any]:
        insecure = list(dict.fromkeys(
            self.insecure_registries + [m.host for m in self.mirrors if m.insecure]))
        config: dict[str, Any] = {"registry-mirrors": [m.url for m in self.mirrors]}
        if insecure:
            config["insecure-registries"] = insecure
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = START_TIMEOUT) -> "DockerDaemon":
        if not _is_root():
            raise RuntimeError("DockerDaemon needs root (dockerd, mount namespaces)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.etc_dir, self.cli_config, self.data_root, self.exec_root):
            _rmtree(d)  # always a fresh daemon: nothing cached, no old login
            d.mkdir(parents=True)
        self.config_path.write_text(json.dumps(self.daemon_config(), indent=2))
        if self.ca_path:
            hosts = [m.host for m in self.mirrors if not m.insecure] + self.tls_registries
            for host in dict.fromkeys(hosts):
                _write_ca_dir(self.ca_path, self.etc_dir / "certs.d" / host)
        self._started = True
        self.containerd.start(timeout)
        self._mountpoint = Path("/etc/docker")
        _acquire_mountpoint(self._mountpoint)
        argv = ["dockerd", "--config-file", str(self.config_path),
                "--containerd", self.containerd.address,
                "--storage-driver=vfs", "--iptables=false", "--ip6tables=false",
                "--bridge=none", "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root), "-H", self.host,
                "--pidfile", str(self.workdir / "docker.pid")]
        argv = in_private_mounts(argv, binds={"/etc/docker": self.etc_dir}, tmpfs=["/run"])
        self.process = ManagedProcess("dockerd", argv, self.workdir / "dockerd.log")
        self.process.start()
        _wait_ready(self.process, timeout,
                    lambda: os.path.exists(self.socket) and _unix_http_ok(self.socket, "/_ping"))
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop_tree(self.process, timeout=30)
            self.process = None
        self.containerd.stop()
        if self._mountpoint is not None:
            _release_mountpoint(self._mountpoint)
            self._mountpoint = None
        if self._started and not self.keep_data:
            _rmtree(self.data_root)
            _rmtree(self.exec_root)
        self._started = False

    def docker(self, *args: str, timeout: float = CLIENT_TIMEOUT, input: str | None = None,
               check: bool = True, secrets: Iterable[str] = ()
               ) -> subprocess.CompletedProcess[str]:
        return run_client([docker_cli(), "--config", str(self.cli_config), "-H", self.host,
                           *args], timeout=timeout, input=input, check=check, secrets=secrets)

    def pull(self, ref: str, platform: str | None = None,
             timeout: float = PULL_TIMEOUT) -> PullResult:
        """`docker pull ref` (`alpine` goes to the mirrors; `host:port/x:y` straight there)."""
        args = ["pull"] + (["--platform", platform] if platform else []) + [ref]
        log_offset = self._log_size()
        try:
            result = self.docker(*args, timeout=timeout)
        except ClientError as e:
            # The CLI shows only the last endpoint's error (Hub's DNS failure after a mirror
            # fell through); the mirror's own error is in the daemon log.
            raise ClientError(e.argv, e.returncode, e.stdout,
                              e.stderr + "\n--- dockerd log during the pull:\n" +
                              self._log_since(log_offset),
                              timeout if e.timed_out else None) from None
        output = result.stdout + result.stderr
        info = self.inspect(ref)
        repo_digests = tuple(info.get("RepoDigests") or ())
        match = _DIGEST_LINE.search(output)
        if match:
            digest = match.group(1)
        elif repo_digests:
            digest = repo_digests[0].rsplit("@", 1)[1]
        else:
            raise ClientError(result.args, 0, result.stdout, "no digest in docker pull output")
        return PullResult(ref, digest, info.get("Id"), repo_digests, output)

    def inspect(self, ref: str) -> dict[str, Any]:
        data = json.loads(self.docker("image", "inspect", ref).stdout)
        return dict(data[0])

    def remove_image(self, ref: str) -> None:
        self.docker("image", "rm", "--force", ref)

    def login(self, registry: str, user: str, password: str,
              timeout: float = CLIENT_TIMEOUT) -> str:
        """`docker login` (the daemon checks the credentials); stored in the private CLI
        config. The password goes through stdin."""
        result = self.docker("login", "--username", user, "--password-stdin", registry,
                             input=password + "\n", timeout=timeout, secrets=[password])
        return result.stdout + result.stderr

    def logout(self, registry: str) -> None:
        self.docker("logout", registry)

    def log_text(self) -> str:
        return (self.workdir / "dockerd.log").read_text(errors="replace")

    def _log_size(self) -> int:
        try:
            return (self.workdir / "dockerd.log").stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int, lines: int = 20) -> str:
        try:
            with open(self.workdir / "dockerd.log", "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        wanted = [l for l in text.splitlines()
                  if "level=error" in l or "level=warning" in l or "endpoint" in l]
        return "\n".join(wanted[-lines:])


# -- podman and skopeo: no daemon, private config and state -------------------------------

_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class _ContainersTool(_Driver):
    """What podman and skopeo share: registries.conf, policy, auth file, a CA dir, and the
    private mount namespace covering /var/lib/containers (their blob-info cache)."""

    def __init__(self, workdir: Path | str, mirrors: Mapping[str, Sequence[str]] | None,
                 ca_path: Path | None, keep_data: bool,
                 extra_hosts: Mapping[str, str] | None = None) -> None:
        super().__init__(workdir, keep_data)
        self.mirrors = {k: list(v) for k, v in (mirrors or {}).items()}
        # host name -> address, seen by the tool only (its own /etc/hosts; needs root)
        self.extra_hosts = dict(extra_hosts or {})
        self.etc_hosts = self.workdir / "etc-hosts"
        self.ca_path = Path(ca_path) if ca_path else None
        self.registries_conf = self.workdir / "registries.conf"
        self.policy_path = self.workdir / "policy.json"
        self.auth_file = self.workdir / "auth.json"
        self.cert_dir = self.workdir / "certs"
        self.tmp_dir = self.workdir / "tmp"
        self.var_lib = self.workdir / "var-lib-containers"
        self.empty_dir = self.workdir / "empty"
        self._mountpoints: list[Path] = []

    def _setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _rmtree(self.auth_file)  # no credentials from an earlier run
        for d in (self.tmp_dir, self.var_lib, self.empty_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.registries_conf.write_text(registries_conf(self.mirrors))
        self.policy_path.write_text(json.dumps(_POLICY))
        self.auth_file.write_text("{}")
        if self.extra_hosts:
            if not _is_root():
                raise RuntimeError("extra_hosts needs root (a private /etc/hosts)")
            lines = [f"{address} {name}" for name, address in self.extra_hosts.items()]
            self.etc_hosts.write_text(Path("/etc/hosts").read_text() + "\n".join(lines) + "\n")
        if self.ca_path:
            _write_ca_dir(self.ca_path, self.cert_dir)
        if _is_root():
            for p in (Path("/var/lib/containers"),):
                _acquire_mountpoint(p)
                self._mountpoints.append(p)
        self._started = True

    def _teardown(self) -> None:
        for p in self._mountpoints:
            _release_mountpoint(p)
        self._mountpoints = []

    def _env(self) -> dict[str, str]:
        env = {"TMPDIR": str(self.tmp_dir), "REGISTRY_AUTH_FILE": str(self.auth_file),
               "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf)}
        if not _is_root():
            env["XDG_DATA_HOME"] = str(self.var_lib)  # the rootless blob-info cache
        return env

    def _wrap(self, argv: list[str]) -> list[str]:
        if not _is_root():
            return argv
        binds = {"/var/lib/containers": self.var_lib}
        if Path("/etc/containers/registries.conf.d").is_dir():
            binds["/etc/containers/registries.conf.d"] = self.empty_dir
        if self.extra_hosts:
            binds["/etc/hosts"] = self.etc_hosts
        return in_private_mounts(argv, binds=binds)

    def _tls_args(self, prefix: str, tls_verify: bool | None) -> list[str]:
        args = []
        if self.ca_path:
            args.append(f"--{prefix}cert-dir={self.cert_dir}")
        if tls_verify is not None:
            args.append(f"--{prefix}tls-verify={'true' if tls_verify else 'false'}")
        return args


class Podman(_ContainersTool):
    """podman with private storage (vfs), config, registries.conf and auth file.

    `mirrors` maps a registry (`docker.io`, `ghcr.io`) to mirror URLs; a path in the URL is
    a name prefix (`http://127.0.0.1:P/ghcr` sends `ghcr.io/x/y` to `/v2/ghcr/x/y/...`).
    `ca_path` is trusted (via `--cert-dir`) for every registry and mirror contacted.
    """

    def __init__(self, workdir: Path | str, mirrors: Mapping[str, Sequence[str]] | None = None,
                 ca_path: Path | None = None, keep_data: bool = False) -> None:
        super().__init__(workdir, mirrors, ca_path, keep_data)
        self.storage_conf = self.workdir / "storage.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.graphroot = self.workdir / "storage"
        self.runroot = self.workdir / "runroot"  # replaced by a short path in start()

    def start(self) -> "Podman":
        self._setup()
        _rmtree(self.graphroot)  # always fresh storage
        # podman 4.3 refuses a runroot longer than 50 characters (conmon's socket paths).
        self.runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
        self.storage_conf.write_text("\n".join([
            "[storage]", 'driver = "vfs"',
            f"graphroot = {_toml_str(str(self.graphroot))}",
            f"runroot = {_toml_str(str(self.runroot))}"]) + "\n")
        self.containers_conf.write_text("\n".join([
            "[engine]", 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
            f"events_logfile_path = {_toml_str(str(self.workdir / 'events.log'))}",
            f"tmp_dir = {_toml_str(str(self.workdir / 'libpod-tmp'))}",
            f"volume_path = {_toml_str(str(self.workdir / 'volumes'))}",
            "[network]",
            f"network_config_dir = {_toml_str(str(self.workdir / 'networks'))}"]) + "\n")
        return self

    def stop(self) -> None:
        self._teardown()
        if self._started:
            _rmtree(self.runroot)
            if not self.keep_data:
                _rmtree(self.graphroot)
        self._started = False

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update({"CONTAINERS_STORAGE_CONF": str(self.storage_conf),
                    "CONTAINERS_CONF": str(self.containers_conf)})
        return env

    def podman(self, *args: str, timeout: float = CLIENT_TIMEOUT, input: str | None = None,
               check: bool = True, secrets: Iterable[str] = ()
               ) -> subprocess.CompletedProcess[str]:
        argv = ["podman", "--root", str(self.graphroot), "--runroot", str(self.runroot),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", *args]
        return run_client(self._wrap(argv), env=self._env(), timeout=timeout, input=input,
                          check=check, secrets=secrets)

    def pull(self, ref: str, platform: str | None = None,
             creds: tuple[str, str] | None = None, tls_verify: bool | None = None,
             timeout: float = PULL_TIMEOUT) -> PullResult:
        """`podman pull ref`; use fully qualified references (`docker.io/library/alpine`)."""
        args = ["pull", f"--signature-policy={self.policy_path}",
                *self._tls_args("", tls_verify)]
        if platform:
            args.append(f"--platform={platform}")
        secrets: list[str] = []
        if creds:
            args.append(f"--creds={creds[0]}:{creds[1]}")
            secrets.append(creds[1])
        result = self.podman(*args, ref, timeout=timeout, secrets=secrets)
        lines = result.stdout.strip().splitlines()
        image_id = lines[-1].strip() if lines else ""
        info = self.inspect(image_id or ref)
        return PullResult(ref, info["Digest"], "sha256:" + info["Id"],
                          tuple(info.get("RepoDigests") or ()), result.stdout + result.stderr)

    def inspect(self, ref: str) -> dict[str, Any]:
        return dict(json.loads(self.podman("image", "inspect", ref).stdout)[0])

    def remove_image(self, ref: str) -> None:
        self.podman("image", "rm", "--force", ref)

    def login(self, registry: str, user: str, password: str, tls_verify: bool | None = None,
              timeout: float = CLIENT_TIMEOUT) -> str:
        result = self.podman("login", *self._tls_args("", tls_verify), "--username", user,
                             "--password-stdin", registry, input=password + "\n",
                             timeout=timeout, secrets=[password])
        return result.stdout + result.stderr


class Skopeo(_ContainersTool):
    """skopeo copy/inspect with a private registries.conf (mirrors), policy and auth file.

    References without a transport get `docker://`. `ca_path` is passed as the cert dir;
    `tls_verify=False` allows plain HTTP for a registry addressed directly."""

    def __init__(self, workdir: Path | str, mirrors: Mapping[str, Sequence[str]] | None = None,
                 ca_path: Path | None = None, tls_verify: bool | None = None,
                 keep_data: bool = False, extra_hosts: Mapping[str, str] | None = None) -> None:
        super().__init__(workdir, mirrors, ca_path, keep_data, extra_hosts)
        self.tls_verify = tls_verify
        self.out_dir = self.workdir / "out"
        self._copies = 0

    def start(self) -> "Skopeo":
        self._setup()
        return self

    def stop(self) -> None:
        self._teardown()
        if self._started and not self.keep_data:
            _rmtree(self.out_dir)
        self._started = False

    def skopeo(self, *args: str, timeout: float = CLIENT_TIMEOUT, check: bool = True,
               secrets: Iterable[str] = (), binary: bool = False
               ) -> subprocess.CompletedProcess[Any]:
        argv = ["skopeo", f"--registries-conf={self.registries_conf}",
                f"--policy={self.policy_path}", f"--tmpdir={self.tmp_dir}", *args]
        return run_client(self._wrap(argv), env=self._env(), timeout=timeout, check=check,
                          secrets=secrets, binary=binary)

    @staticmethod
    def _transport(ref: str) -> str:
        return ref if "://" in ref else f"docker://{ref}"

    def copy(self, src_ref: str, dest: Path | str | None = None, *, all: bool = False,
             layout: str = "dir", creds: tuple[str, str] | None = None,
             tls_verify: bool | None = None, override_arch: str | None = None,
             timeout: float = PULL_TIMEOUT) -> CopyResult:
        """`skopeo copy docker://src dir:DEST` (or `oci:DEST`); `all` copies every image of an
        index. Returns the manifest digest and the blobs stored."""
        if layout not in ("dir", "oci"):
            raise ValueError("layout is dir or oci")
        if dest is None:
            self._copies += 1
            dest = self.out_dir / f"copy-{self._copies}"
        dest = Path(dest)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tv = self.tls_verify if tls_verify is None else tls_verify
        args = ["copy", "--retry-times=0", *self._tls_args("src-", tv)]
        if all:
            args.append("--all")
        if override_arch:
            args.append(f"--override-arch={override_arch}")
        secrets: list[str] = []
        if creds:
            args.append(f"--src-creds={creds[0]}:{creds[1]}")
            secrets.append(creds[1])
        else:
            args.append(f"--src-authfile={self.auth_file}")
        result = self.skopeo(*args, self._transport(src_ref), f"{layout}:{dest}",
                             timeout=timeout, secrets=secrets)
        output = result.stdout + result.stderr
        return self._read_dir(src_ref, dest, output) if layout == "dir" else \
            self._read_oci(src_ref, dest, output)

    def _read_dir(self, ref: str, dest: Path, output: str) -> CopyResult:
        manifest = (dest / "manifest.json").read_bytes()
        doc = json.loads(manifest)
        children = tuple(c["digest"] for c in doc.get("manifests", ()))
        blobs = tuple(sorted("sha256:" + p.name for p in dest.iterdir()
                             if _HEX64.match(p.name)))
        return CopyResult(ref, dest, _sha256(manifest), manifest, doc.get("mediaType"),
                          children, blobs, output)

    def _read_oci(self, ref: str, dest: Path, output: str) -> CopyResult:
        index = json.loads((dest / "index.json").read_text())
        digest = index["manifests"][0]["digest"]
        blob_dir = dest / "blobs" / "sha256"
        manifest = (blob_dir / digest.split(":", 1)[1]).read_bytes()
        doc = json.loads(manifest)
        children = tuple(c["digest"] for c in doc.get("manifests", ()))
        manifests = {digest, *children}
        blobs = tuple(sorted(d for d in ("sha256:" + p.name for p in blob_dir.iterdir())
                             if d not in manifests))
        return CopyResult(ref, dest, digest, manifest,
                          doc.get("mediaType") or index["manifests"][0].get("mediaType"),
                          children, blobs, output)

    def inspect(self, ref: str, raw: bool = False, creds: tuple[str, str] | None = None,
                tls_verify: bool | None = None, tags: bool = False,
                timeout: float = CLIENT_TIMEOUT) -> Any:
        """`skopeo inspect`: the raw manifest bytes with `raw`, else the parsed JSON.
        Tags are listed only with `tags` (the listing ignores mirrors)."""
        tv = self.tls_verify if tls_verify is None else tls_verify
        args = ["inspect", "--retry-times=0", *self._tls_args("", tv)]
        if raw:
            args.append("--raw")
        elif not tags:
            args.append("--no-tags")
        secrets: list[str] = []
        if creds:
            args.append(f"--creds={creds[0]}:{creds[1]}")
            secrets.append(creds[1])
        else:
            args.append(f"--authfile={self.auth_file}")
        result = self.skopeo(*args, self._transport(ref), timeout=timeout, secrets=secrets,
                             binary=raw)
        return result.stdout if raw else json.loads(result.stdout)

