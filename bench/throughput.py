#!/usr/bin/env python3
"""Cold pull throughput of one large blob, side by side, on the path users have.

--upstream hub (default): the suite's Hub-like upstream (tests/harness/upstream.py: the
distribution registry behind an nginx TLS front, token auth, blob GETs answered 307 to an
nginx TLS "CDN" on another host name); the blob is the large layer of library/large.

  docxy          docxy with its cache on (the default), a fresh docxy with an empty
                 --cache-dir for every pull: cold; the pull counts only once docxy has
                 verified the digest and written the file into its cache
  docxy-nocache  docxy --no-cache: the streaming relay (one daemon for all pulls)
  nginx          nginx following the redirect itself with no cache: proxy_pass to the TLS
                 front with the upstream token in Authorization (set by nginx), the 307
                 intercepted (error_page 307 = @cdn) and the CDN URL proxied over TLS;
                 nginx's default buffering; a fresh nginx with a fresh token every pull
  nginx-nobuf    (only with --paths) the same with proxy_buffering off
  distproxy      the distribution registry in proxy mode (remoteurl = the TLS front, the
                 harness user's credentials, the harness CA trusted), restarted with empty
                 storage before every pull: cold
  direct         curl itself: token from the token service, GET from the front, -L to the
                 CDN: the machine's limit for one client

--upstream plain: the old path, a distribution registry on plain HTTP with no auth and no
redirect, a blob of random bytes pushed into it; the same paths (nginx = proxy_pass with
nginx's defaults, direct = the registry).

The client is `curl -sS --http1.1 -o /dev/null` (docxy's paths with a token from docxy's
/auth/token); a pull counts only if it answers 200 with exactly the blob's size. One
unmeasured warm-up round of every path first, then --repeat rounds, the order rotated every
round (and reversed every other one). Reported per path: MB/s (10^6 bytes/s) median and
min-max, CPU s/GB of the proxy process (nginx: its worker) and of the upstream, peak RSS,
upstream requests per pull; ratios of medians and of the pulls of one round (median,
min-max). Results go to bench/results/<--results-name>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import _common as c
import _hub as hub

ALL_PATHS = ("docxy", "docxy-nocache", "nginx", "nginx-nobuf", "distproxy", "direct")
DEFAULT_PATHS = "docxy,docxy-nocache,nginx,distproxy,direct"
# (numerator, denominator) of the speed ratios reported, when both paths ran
RATIOS = (("docxy", "nginx"), ("docxy", "distproxy"), ("docxy-nocache", "nginx"),
          ("docxy", "docxy-nocache"), ("docxy", "nginx-nobuf"), ("docxy", "direct"))
CPU_RATIOS = (("docxy", "nginx"), ("docxy-nocache", "nginx"), ("docxy", "distproxy"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", choices=("hub", "plain"), default="hub",
                   help="hub: TLS registry, token auth, 307 to a TLS CDN (default); plain: "
                        "a plain-HTTP registry without auth or redirect")
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB (default 512; hub: random bytes in the large "
                        "layer, a gzip'd tar a little larger)")
    p.add_argument("--repeat", type=int, default=5,
                   help="measured pulls per path, after one unmeasured warm-up round "
                        "(default 5)")
    p.add_argument("--paths", default=DEFAULT_PATHS,
                   help=f"comma-separated subset of {','.join(ALL_PATHS)} "
                        f"(default {DEFAULT_PATHS})")
    p.add_argument("--pull-timeout", type=float, default=300,
                   help="seconds one pull may take before curl gives up (default 300)")
    p.add_argument("--layer-cache", type=Path, default=None,
                   help="hub: build the large layer here and keep it for the next run "
                        "(default: in the scratch directory, removed afterwards)")
    c.add_common_options(p, "throughput")
    args = p.parse_args(argv)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in args.paths if x not in ALL_PATHS]
    if bad or not args.paths:
        p.error(f"unknown path(s) {bad}; choose from {ALL_PATHS}")
    if args.repeat < 1 or args.size_mb < 1:
        p.error("--repeat and --size-mb must be at least 1")
    return args


@dataclass
class Target:
    """One pull's client side and what to watch while it runs."""

    url: str
    pids: Callable[[], list[int]]            # the proxy's processes (CPU, RSS)
    headers: dict[str, str] = field(default_factory=dict)
    cacert: Path | None = None
    follow: bool = False
    # after the pull: extra facts, and a reason when the pull does not count
    check: Callable[[], tuple[dict, str | None]] = lambda: ({}, None)
    log: Callable[[], str] = lambda: ""      # the proxy's log, kept when a pull fails


