"""Shared plumbing for the benchmarks in bench/ (not a benchmark itself).

Everything runs on 127.0.0.1; every process is started here and stopped in a `finally`
(ExitStack), also on Ctrl-C and SIGTERM. The processes themselves are run by the test
harness in tests/harness (ManagedProcess: own session, SIGTERM then SIGKILL of the group).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(REPO_DIR / "tests"))

from harness.daemon import Docxy  # noqa: E402
from harness.nginx import NginxProcess  # noqa: E402
from harness.procs import descendants_of, free_port  # noqa: E402
from harness.registry import ProxySettings, Registry, RegistrySettings  # noqa: E402

MB = 1_000_000  # all figures are in decimal megabytes (10^6 bytes)
MiB = 1 << 20
REPOSITORY = "bench/large"


# --- signals, work directory ------------------------------------------------------------

def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP behave like Ctrl-C: a KeyboardInterrupt, so every `finally` runs."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def workdir(keep: bool, prefix: str):
    """A scratch directory under $TMPDIR, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"work directory kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


# --- the blob -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BlobFile:
    path: Path
    size: int
    digest: str


def make_random_blob(path: Path, size: int, chunk: int = 4 * MiB) -> BlobFile:
    """Write `size` random bytes to `path`, hashing as we go (never all in memory)."""
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left:
            data = os.urandom(min(chunk, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return BlobFile(path, size, "sha256:" + h.hexdigest())


def push_blob(registry_url: str, repository: str, blob: BlobFile, timeout: float = 600) -> None:
    """Monolithic upload through the registry API: POST an upload session, then PUT the whole
    file with `?digest=`, streamed from disk in 1 MiB blocks."""
    u = urlsplit(registry_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout, blocksize=MiB)
    try:
        conn.request("POST", f"/v2/{repository}/blobs/uploads/", body=b"",
                     headers={"Content-Length": "0"})
        r = conn.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload POST answered {r.status}")
        location = r.getheader("Location")
        lu = urlsplit(location)
        path = lu.path + ("?" + lu.query if lu.query else "")
        sep = "&" if "?" in path else "?"
        with open(blob.path, "rb") as f:
            conn.request("PUT", f"{path}{sep}digest={blob.digest}", body=f,
                         headers={"Content-Length": str(blob.size),
                                  "Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            body = r.read()
        if r.status != 201:
            raise RuntimeError(f"upload PUT answered {r.status}: {body[:300]!r}")
        conn.request("HEAD", f"/v2/{repository}/blobs/{blob.digest}")
        r = conn.getresponse()
        r.read()
        if r.status != 200 or int(r.getheader("Content-Length", "-1")) != blob.size:
            raise RuntimeError(f"blob HEAD after push: {r.status} {r.getheaders()}")
    finally:
        conn.close()


def blob_path(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


# --- the processes --------------------------------------------------------------------------

def start_registry(stack: contextlib.ExitStack, work: Path, name: str,
                   proxy_remote: str | None = None) -> Registry:
    """A distribution registry on plain HTTP, no auth, no redirect; in proxy mode against
    `proxy_remote` when given. Its storage is `work/<name>-storage` (a fresh one for a cold
    proxy: the caller passes a new name)."""
    settings = RegistrySettings(
        storage_dir=work / f"{name}-storage",
        log_level="warn",
        proxy=ProxySettings(remoteurl=proxy_remote) if proxy_remote else None,
    )
    reg = Registry(settings, work, name=name)
    stack.callback(reg.stop)
    reg.start()
    return reg


# docxy_tree_hash() at every docxy start: more than one means the checkout changed mid-run
DOCXY_TREES_SEEN: set[str] = set()


def run_docxy(stack: contextlib.ExitStack, home: Path, argv: Iterable[str],
              tls: tuple[Path, Path] | None = None) -> Docxy:
    """Start `twistd docxy <argv>` in `home` (harness.daemon.Docxy: plain HTTP on a free
    port; with `tls` = (chain, key) also --tls on another). A start that fails on an import
    (the checkout's modules being moved by a colleague) is retried twice, a minute apart."""
    d = Docxy(home, list(argv), tls=tls)
    stack.callback(d.stop)
    DOCXY_TREES_SEEN.add(docxy_tree_hash())
    for attempt in range(3):
        try:
            return d.start()
        except RuntimeError as e:
            text = str(e)
            if attempt == 2 or not ("ImportError" in text or "ModuleNotFoundError" in text):
                raise
            print(f"docxy did not start (attempt {attempt + 1}), retrying in 60 s:\n"
                  f"{text[-600:]}", file=sys.stderr)
            time.sleep(60)
    raise AssertionError("unreachable")


def start_docxy(stack: contextlib.ExitStack, work: Path, upstream_url: str,
                extra: Iterable[str] = ()) -> Docxy:
    """docxy in front of a plain-HTTP registry (no library/ prefix)."""
    return run_docxy(stack, work / "docxy", ["--upstream", upstream_url, "--no-library", *extra])


NGINX_DEFAULTS_NOTE = (
    "nginx 'proxy_pass' with nginx's defaults: proxy_buffering on, proxy_buffers 8 x 4k/8k "
    "(one page), proxy_buffer_size one page, proxy_max_temp_file_size 1024m (a response "
    "the client cannot take fast enough is spooled to a temp file), proxy_http_version 1.0"
)


def start_nginx(stack: contextlib.ExitStack, work: Path, upstream_port: int,
                buffering: bool = True, name: str = "nginx") -> NginxProcess:
    """nginx reverse proxy to the upstream registry. With `buffering` every proxy_* setting is
    nginx's default; otherwise only `proxy_buffering off;` is added."""
    port = free_port()
    extra = "" if buffering else "proxy_buffering off;"
    body = f"""
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            {extra}
        }}
    }}
"""
    n = NginxProcess(name, work / name, port, body)
    stack.callback(n.stop)
    n.start()
    return n


def nginx_worker_pids(n: NginxProcess) -> list[int]:
    if n.process is None or n.process.pid is None:
        return []
    return descendants_of(n.process.pid)


# --- /proc ------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode("ascii", "replace").rsplit(")", 1)[-1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class RssSampler:
    """Samples the summed VmRSS of the pids `pids()` returns every `interval` seconds in a
    background thread; keeps the peak and the series."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.2) -> None:
        self._pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def sample(self) -> int:
        value = sum(rss_bytes(p) for p in self._pids())
        self.samples.append((time.monotonic() - self._t0, value))
        return value

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()

    @property
    def peak(self) -> int:
        return max((v for _, v in self.samples), default=0)


# --- reporting --------------------------------------------------------------------------

def _cmd_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    commit = checkout_commit()
    try:
        import twisted
        twisted_version = twisted.__version__
    except ImportError:  # pragma: no cover
        twisted_version = "?"
    try:
        from importlib.metadata import version
        docxy_version = version("docxy")
    except Exception:  # pragma: no cover
        docxy_version = "?"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_gb": round(mem / 1e9, 1),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "twisted": twisted_version,
        "docxy": f"{docxy_version} ({docxy_source()}; checkout at {commit}, docxy/ tree "
                 f"{docxy_tree_hash()})",
        "nginx": _cmd_version(["nginx", "-v"]),
        "docker_registry": _cmd_version(["docker-registry", "--version"]),
        "curl": _cmd_version(["curl", "--version"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# With --snapshot: the copy of the checkout's docxy/ (and its twistd plugin) that every docxy
# of this run imports; None when docxy runs from the checkout itself or the installed copy.
SNAPSHOT_DIR: Path | None = None


def use_docxy_from(installed: bool, snapshot: Path | None = None) -> None:
    """Which docxy the benchmark runs: the checkout (default: DOCXY_TEST_CHECKOUT=1, so
    harness.daemon puts the checkout on twistd's PYTHONPATH), with `snapshot` a copy of the
    checkout's docxy/ and twisted/plugins/docxy_plugin.py made into that directory now (put on
    PYTHONPATH, so every docxy of the run imports the same code while the checkout is being
    edited), or with `installed` the copy `pip install` put in site-packages. Every process
    started afterwards inherits it."""
    global SNAPSHOT_DIR
    os.environ.pop("DOCXY_TEST_CHECKOUT", None)
    if installed:
        return
    if snapshot is None:
        os.environ["DOCXY_TEST_CHECKOUT"] = "1"
        return
    shutil.copytree(REPO_DIR / "docxy", snapshot / "docxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (snapshot / "twisted" / "plugins").mkdir(parents=True)
    shutil.copy2(REPO_DIR / "twisted" / "plugins" / "docxy_plugin.py",
                 snapshot / "twisted" / "plugins" / "docxy_plugin.py")
    os.environ["PYTHONPATH"] = str(snapshot)
    SNAPSHOT_DIR = snapshot


def docxy_source() -> str:
    if os.environ.get("DOCXY_TEST_CHECKOUT"):
        return "run from the checkout"
    if SNAPSHOT_DIR is not None:
        return "run from a snapshot of the checkout's docxy/ taken when the benchmark started"
    return f"run from the installed copy, which {_installed_vs_checkout()}"


def checkout_commit() -> str:
    """The checkout's HEAD commit, read from .git's files (no git command is run)."""
    git = REPO_DIR / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:7]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:7]
    except (OSError, IndexError):
        pass
    return "?"


def docxy_tree_hash() -> str:
    """A short hash of every .py file under the docxy/ that docxy imports (the checkout's or
    the snapshot's; path and content): tells two runs of different code apart while the
    tree is being edited."""
    root = SNAPSHOT_DIR or REPO_DIR
    h = hashlib.sha256()
    for f in sorted((root / "docxy").rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _installed_vs_checkout() -> str:
    """Whether the docxy package that `twistd` imports without the checkout on its path
    equals the checkout's docxy/."""
    out = subprocess.run(
        [sys.executable, "-c", "import docxy, os; print(os.path.dirname(docxy.__file__))"],
        capture_output=True, text=True, cwd="/", timeout=30,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    installed = Path(out.stdout.strip() or "/nonexistent")
    checkout = REPO_DIR / "docxy"
    if not installed.exists():
        return "is missing"
    if installed.resolve() == checkout.resolve():
        return "is the checkout"
    a = {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*.py")}
    b = {p.relative_to(checkout): p.read_bytes() for p in checkout.rglob("*.py")}
    return "equals the checkout's docxy/" if a == b else "differs from the checkout's docxy/"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_results(name: str, data: dict, markdown: str, results_dir: Path) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    jpath = results_dir / f"{name}.json"
    mpath = results_dir / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def machine_markdown(info: dict) -> str:
    return (f"- date: {info['date']}\n"
            f"- machine: {info['host_cpu']}, {info['cpus']} CPUs, {info['mem_total_gb']} GB RAM, "
            f"{info['os']}, kernel {info['kernel']} (load average at start "
            f"{' '.join(info['loadavg_at_start'])})\n"
            f"- software: Python {info['python']}, Twisted {info['twisted']}, docxy "
            f"{info['docxy']}, {info['nginx']}, {info['docker_registry']}, "
            f"{info['curl'].split(' (')[0]}\n")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (also readable as plain text)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *[line(r) for r in rows]]) + "\n"


def established_to(pid: int, remote_port: int) -> int:
    """How many ESTABLISHED TCP connections process `pid` holds to 127.0.0.1:`remote_port`
    (read from /proc: the process's socket inodes matched against /proc/net/tcp)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    count = 0
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table_path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "01":
                continue
            if int(f[2].rsplit(":", 1)[1], 16) == remote_port and f[9] in inodes:
                count += 1
    return count


def curl_pull(url: str, timeout: float, headers: dict[str, str] | None = None,
              cacert: Path | None = None, follow: bool = False) -> dict:
    """One GET with curl (`--http1.1`, body to /dev/null); returns status, bytes, seconds
    (curl's time_total) and ttfb. `follow`: curl follows redirects itself (`-L`; curl sends
    a header given with -H, such as Authorization, only to the first host)."""
    argv = ["curl", "-sS", "--http1.1", "-o", "/dev/null", "--max-time", str(timeout),
            "-w", "%{http_code} %{size_download} %{time_total} %{time_starttransfer}"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    if cacert is not None:
        argv += ["--cacert", str(cacert)]
    if follow:
        argv.append("-L")
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    fields = out.stdout.split()
    if len(fields) != 4:
        return {"status": None, "ok": False, "error": f"curl rc={out.returncode} {out.stderr.strip()}"}
    code, size, total, ttfb = int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3])
    return {"status": code, "bytes": size, "seconds": total, "ttfb": ttfb,
            "curl_rc": out.returncode, "stderr": out.stderr.strip()}


def round_order(paths: list[str], i: int) -> list[str]:
    """Round i's order: rotated by i, reversed every other round, so that no path always
    runs first (or right after the same neighbour) on a noisy machine."""
    k = i % len(paths)
    order = paths[k:] + paths[:k]
    return order[::-1] if i % 2 else order


def spread(values: list[float], digits: int = 1) -> dict:
    """median, min, max and every value, rounded (None when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "all": []}
    return {"median": round(median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "all": [round(v, digits) for v in values]}


def fmt_spread(s: dict, unit: str = "") -> str:
    """'1234.5 (1100.0–1300.0)' for a spread() dict; '–' when empty."""
    if s.get("median") is None:
        return "–"
    return f"{s['median']}{unit} ({s['min']}–{s['max']})"


def extra_flags(results: dict) -> str:
    """The options of the run that its table's command line does not spell out otherwise:
    --snapshot or --installed, and --results-name when not the default."""
    out = ""
    if results.get("docxy_flags"):
        out += f" {results['docxy_flags']}"
    name = results.get("results_name")
    if name and name != results.get("benchmark"):
        out += f" --results-name {name}"
    return out


def add_common_options(p, name: str) -> None:
    """The options every benchmark has: where the results go, the scratch directory, and
    which docxy runs."""
    p.add_argument("--installed", action="store_true",
                   help="run the installed docxy (pip install) instead of the checkout's; by "
                        "default DOCXY_TEST_CHECKOUT=1 is set, so twistd imports the checkout")
    p.add_argument("--snapshot", action="store_true",
                   help="copy the checkout's docxy/ when the benchmark starts and run every "
                        "docxy from that copy: one code state for the whole run while the "
                        "checkout is being edited (the copy is removed at the end)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help=f"where {name}.json/.md go (default bench/results)")
    p.add_argument("--results-name", default=name,
                   help=f"base name of the results files (default {name})")
    p.add_argument("--no-results", action="store_true",
                   help="print only, write no results files")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the scratch directory (logs, configs, storage) afterwards")


def run_benchmark(args, run: Callable, render: Callable, passed: Callable) -> int:
    """The common main: run, print the table, write the results; exit 0 when the targets
    are met, 1 when not, 130 when interrupted (everything started is stopped either way)."""
    install_signal_handlers()
    snapshot = None
    try:
        if getattr(args, "snapshot", False) and not getattr(args, "installed", False):
            snapshot = Path(tempfile.mkdtemp(prefix="docxy-bench-snapshot-"))
        use_docxy_from(getattr(args, "installed", False), snapshot)
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
    if isinstance(results, dict):
        results["results_name"] = args.results_name
        results["docxy_flags"] = ("--installed" if getattr(args, "installed", False) else
                                  "--snapshot" if snapshot is not None else "")
        if len(DOCXY_TREES_SEEN) > 1:
            results["docxy_trees_seen"] = sorted(DOCXY_TREES_SEEN)
    md = render(results)
    if len(DOCXY_TREES_SEEN) > 1:
        md += (f"\n**Warning:** the checkout's docxy/ changed during the run (trees "
               f"{', '.join(sorted(DOCXY_TREES_SEEN))}): not all docxy pulls ran the same code.\n")
    print(md)
    if not args.no_results:
        j, m = write_results(args.results_name, results, md, args.results_dir)
        print(f"results: {j} {m}", file=sys.stderr)
    return 0 if passed(results) else 1
