"""Builds a Dockerfile with buildah and runs the image with podman, as root, in one private
store under a work directory (`ImageEngine`); `pip_home()` hands the build this machine's
way to PyPI. Nothing here knows about docxy.

What was needed on this machine (Debian 12, root, no systemd, cgroup v1, buildah 1.28,
podman 4.3), and why:

* One store for both tools: `--root`, `--runroot` (at most 50 characters, as for
  harness.clients.Podman) and `--storage-driver overlay`. overlay works here (ext4) and a
  container starts in 1 s where vfs copies the image for 12 s. The commands that copy
  images (`buildah bud`, `podman import`) run in a private mount namespace
  (harness.clients.in_private_mounts) with /var/lib/containers covered: the blob-info
  cache is written there whatever --root says, and their overlay mounts die with them.
  Commands on containers cannot: a container's root file system is mounted by `podman
  run` and must be seen by `podman exec` (in another namespace it is an empty directory:
  "unable to find user docxy: no matching entries in passwd file"); `podman rm` unmounts
  it, and stop() unmounts whatever is left under the store.
* `buildah bud --isolation chroot --network host --pull=never --format docker`: chroot
  needs no runtime or cgroups, host networking reaches PyPI the way this machine does,
  the base comes from the store only, and the docker format keeps HEALTHCHECK (the OCI
  format drops it, with a warning).
* pip in the build: this machine reaches PyPI directly (no proxy variables) through a TLS
  interceptor whose CA is in the system bundle, set as pip's `cert` (PIP_CERT and
  /etc/pip.conf). `pip_home()` writes what pip uses here that the build can use too (index
  URLs over HTTP(S), trusted hosts, proxy, timeout, the CA bundle copied) into
  `.config/pip/pip.conf` of a directory that the build mounts over /root: RUN steps run as
  root, so pip reads it as its user config. A mount point that is not in the base
  (/etc/pip.conf) would stay in the image as an empty file (buildah 1.28); /root is in
  every base. Local indexes and find-links (file://, /opt/wheels) are left out. Proxy
  variables, when set, reach RUN steps through buildah's --http-proxy (on by default).
* podman: `--runtime runc` with `--cgroup-manager cgroupfs`, `--events-backend file` and
  a private `--tmpdir`. crun 1.8 refuses this machine's cgroups ("cgroups in hybrid mode
  not supported, drop all controllers from cgroupv2"), with `--cgroups=disabled` too;
  runc refuses `--cgroups=disabled` ("not compatible with NoCgroups") and works with
  cgroupfs. runc keeps its state in its default /run/runc: `--runtime-flag root=` is not
  passed on to the exit command conmon runs (`podman container cleanup`), which would
  look in /run/runc all the same. stop() removes /run/runc if it made it and it is empty.
* rlimits: podman 4.3 as root asks the runtime for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC
  32768 (`--ulimit host` too), and runs the runtime with RLIMIT_NPROC 32768. Without
  CAP_SYS_RESOURCE (absent here; the hard RLIMIT_NOFILE is 20000) raising a hard limit is
  refused: "runc create failed: ... error setting rlimit type 7: operation not
  permitted" (type 6, NPROC, above 32768). `run()` asks for this process's own
  RLIMIT_NOFILE and an RLIMIT_NPROC of 4096, which never needs raising.
* HEALTHCHECK: podman runs it from a systemd timer, and there is no systemd here ("unable
  to get systemd connection"): `run()` sets `--health-interval disable`, and a test runs
  the check itself with `podman healthcheck run`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .clients import CLIENT_TIMEOUT, _ContainersTool, _rmtree, run_client

BUILD_TIMEOUT = 900.0
NPROC = 4096

# pip settings that say how to reach an index; values that are local paths are dropped.
_PIP_KEYS = {"index-url": "index-url", "extra-index-url": "extra-index-url",
             "trusted-host": "trusted-host", "proxy": "proxy", "timeout": "timeout",
             "default-timeout": "timeout", "retries": "retries", "cert": "cert",
             "client-cert": "client-cert"}


def _pip_config() -> dict[str, str]:
    """pip's effective settings on this machine (`pip config list`): the environment
    (PIP_*) over the [install] section over [global], as `pip install` applies them."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if sep and key in _PIP_KEYS:
            found.setdefault(_PIP_KEYS[key], {})[section] = str(ast.literal_eval(value))
    return {key: next(by[s] for s in (":env:", "install", "global") if s in by)
            for key, by in found.items() if {":env:", "install", "global"} & by.keys()}


