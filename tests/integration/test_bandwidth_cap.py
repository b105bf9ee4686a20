"""A registry's bandwidth cap (`max_rate` in its table of the configuration file) against
the Hub-like upstream: two clients downloading at once share it, and together they get
the cap within 10 % over 30 s."""
from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from harness.daemon import Docxy, mirror_args

pytestmark = pytest.mark.integration

RATE = 5_000_000  # bytes per second: "5MB/s"


def _read(url: str, headers: dict, counts: list, index: int, stop: threading.Event) -> None:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        while not stop.is_set():
            chunk = response.read(256 * 1024)
            if not chunk:
                break
            counts[index] += len(chunk)


def test_two_downloads_share_the_registry_cap_within_ten_percent(upstream, tmp_path):
    """Two uncached downloads of the large layer at once: over 30 s (after 3 s to start)
    the bytes they get together are the cap's within 10 %."""
    config = tmp_path / "docxy.toml"
    config.write_text('[upstream."docker.io"]\nmax_rate = "5MB/s"\n')
    args = mirror_args(upstream, "--no-cache", "--config", str(config))
    layer = max(upstream.images.large.manifest.layers, key=lambda b: b.size)
    assert layer.size > RATE * 40, "the layer must outlast the measurement"
    with Docxy(tmp_path / "capped", args) as docxy:
        token = upstream.fetch_token(["repository:library/large:pull"])
        url = f"{docxy.url}/v2/large/blobs/{layer.digest}"
        counts, stop = [0, 0], threading.Event()
        threads = [threading.Thread(target=_read, args=(
            url, {"Authorization": f"Bearer {token}"}, counts, i, stop)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(3)
        start_bytes, started = sum(counts), time.monotonic()
        time.sleep(30)
        rate = (sum(counts) - start_bytes) / (time.monotonic() - started)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert abs(rate - RATE) < 0.1 * RATE, f"{rate / 1e6:.2f} MB/s under a cap of 5 MB/s"
    assert min(counts) > 0.25 * sum(counts), f"one download starved: {counts}"
