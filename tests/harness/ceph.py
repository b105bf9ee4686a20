"""A real Ceph RGW (S3) for the tests: one monitor, one bluestore OSD on a sparse file and
radosgw (beast), cephx off, pools of size 1, all on 127.0.0.1 under one scratch directory.
Every daemon runs in the foreground as a child of the test process (see /work/shared/CLUSTER.md).

`Rgw.stop_gateway()` / `start_gateway()` stop and restart only radosgw, on the same port:
"the bucket is unreachable" without losing the data.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from harness.procs import ManagedProcess, free_port, wait_for_port_closed

START_TIMEOUT = 60.0
OSD_BLOCK_SIZE = 20 << 30  # sparse: only written blocks take disk space

_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon data avail crit = 1
mon data avail warn = 2
mon warn on pool no redundancy = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
keyring = {d}/keyring
mon_max_pg_per_osd = 1000

[mon]
mon data = {d}/mon/$cluster-$id
paxos propose interval = 0.05
paxos min wait = 0.01

[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = bluestore
bluestore block path = {d}/osd-block-$id
bluestore block create = true
bluestore block size = {block_size}
bluestore fsck on mount = false
osd max object name len = 460
osd max object namespace len = 64
bluestore cache size = 134217728

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {d}/rgw
rgw dns name = 127.0.0.1
rgw enable usage log = false
rgw enable lc threads = false
rgw gc obj min wait = 10
rgw gc processor period = 10
"""


class CephStartError(RuntimeError):
    pass


class Rgw:
    """A running Ceph RGW with one S3 user; `endpoint` is "http://127.0.0.1:PORT"."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.mon_port = free_port()
        self.port = free_port()
        while self.port == self.mon_port:
            self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "DOCXYTEST" + uuid.uuid4().hex[:11].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.conf = self.workdir / "ceph.conf"
        d = self.workdir
        self.mon = ManagedProcess("ceph-mon", self._argv("ceph-mon", "-i", "a", "-f"),
                                  d / "log" / "ceph-mon.out", cwd=d)
        self.osd = ManagedProcess("ceph-osd", self._argv("ceph-osd", "-i", "0", "-f"),
                                  d / "log" / "ceph-osd.out", cwd=d)
        self.gateway = ManagedProcess("radosgw", self._argv("radosgw", "-n", "client.rgw", "-f"),
                                      d / "log" / "radosgw.out", cwd=d)
        self._stopped = False

    # --- public API -------------------------------------------------------------------
    @classmethod
    def start(cls, workdir: Path, timeout: float = START_TIMEOUT) -> "Rgw":
        """Up and answering S3 with its user created; raises with the daemons' log tail."""
        for tool in ("ceph-mon", "ceph-osd", "radosgw", "ceph", "monmaptool", "radosgw-admin"):
            if subprocess.run(["which", tool], capture_output=True).returncode != 0:
                raise RuntimeError(f"{tool} is not installed (apt-get install --no-install-"
                                   "recommends ceph-mon ceph-osd radosgw ceph-common)")
        rgw = cls(workdir)
        try:
            rgw._bootstrap(time.monotonic() + timeout)
        except BaseException as e:
            tail = rgw.log_tail()
            rgw.stop()
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CephStartError(f"Ceph RGW did not start: {e}\n{tail}") from e
        return rgw

    def stop_gateway(self) -> None:
        """Stop radosgw only (the monitor and OSD keep the data); idempotent."""
        if self.gateway.running():
            self.gateway.stop()
            wait_for_port_closed("127.0.0.1", self.port)
        else:
            self.gateway.stop()

    def start_gateway(self, timeout: float = START_TIMEOUT) -> None:
        """Start radosgw again on the same port and wait until it answers."""
        if self.gateway.running():
            return
        self.gateway.start()
        try:
            self._wait_http(time.monotonic() + timeout)
        except BaseException as e:
            raise CephStartError(f"radosgw did not come back: {e}\n{self.log_tail()}") from e

    def stop(self) -> None:
        """Stop every daemon (gateway, OSD, monitor); idempotent."""
        for proc in (self.gateway, self.osd, self.mon):
            proc.stop(timeout=10)
        self._stopped = True

    def credentials_file(self, path: Path) -> Path:
        """Write "access_key:secret_key" to `path` (mode 0600) and return it."""
        path = Path(path)
        path.write_text(f"{self.access_key}:{self.secret_key}\n")
        path.chmod(0o600)
        return path

    def log_tail(self, lines: int = 25) -> str:
        """The end of each daemon's log, for failure messages."""
        parts = []
        for name in ("ceph-mon.a", "ceph-osd.0", "client.rgw"):
            p = self.workdir / "log" / f"{name}.log"
            try:
                text = p.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {p.name}\n" + "\n".join(text))
        for proc in (self.mon, self.osd, self.gateway):
            tail = proc.log_tail(lines)
            if tail:
                parts.append(f"--- {proc.log_path.name}\n{tail}")
        return "\n".join(parts)

    def __enter__(self) -> "Rgw":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- start-up ---------------------------------------------------------------------
    def _argv(self, tool: str, *args: str) -> list[str]:
        return [tool, "-c", str(self.conf), *args]

    def _run(self, *argv: str, timeout: float = 30.0) -> str:
        result = subprocess.run(self._argv(*argv), capture_output=True, text=True,
                                timeout=timeout, cwd=self.workdir)
        if result.returncode != 0:
            raise CephStartError(f"{' '.join(argv)} failed ({result.returncode}): "
                                 f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result.stdout

    def _bootstrap(self, deadline: float) -> None:
        d = self.workdir
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(_CONF.format(fsid=fsid, mon_port=self.mon_port, rgw_port=self.port,
                                          d=d, block_size=OSD_BLOCK_SIZE))
        monmap = d / "monmap"
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                        f"[v2:127.0.0.1:{self.mon_port}]", str(monmap)],
                       check=True, capture_output=True, timeout=30)
        self._run("ceph-mon", "-i", "a", "--mkfs", "--monmap", str(monmap))
        self.mon.start()
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph_until(deadline, "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephStartError(f"ceph osd new gave id {osd_id!r}, expected 0")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=60)
        self.osd.start()
        while "osd.0 up" not in self._ceph_until(deadline, "osd", "dump"):
            self._check_alive(self.mon, self.osd)
            self._sleep(deadline, 0.1, "osd.0 to be up")
        self.gateway.start()
        self._wait_http(deadline)
        self._run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                  f"--access-key={self.access_key}", f"--secret-key={self.secret_key}")

    def _ceph_until(self, deadline: float, *args: str) -> str:
        """`ceph ARGS` retried until it succeeds (the monitor may still be forming)."""
        while True:
            self._check_alive(self.mon)
            left = max(1.0, deadline - time.monotonic())
            try:
                return self._run("ceph", "--connect-timeout", str(int(min(left, 10)) or 1),
                                 *args, timeout=min(left, 15) + 5)
            except (CephStartError, subprocess.TimeoutExpired) as e:
                last = e
            self._sleep(deadline, 0.1, f"`ceph {' '.join(args)}` ({last})")

    def _wait_http(self, deadline: float) -> None:
        while True:
            self._check_alive(self.gateway)
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError:
                return  # something answered HTTP: radosgw is serving
            except OSError:
                pass
            self._sleep(deadline, 0.05, f"radosgw to answer on {self.endpoint}")

    @staticmethod
    def _check_alive(*procs: ManagedProcess) -> None:
        for proc in procs:
            if not proc.running():
                raise CephStartError(f"{proc.name} exited with {proc.returncode}")

    @staticmethod
    def _sleep(deadline: float, seconds: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(seconds)