def pip_home(directory: Path) -> Path:
    """A home directory for the build's RUN steps whose pip config reaches PyPI the way
    pip does here (see the module docstring); mount it over /root."""
    conf_dir = directory / ".config" / "pip"
    conf_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[global]"]
    for key, value in sorted(_pip_config().items()):
        if key in ("cert", "client-cert"):
            target = conf_dir / f"{key}.pem"
            shutil.copyfile(value, target)
            value = f"/root/.config/pip/{target.name}"
        elif key in ("index-url", "extra-index-url"):
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            lines.append(f"{key} = {value}")
    (conf_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    return directory


class ImageEngine(_ContainersTool):
    """buildah and podman sharing one private store; containers it ran are removed by
    stop(), and the store with them."""

    def __init__(self, workdir: Path | str, runtime: str = "runc") -> None:
        super().__init__(workdir, mirrors=None, ca_path=None, keep_data=False)
        self.runtime = runtime
        self.graphroot = self.workdir / "storage"
        self.containers_conf = self.workdir / "containers.conf"
        self.runroot = self.workdir / "runroot"  # replaced by a short path in start()
        self.runtime_state = Path("/run") / runtime  # the runtime's default --root, as root
        self._made_runtime_state = False

    def start(self) -> "ImageEngine":
        self._setup()
        _rmtree(self.graphroot)
        self.runroot = Path(tempfile.mkdtemp(prefix="dx-engine-"))
        self._made_runtime_state = not self.runtime_state.exists()
        self.containers_conf.write_text("\n".join([
            "[engine]", 'cgroup_manager = "cgroupfs"', 'events_logger = "file"',
            f"events_logfile_path = {json.dumps(str(self.workdir / 'events.log'))}",
            f"tmp_dir = {json.dumps(str(self.runroot / 'libpod'))}",
            "[network]",
            f"network_config_dir = {json.dumps(str(self.workdir / 'networks'))}"]) + "\n")
        return self

    def stop(self) -> None:
        if self._started:
            self.podman("stop", "--all", "--time", "10", check=False, timeout=120)
            self.podman("rm", "--all", "--force", check=False, timeout=120)
            self._teardown()
            _rmtree(self.runroot)
            _rmtree(self.graphroot)
            if self._made_runtime_state:
                try:
                    self.runtime_state.rmdir()  # only when empty: no container left in it
                except OSError:
                    pass
        self._started = False

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["CONTAINERS_CONF"] = str(self.containers_conf)
        return env

    def _store_args(self) -> list[str]:
        return ["--root", str(self.graphroot), "--runroot", str(self.runroot),
                "--storage-driver", "overlay"]

    def buildah(self, *args: str, timeout: float = CLIENT_TIMEOUT, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return run_client(self._wrap(["buildah", *self._store_args(), *args]),
                          env=self._env(), timeout=timeout, check=check)

    def podman(self, *args: str, timeout: float = CLIENT_TIMEOUT, check: bool = True,
               private_mounts: bool = False) -> subprocess.CompletedProcess[str]:
        """One podman command; commands that copy images want `private_mounts`, those on
        containers must not have them (see the module docstring)."""
        argv = ["podman", *self._store_args(), "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--tmpdir", str(self.runroot / "libpod"),
                "--runtime", self.runtime, *args]
        return run_client(self._wrap(argv) if private_mounts else argv, env=self._env(),
                          timeout=timeout, check=check)

    # -- images ------------------------------------------------------------------------

    def import_rootfs(self, tarball: Path, name: str) -> str:
        """A root file system tarball as the image `name`; returns its id."""
        result = self.podman("import", "--change", 'CMD ["/bin/sh"]', str(tarball), name,
                             timeout=300, private_mounts=True)
        return result.stdout.strip().splitlines()[-1]

    def build(self, context: Path, tag: str, *, dockerfile: Path | None = None,
              build_args: Mapping[str, str] | None = None,
              volumes: Iterable[str] = (), timeout: float = BUILD_TIMEOUT
              ) -> subprocess.CompletedProcess[str]:
        """`buildah bud` of `context` (its Dockerfile unless `dockerfile`) into the store."""
        args = ["bud", "--isolation", "chroot", "--network", "host", "--pull=never",
                "--format", "docker", f"--signature-policy={self.policy_path}",
                "--tag", tag]
        if dockerfile is not None:
            args += ["--file", str(dockerfile)]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        return self.buildah(*args, str(context), timeout=timeout)

    def image_config(self, ref: str) -> dict[str, Any]:
        """The image's config as the docker format stores it (User, Cmd, Healthcheck...)."""
        info = json.loads(self.podman("image", "inspect", ref).stdout)[0]
        return dict(info.get("Config") or {}) | {"Healthcheck": info.get("Healthcheck")}

    @contextlib.contextmanager
    def mounted_image(self, ref: str) -> Iterator[Path]:
        """The image's root file system, mounted for the duration (to read files)."""
        path = Path(self.podman("image", "mount", ref).stdout.strip())
        try:
            yield path
        finally:
            self.podman("image", "unmount", ref, check=False)

    # -- containers --------------------------------------------------------------------

    def run(self, image: str, name: str, *, env: Mapping[str, str] | None = None,
            volumes: Sequence[str] = (), extra: Sequence[str] = ()) -> str:
        """`podman run -d` on the host's network; returns the container id."""
        _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        args = ["run", "--detach", "--name", name, "--network", "host",
                "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={NPROC}:{NPROC}",
                "--health-interval", "disable"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        return self.podman(*args, *extra, image, timeout=120).stdout.strip()

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.podman("container", "inspect", name).stdout)[0])

    def exec(self, name: str, *argv: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", name, *argv, check=check)

    def remove(self, name: str, timeout: int = 10) -> None:
        """Stop (SIGTERM, then SIGKILL after `timeout`) and remove a container."""
        self.podman("stop", "--time", str(timeout), name, check=False, timeout=timeout + 60)
        self.podman("rm", "--force", name, check=False)

    def logs(self, name: str) -> str:
        result = self.podman("logs", name, check=False)
        return result.stdout + result.stderr


__all__ = ["ImageEngine", "pip_home"]