# --- the Hub-like path ------------------------------------------------------------------

class HubPaths:
    """Every path against the Hub-like upstream."""

    name = "hub"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        self.work, self.args = work, args
        self.blob = hub.start_hub(stack, work, args.size_mb * c.MiB, args.layer_cache)
        self.up = self.blob.up
        self.size = self.blob.size
        self.nocache = None
        if "docxy-nocache" in args.paths:
            self.nocache = hub.start_docxy(stack, work / "docxy-nocache", self.up, "--no-cache")

    def upstream_pids(self) -> list[int]:
        return hub.upstream_pids(self.up)

    def marks(self):
        return hub.log_marks(self.up)

    def traffic(self, marks) -> dict:
        t = hub.traffic_since(self.up, self.blob, marks)
        return {"front_blob_gets": t["front_blob_gets"], "front_blob_heads": t["front_blob_heads"],
                "cdn_blob_gets": t["cdn_blob_gets"], "upstream_bytes_ratio": t["bytes_ratio"],
                "front_by_method": t["front_by_method"]}

    @contextlib.contextmanager
    def target(self, name: str, i: int) -> Iterator[Target]:
        up, blob = self.up, self.blob
        with contextlib.ExitStack() as pull:
            if name == "docxy":
                home = self.work / f"docxy-{i}"
                pull.callback(shutil.rmtree, home, ignore_errors=True)
                d = hub.start_docxy(pull, home, up)
                cached = hub.cache_file(home / "cache", blob.digest)
                yield Target(d.url + blob.path, lambda: [d.process.pid],
                             hub.bearer(hub.docxy_token(d, up)),
                             check=lambda: cache_written(cached, self.size), log=d.log)
            elif name == "docxy-nocache":
                d = self.nocache
                mark = len(d.log())
                yield Target(d.url + blob.path, lambda: [d.process.pid],
                             hub.bearer(hub.docxy_token(d, up)), log=lambda: d.log()[mark:])
            elif name in ("nginx", "nginx-nobuf"):
                pull.callback(shutil.rmtree, self.work / f"{name}-{i}", ignore_errors=True)
                n = hub.start_nginx_follow(pull, self.work, up, buffering=name == "nginx",
                                           name=f"{name}-{i}")
                yield Target(f"http://127.0.0.1:{n.port}{blob.path}",
                             lambda: c.nginx_worker_pids(n))
            elif name == "distproxy":
                pull.callback(shutil.rmtree, self.work / f"distproxy-{i}-storage",
                              ignore_errors=True)
                reg = hub.start_distproxy(pull, self.work, up, f"distproxy-{i}")
                yield Target(reg.url + blob.path, lambda: [reg.process.pid])
            elif name == "direct":
                yield Target(up.registry_url + blob.path, lambda: [],
                             hub.bearer(hub.upstream_token(up)), cacert=up.ca_path,
                             follow=True)
            else:
                raise ValueError(name)

    def describe(self) -> str:
        return (f"**path: hub** — the suite's Hub-like upstream: distribution behind an nginx "
                f"TLS front, token auth, blob GETs answered 307 to an nginx TLS CDN (host "
                f"`localhost`, another origin); the blob is the large layer of "
                f"`{hub.REPOSITORY}`")


