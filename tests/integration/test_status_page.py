"""The status page at `/` of --admin-listen, in a real headless Chromium (Debian's, driven
by Playwright): after skopeo pulls some images through docxy (some twice, so that there
are hits and misses), the page renders with no request to any other host and no script
error, its numbers are what /metrics (and /ready, `docxy cache ls`) say at that moment, its
plots are drawn, and it refreshes itself.  Full-page screenshots go to the test artefacts
($DOCXY_TEST_ARTIFACTS, or test-artifacts/ in the checkout).  A missing chromium or
playwright fails the test: `bash tests/run` installs both."""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness.clients import Skopeo
from harness.daemon import Docxy, mirror_args
from harness.procs import free_port, poll_until
from harness.upstream import Upstream
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]


def artifacts() -> Path:
    path = Path(os.environ.get("DOCXY_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _scrape(admin: str) -> dict:
    """/metrics of the admin listener: {(sample name, sorted labels): value}."""
    text = _get(f"{admin}/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sum(scraped: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and wanted <= set(ls))


def _compared(scraped: dict) -> dict:
    """What the page shows that /metrics exports, computed from a scrape."""
    hits = _sum(scraped, "docxy_cache_hits_total")
    misses = _sum(scraped, "docxy_cache_misses_total")
    return {
        "hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses),
        "used": _sum(scraped, "docxy_cache_size_bytes"),
        "bytes_cache": _sum(scraped, "docxy_sent_bytes_total", source="cache"),
        "bytes_upstream": _sum(scraped, "docxy_sent_bytes_total", source="upstream"),
        "in_flight": _sum(scraped, "docxy_upstream_fetches_in_flight"),
    }


def _pulls_by_repository(admin: str) -> dict[str, int]:
    """`docxy cache ls`'s pulls summed per repository (each image counted once)."""
    rows = json.loads(_get(f"{admin}/api/v1/cache"))["images"]
    images = {(r["registry"], r["repository"], r["digest"]): r["pulls"] for r in rows}
    totals: dict[str, int] = {}
    for (registry, repository, _), pulls in images.items():
        totals[f"{registry}/{repository}"] = totals.get(f"{registry}/{repository}", 0) + pulls
    return totals


@pytest.fixture
def up(short_tmp):
    upstream = Upstream.start(short_tmp / "up", large_layer_size=4 << 20)
    yield upstream
    upstream.stop()


@pytest.mark.timeout(300)
def test_status_page_in_chromium_shows_what_metrics_says(up, short_tmp):
    """The page renders in headless Chromium from docxy alone, with the numbers of /metrics."""
    from playwright.sync_api import (
        sync_playwright,  # missing: the test fails, never skips
    )

    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: bash tests/run installs it"
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    args = mirror_args(up, "--admin-listen", f"tcp:{port}:interface=127.0.0.1")
    with Docxy(short_tmp / "docxy", args) as docxy, \
            Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
        images = up.images
        # alpine three times, the manifest list twice (its amd64 image is part of each of
        # its pulls, not a pull of its own), org/app once
        for image, times in ((images.alpine, 3), (images.multiarch, 2), (images.namespaced, 1)):
            for _ in range(times):
                skopeo.copy(f"{docxy.host}/{image.ref}")

        def settled():
            # a request is counted when its last byte is written: wait for two equal scrapes
            first = _compared(_scrape(admin))
            time.sleep(0.3)
            return first if first == _compared(_scrape(admin)) else None

        expected = poll_until(settled, timeout=20, interval=0.2)
        assert expected["hits"] > 0 and expected["misses"] > 0
        assert expected["bytes_cache"] > 0 and expected["bytes_upstream"] > 0

        requests: list[str] = []
        problems: list[str] = []
        started = time.monotonic()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(short_tmp / "chromium-profile"), executable_path=CHROMIUM,
                headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
            try:
                browser.on("request", lambda r: requests.append(r.url))
                page = browser.new_page()
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(f"{admin}/")
                # selectors, not script: the page's policy forbids eval
                page.wait_for_selector("body[data-rendered]", state="attached", timeout=20_000)
                page.screenshot(path=str(artifacts() / "status-page.png"), full_page=True)
                shown = {name: page.get_attribute(f"#{element}", "data-value") for name, element in
                         (("hits", "hits"), ("misses", "misses"), ("hit_ratio", "hit-ratio"),
                          ("used", "cache-used"), ("bytes_cache", "bytes-cache"),
                          ("bytes_upstream", "bytes-upstream"), ("in_flight", "in-flight"))}
                ratio_text = page.inner_text("#hit-ratio")
                top = [(row.get_attribute("data-repository"), row.get_attribute("data-pulls"))
                       for row in page.locator("#top tr").all()]
                upstreams = {row.get_attribute("data-upstream"): {
                    "ready": row.get_attribute("data-ready"), "up": row.get_attribute("data-up"),
                    "ratelimit": row.get_attribute("data-ratelimit")}
                    for row in page.locator("#upstreams tr").all()}
                ready_badge = page.get_attribute("#ready", "data-value")
                plots = {plot: page.locator(f"#{plot} path.l").count()
                         for plot in ("plot-ratio", "plot-bytes", "plot-used")}
                # what /metrics, /ready and `docxy cache ls` say at that moment
                scraped = _scrape(admin)
                ready = json.loads(_get(f"{docxy.plain_url}/ready"))
                pulls = _pulls_by_repository(admin)
                # it refreshes itself
                page.wait_for_selector('body[data-rendered="2"]', state="attached",
                                       timeout=20_000)
                page.set_viewport_size({"width": 420, "height": 900})
                page.screenshot(path=str(artifacts() / "status-page-narrow.png"), full_page=True)
            finally:
                browser.close()
        browser_seconds = time.monotonic() - started

    assert _compared(scraped) == expected  # nothing moved while the page was read
    assert {k: float(v) for k, v in shown.items()} == pytest.approx(expected)
    assert ratio_text == f"{100 * expected['hit_ratio']:.1f} %"

    assert top, "no repository listed"
    best = max(pulls.items(), key=lambda kv: kv[1])
    assert top[0] == (best[0], str(best[1]))
    assert top[0] == ("docker.io/library/alpine", "3")
    assert ("docker.io/library/multiarch", "2") in top
    assert dict(top) == {repo: str(n) for repo, n in pulls.items() if n}

    assert set(upstreams) == set(ready["upstreams"]) == {"docker.io"}
    for name, row in upstreams.items():
        assert row["ready"] == str(ready["upstreams"][name]["ok"]).lower() == "true"
        assert row["up"] == ("true" if scraped[("docxy_upstream_up", (("registry", name),))]
                             else "false")
        remaining = scraped.get(("docxy_upstream_ratelimit_remaining", (("registry", name),)))
        assert row["ratelimit"] == ("" if remaining is None else str(int(remaining)))
        assert row["ratelimit"] == "99"  # the front's ratelimit-remaining on manifests
    assert ready_badge == "true"

    assert all(count > 0 for count in plots.values()), plots
    assert not problems, problems
    hosts = {urlsplit(url).netloc for url in requests if not url.startswith("data:")}
    assert hosts == {f"127.0.0.1:{port}"}, requests
    assert f"{admin}/api/v1/status" in requests
    print(f"chromium: {browser_seconds:.1f} s from launch to the second render")
