"""Where docxy spends a cold pull on the path users have: py-spy samples of the daemon while
curl pulls one large blob through it from the suite's Hub-like upstream (TLS registry with
token auth, 307 to a TLS CDN), with the cache on and with --no-cache.

    python bench/profile.py                     # 512 MiB, both modes, ~2 min
    python bench/profile.py --size-mb 1024 --modes cache --top 25

Prints, per mode, the pull's speed and the hottest frames per thread: `self` (where the
samples were) and `inclusive` (what they were under), as shares of that thread's samples,
idle samples included (a thread waiting in epoll or on its queue is idle). The raw py-spy
output (collapsed stacks) is kept in the work directory with --keep-workdir.
Needs `py-spy` (pip install py-spy) and the suite's Debian packages (docker-registry, nginx).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# Profile the checkout's docxy (harness.daemon puts it on PYTHONPATH), as the other scripts do.
os.environ.setdefault("DOCXY_TEST_CHECKOUT", "1")

from harness.daemon import Docxy, mirror_args  # noqa: E402
from harness.upstream import Upstream  # noqa: E402


def _pull(docxy: Docxy, digest: str) -> str:
    query = "scope=repository:library/large:pull"
    with urllib.request.urlopen(f"{docxy.url}/auth/token?{query}", timeout=30) as r:
        token = json.loads(r.read())["token"]
    result = subprocess.run(
        ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w",
         "%{http_code} %{size_download} %{speed_download}",
         "-H", f"Authorization: Bearer {token}",
         f"{docxy.url}/v2/library/large/blobs/{digest}"],
        capture_output=True, text=True, timeout=600)
    status, size, speed = result.stdout.split()
    return f"status {status}, {int(size)} bytes, {float(speed) / 1e6:.0f} MB/s"


def _summarise(raw: Path, top: int) -> str:
    """Per thread: the hottest self and inclusive frames, as shares of its samples."""
    threads: dict[str, tuple[Counter, Counter, list[int]]] = defaultdict(
        lambda: (Counter(), Counter(), [0]))
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        own, under, total = threads[frames[0]]
        n = int(count)
        total[0] += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            under[frame] += n
    out = []
    for thread, (own, under, total) in sorted(threads.items(), key=lambda t: -t[1][2][0]):
        out.append(f"  {thread} ({total[0]} samples)")
        for label, counter in (("self", own), ("inclusive", under)):
            out.append(f"    {label}:")
            for frame, n in counter.most_common(top):
                out.append(f"      {100 * n / total[0]:5.1f}%  {frame}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512, help="the blob, MiB (default 512)")
    parser.add_argument("--modes", default="cache,nocache", help="cache,nocache or one of them")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12, help="frames shown per list")
    parser.add_argument("--layer-cache", default=None,
                        help="where the large layer is built and kept between runs")
    parser.add_argument("--native", action="store_true",
                        help="sample C frames too (libc, OpenSSL): where the kernel and crypto time is")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="docxy-bench-profile-"))
    layers = Path(args.layer_cache) if args.layer_cache else work / "layers"
    up = Upstream.start(work / "up", large_layer_size=args.size_mb << 20, cache_dir=layers)
    try:
        blob = max(up.images.large.blobs, key=lambda b: b.size)
        for mode in args.modes.split(","):
            extra = ["--no-cache"] if mode == "nocache" else []
            with Docxy(work / f"docxy-{mode}", mirror_args(up, *extra)) as docxy:
                raw = work / f"{mode}.txt"
                spy = subprocess.Popen(
                    ["py-spy", "record", "-p", str(docxy.process.pid), "-o", str(raw),
                     "-f", "raw", "-r", str(args.rate), "--idle", "--threads",
                     *(["--native"] if args.native else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
                outcome = _pull(docxy, blob.digest)
                spy.send_signal(2)
                spy.wait(60)
                print(f"{mode}: {outcome}")
                print(_summarise(raw, args.top), flush=True)
    finally:
        up.stop()
        if not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