def cache_written(path: Path, size: int, timeout: float = 30.0) -> tuple[dict, str | None]:
    """Wait until docxy's cache file is in place (docxy moves it there once the digest is
    verified); the pull counts only then."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.stat().st_size == size:
            return {"cache_file_after_s": round(time.monotonic() - t0, 2)}, None
        time.sleep(0.05)
    return {"cache_file_after_s": None}, f"no verified cache file {path} after {timeout:.0f}s"


# --- the plain-HTTP path ----------------------------------------------------------------

class PlainPaths:
    """Every path against a plain-HTTP registry without auth or redirect (the old path)."""

    name = "plain"

    def __init__(self, stack: contextlib.ExitStack, work: Path, args) -> None:
        self.work, self.args = work, args
        t = time.monotonic()
        self.size = args.size_mb * c.MiB
        blob = c.make_random_blob(work / "blob.bin", self.size)
        self.registry = c.start_registry(stack, work, "upstream")
        c.push_blob(self.registry.url, c.REPOSITORY, blob)
        blob.path.unlink()  # the registry has its own copy
        self.digest = blob.digest
        self.path = c.blob_path(c.REPOSITORY, blob.digest)
        print(f"plain upstream {self.registry.url} with {blob.digest} ({self.size} bytes) in "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr)
        self.persistent: dict[str, tuple[str, Callable[[], list[int]]]] = {}
        if "docxy-nocache" in args.paths:
            d = c.start_docxy(stack, work / "docxy-nocache", self.registry.url, ["--no-cache"])
            self.persistent["docxy-nocache"] = (d.url, lambda: [d.process.pid])
        for name in ("nginx", "nginx-nobuf"):
            if name in args.paths:
                n = c.start_nginx(stack, work, self.registry.port, buffering=name == "nginx",
                                  name=name)
                self.persistent[name] = (f"http://127.0.0.1:{n.port}",
                                         lambda n=n: c.nginx_worker_pids(n))
        self.persistent["direct"] = (self.registry.url, lambda: [])
        warm = c.curl_pull(self.registry.url + self.path, args.pull_timeout)
        if warm.get("status") != 200 or warm.get("bytes") != self.size:
            raise RuntimeError(f"warm-up pull from the upstream failed: {warm}")

    def upstream_pids(self) -> list[int]:
        return [self.registry.process.pid]

    def marks(self):
        return self._blob_gets()

    def _blob_gets(self) -> int:
        try:
            text = self.registry.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return text.count(f'"GET /v2/{c.REPOSITORY}/blobs/')

    def traffic(self, marks) -> dict:
        return {"upstream_blob_gets": self._blob_gets() - marks}

    @contextlib.contextmanager
    def target(self, name: str, i: int) -> Iterator[Target]:
        with contextlib.ExitStack() as pull:
            if name == "docxy":
                home = self.work / f"docxy-{i}"
                pull.callback(shutil.rmtree, home, ignore_errors=True)
                d = c.start_docxy(pull, home, self.registry.url,
                                  ["--cache-dir", str(home / "cache")])
                cached = hub.cache_file(home / "cache", self.digest)
                yield Target(d.url + self.path, lambda: [d.process.pid],
                             check=lambda: cache_written(cached, self.size), log=d.log)
            elif name == "distproxy":
                pull.callback(shutil.rmtree, self.work / f"distproxy-{i}-storage",
                              ignore_errors=True)
                reg = c.start_registry(pull, self.work, f"distproxy-{i}",
                                       proxy_remote=self.registry.url)
                yield Target(reg.url + self.path, lambda: [reg.process.pid])
            else:
                base, pids = self.persistent[name]
                yield Target(base + self.path, pids)

    def describe(self) -> str:
        return ("**path: plain** — a distribution registry on plain HTTP, no auth, no "
                "redirect (not what users have: no TLS, no CDN hop); the blob is random bytes "
                f"pushed into `{c.REPOSITORY}`; nginx = `proxy_pass` with nginx's defaults")


# --- the run ----------------------------------------------------------------------------

def pull_once(paths, name: str, i: int, timeout: float) -> dict:
    with paths.target(name, i) as t:
        marks = paths.marks()
        watched = [*t.pids(), *paths.upstream_pids()]
        cpu_before = {p: c.cpu_seconds(p) for p in watched}
        with c.RssSampler(t.pids, 0.05) as sampler:
            r = c.curl_pull(t.url, timeout, headers=t.headers, cacert=t.cacert,
                            follow=t.follow)
            extra, problem = t.check() if r.get("status") == 200 else ({}, None)
        cpu = {p: c.cpu_seconds(p) - v for p, v in cpu_before.items()}
        proxy_pids = set(t.pids())
        ok = r.get("status") == 200 and r.get("bytes") == paths.size and problem is None
        log_tail = "" if ok else t.log()[-4000:]
    hub.wait_for_logs(0.5)
    gb = paths.size / 1e9
    return {
        "round": i, "path": name, "ok": ok, "problem": problem, **r, **extra,
        **({"proxy_log_tail": log_tail} if log_tail else {}),
        "mb_per_s": round(r["bytes"] / r["seconds"] / c.MB, 1) if ok else None,
        "proxy_cpu_s": round(sum(v for p, v in cpu.items() if p in proxy_pids), 3),
        "proxy_cpu_s_per_gb": round(sum(v for p, v in cpu.items() if p in proxy_pids) / gb, 3),
        "upstream_cpu_s_per_gb": round(sum(v for p, v in cpu.items() if p not in proxy_pids)
                                       / gb, 3),
        "proxy_peak_rss": sampler.peak,
        **paths.traffic(marks),
    }


def run(args) -> dict:
    info = c.machine_info()
    results: dict = {"benchmark": "throughput", "machine": info, "upstream": args.upstream,
                     "repeat": args.repeat, "paths": args.paths, "pulls": [],
                     "warmup_pulls": [], "size_mib": args.size_mb,
                     "nginx_note": hub.NGINX_FOLLOW_NOTE if args.upstream == "hub"
                     else c.NGINX_DEFAULTS_NOTE,
                     "client": "curl -sS --http1.1 -o /dev/null (body discarded)"}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-throughput-"))
        print(f"work directory {work}", file=sys.stderr)
        paths = (HubPaths if args.upstream == "hub" else PlainPaths)(stack, work, args)
        results["blob_bytes"] = paths.size
        results["path_description"] = paths.describe()
        for i in range(args.repeat + 1):  # round 0 is the unmeasured warm-up
            for name in c.round_order(args.paths, i):
                rec = pull_once(paths, name, i, args.pull_timeout)
                (results["pulls"] if i else results["warmup_pulls"]).append(rec)
                label = f"round {i}/{args.repeat}" if i else "warm-up    "
                shown = (f"{rec['mb_per_s']:8.1f} MB/s" if rec["ok"]
                         else f"FAILED {rec.get('problem') or rec}")
                print(f"{label}  {name:13s} {shown}  ({rec.get('seconds', 0):.2f}s, proxy cpu "
                      f"{rec['proxy_cpu_s']:.2f}s, peak rss {rec['proxy_peak_rss'] / c.MB:.0f} "
                      f"MB)", file=sys.stderr)
    summarize(results)
    return results


def summarize(results: dict) -> None:
    summary = {}
    for name in results["paths"]:
        pulls = [p for p in results["pulls"] if p["path"] == name]
        good = [p for p in pulls if p["ok"]]
        s = {"pulls": len(pulls), "failed": len(pulls) - len(good),
             "mb_per_s": c.spread([p["mb_per_s"] for p in good]),
             "proxy_cpu_s_per_gb": c.spread([p["proxy_cpu_s_per_gb"] for p in good], 2),
             "upstream_cpu_s_per_gb": c.spread([p["upstream_cpu_s_per_gb"] for p in good], 2),
             "proxy_peak_rss_mb": round(max((p["proxy_peak_rss"] for p in good), default=0)
                                        / c.MB, 1)}
        for key in ("front_blob_gets", "cdn_blob_gets", "upstream_bytes_ratio",
                    "upstream_blob_gets"):
            values = [p[key] for p in good if key in p]
            if values:
                s[key] = max(values)
        summary[name] = s
    results["summary"] = summary
    ratios = {}
    for a, b in RATIOS:
        ratio = speed_ratio(results, a, b)
        if ratio:
            ratios[f"{a}/{b}"] = ratio
    results["ratios"] = ratios
    cpu = {}
    for a, b in CPU_RATIOS:
        x = summary.get(a, {}).get("proxy_cpu_s_per_gb", {}).get("median")
        y = summary.get(b, {}).get("proxy_cpu_s_per_gb", {}).get("median")
        if x and y:
            cpu[f"{a} CPU/GB ÷ {b} CPU/GB"] = round(x / y, 2)
    results["cpu_ratios"] = cpu


def speed_ratio(results: dict, a: str, b: str) -> dict | None:
    """a/b: the ratio of the medians, and the ratios of the two pulls of each round (side by
    side in time) as median and min–max."""
    s = results["summary"]
    ma, mb = s.get(a, {}).get("mb_per_s", {}).get("median"), \
        s.get(b, {}).get("mb_per_s", {}).get("median")
    if not (ma and mb):
        return None
    speed = {(p["round"], p["path"]): p["mb_per_s"] for p in results["pulls"] if p["ok"]}
    per_round = [speed[i, a] / speed[i, b] for i in range(1, results["repeat"] + 1)
                 if (i, a) in speed and (i, b) in speed]
    return {"of_medians": round(ma / mb, 3), "per_round": c.spread(per_round, 3)}


def render(results: dict) -> str:
    rows = []
    for name, s in results["summary"].items():
        proxied = name != "direct"
        if results["upstream"] == "hub":
            gets = f"{s.get('front_blob_gets', '–')} / {s.get('cdn_blob_gets', '–')}"
        else:
            gets = str(s.get("upstream_blob_gets", "–"))
        rows.append([
            name,
            str(s["mb_per_s"]["median"]) if s["mb_per_s"]["median"] else "FAILED",
            f"{s['mb_per_s']['min']}–{s['mb_per_s']['max']}" if s["mb_per_s"]["median"] else "",
            ", ".join(str(x) for x in s["mb_per_s"]["all"]),
            c.fmt_spread(s["proxy_cpu_s_per_gb"]) if proxied else "–",
            str(s["upstream_cpu_s_per_gb"]["median"]),
            str(s["proxy_peak_rss_mb"]) if proxied else "–",
            gets,
            f"{s['failed']}/{s['pulls']}",
        ])
    gets_header = ("upstream blob GETs/pull (front / CDN)" if results["upstream"] == "hub"
                   else "upstream blob GETs/pull")
    t = c.table(["path", "MB/s median", "min–max", "every pull (MB/s)",
                 "proxy CPU s/GB median (min–max)", "upstream CPU s/GB", "proxy peak RSS MB",
                 gets_header, "failed"], rows)
    r_rows = [[k, f"{v['of_medians']:.3f}", c.fmt_spread(v["per_round"])]
              for k, v in results["ratios"].items()]
    r_rows += [[k, f"{v:.2f}", ""] for k, v in results["cpu_ratios"].items()]
    r = c.table(["ratio", "of the medians", "per round: median (min–max)"], r_rows)
    size_mib = results["size_mib"]
    wrapped = " in a gzip'd tar" if results["upstream"] == "hub" else ""
    command = (f"python bench/throughput.py --upstream {results['upstream']} --size-mb "
               f"{size_mib} --repeat {results['repeat']} --paths {','.join(results['paths'])}"
               + c.extra_flags(results))
    return (f"# Cold blob pull throughput ({results['upstream']} path)\n\n"
            f"Command: `{command}`\n\n"
            f"- {results['path_description']}\n"
            f"{c.machine_markdown(results['machine'])}"
            f"- blob: {results['blob_bytes']} bytes ({size_mib} MiB of random data"
            f"{wrapped}); one unmeasured "
            f"warm-up round, then {results['repeat']} pulls per path, order rotated every "
            f"round; every pull cold (docxy: a fresh daemon and cache directory, the cache file "
            f"written and verified before the pull counts; distproxy: fresh storage)\n"
            f"- client: {results['client']}; MB = 10^6 bytes; CPU = user+system of the proxy "
            f"process (nginx: its worker) during the pull, per GB delivered; upstream CPU = "
            f"the registry and the front's and CDN's nginx workers\n"
            f"- nginx: {results['nginx_note']}\n"
            f"- distproxy: docker-registry in proxy mode, restarted with empty storage before "
            f"each pull (cold)\n\n"
            f"{t}\n{r}")


def main(argv=None) -> int:
    def passed(results: dict) -> bool:
        return not sum(s["failed"] for s in results["summary"].values())
    return c.run_benchmark(parse_args(argv), run, render, passed)


if __name__ == "__main__":
    sys.exit(main())
