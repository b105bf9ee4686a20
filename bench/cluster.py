#!/usr/bin/env python3
"""docxy's cluster mode: three docxy nodes on one Ceph RGW bucket and one Redis database, in
front of the suite's Hub-like upstream (tests/harness/upstream.py: the distribution registry
behind an nginx TLS front, token auth, blob GETs answered 307 to an nginx TLS "CDN"; the
blob is the large layer of library/large, --size-mb MiB). Three parts (--parts):

  cold      --clients-per-node concurrent cold pulls of the blob on each of the 3 nodes at
            once (a fresh cluster every round: a fresh bucket, a fresh Redis database, empty
            node disks). Every client reads the whole body and checks its sha256. Reported:
            upstream bytes / blob size (the CDN's $body_bytes_sent for the blob; target
            1.0), wall time, MB/s per client, peak RSS of every node. The same load on three
            distribution registries in proxy mode (the harness user's login, the harness CA
            trusted) sharing one fresh bucket of the same RGW as their S3 storage (falling
            back to a shared filesystem directory if the S3 driver cannot work, saying why):
            its upstream bytes / blob size.
  warm      One pull fills node 0's disk and the bucket; then, every round in a rotating
            order, single-client curl pulls of the blob (a) from node 0 (its local disk),
            (b) from node 1 restarted with an empty disk (its first pull: from the bucket),
            (c) from nginx serving node 0's cache file statically (sendfile, plain HTTP).
            Reported: MB/s median and min-max, CPU s/GB, the ratios (a)/(c) and (b)/(c).
  failover  The CDN throttled (nginx limit_rate --slow-rate per connection), a pull on node
            0 (which leads the download), then pulls on nodes 1 and 2 (which follow it);
            once both followers have --kill-after-mb MiB, node 0 is killed (SIGKILL).
            Reported per follower: the longest gap between received bytes after the kill
            (target < 10 s), that it completes with the right digest; upstream bytes / blob
            size (target < 1.5) and the lease takeovers.

Everything runs on 127.0.0.1 in a scratch directory and is stopped on any exit. Results go
to bench/results/<--results-name>.{json,md} (default cluster-<UTC date>).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import secrets
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import _common as c
import _hub as hub
from harness.ceph import Rgw  # noqa: E402  (tests/ is on sys.path via _common)
from harness.cluster import Cluster  # noqa: E402
from harness.daemon import cached_blob  # noqa: E402
from harness.procs import ManagedProcess, free_port, wait_for_port  # noqa: E402
from harness.redisd import RedisServer  # noqa: E402
from harness.registry import (  # noqa: E402
    ProxySettings,
    Registry,
    RegistrySettings,
    registry_config,
)

ALL_PARTS = ("cold", "warm", "failover")
NODES = 3
COLD_TARGET = 1.0           # upstream bytes / blob size, docxy cluster
FAILOVER_GAP_TARGET = 10.0  # seconds without a byte after the leader's death
FAILOVER_BYTES_TARGET = 1.5  # upstream bytes / blob size with the leader killed
DIST_ROOT = "/dist"         # rootdirectory of the distribution registries in their bucket
READ_CHUNK = 1 << 20
WARM_PATHS = ("local", "bucket", "nginx")
WARM_LABELS = {"local": "(a) docxy node, local disk (second pull on the node)",
               "bucket": "(b) docxy node restarted with an empty disk (from the bucket)",
               "nginx": "(c) nginx static, node 0's cache file (sendfile, plain HTTP)"}


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(ALL_PARTS),
                   help=f"comma-separated subset of {','.join(ALL_PARTS)} (default all)")
    p.add_argument("--size-mb", type=int, default=512,
                   help="blob size in MiB (default 512: random bytes in the large layer, a "
                        "gzip'd tar a little larger)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every part (default 3)")
    p.add_argument("--clients-per-node", type=int, default=10,
                   help="cold: concurrent clients on each of the 3 nodes (and on each of the "
                        "3 distribution registries) (default 10)")
    p.add_argument("--slow-rate", default="auto",
                   help="failover: nginx limit_rate of the CDN per connection, e.g. 40m "
                        "(default auto: --size-mb/16 MiB/s, so a download lasts about 16 s)")
    p.add_argument("--kill-after-mb", type=int, default=20,
                   help="failover: kill the leader once both followers' clients have more "
                        "than this many MiB (default 20; at most a third of the blob)")
    p.add_argument("--no-distribution", action="store_true",
                   help="cold: skip the distribution registries")
    p.add_argument("--pull-timeout", type=float, default=300,
                   help="seconds one pull may take (default 300)")
    p.add_argument("--layer-cache", type=Path, default=None,
                   help="build the large layer here and keep it for the next run (default: "
                        "in the scratch directory, removed afterwards)")
    default_name = f"cluster-{utc_date()}"
    c.add_common_options(p, default_name)
    args = p.parse_args(argv)
    args.default_results_name = default_name
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in ALL_PARTS]
    if bad or not args.parts:
        p.error(f"unknown part(s) {bad}; choose from {ALL_PARTS}")
    if not 1 <= args.rounds <= 20 or args.size_mb < 4:
        p.error("--rounds must be 1..20 and --size-mb at least 4")
    if not 1 <= args.clients_per_node <= 50:
        p.error("--clients-per-node must be 1..50")
    if args.slow_rate == "auto":
        args.slow_rate = f"{max(1, round(args.size_mb / 16))}m"
    return args


# --- clients ------------------------------------------------------------------------------

def pull(base_url: str, path: str, headers: dict[str, str], timeout: float,
         progress: dict | None = None, arrivals: list[float] | None = None) -> dict:
    """GET base_url + path over plain HTTP, reading the body as it comes (read1) and hashing
    it; `progress["read"]` holds the bytes read so far, `arrivals` gets the monotonic time of
    every read. The whole pull is bounded by `timeout`."""
    t0 = time.monotonic()
    result: dict = {"status": None, "bytes": 0, "sha256": None, "error": None}
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=min(timeout, 60))
    n = 0
    try:
        conn.request("GET", path, headers={"User-Agent": "docxy-bench-cluster", **headers})
        r = conn.getresponse()
        result["status"] = r.status
        result["ttfb"] = round(time.monotonic() - t0, 3)
        h = hashlib.sha256()
        while True:
            data = r.read1(READ_CHUNK)
            if not data:
                break
            h.update(data)
            n += len(data)
            if progress is not None:
                progress["read"] = n
            if arrivals is not None:
                arrivals.append(time.monotonic())
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"pull took more than {timeout:.0f}s")
        result["sha256"] = "sha256:" + h.hexdigest()
        length = r.getheader("Content-Length")
        if length is not None and int(length) != n:
            # read1 returns b"" when the server goes away mid-body, without raising
            result["error"] = f"IncompleteRead: {n} of {length} bytes"
    except Exception as e:  # noqa: BLE001 - every failure is reported per client
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        result["bytes"] = n
    result["seconds"] = round(time.monotonic() - t0, 3)
    return result


def client_ok(r: dict, digest: str, size: int) -> bool:
    return (r.get("status") == 200 and r.get("bytes") == size
            and r.get("sha256") == digest and not r.get("error"))


def load(targets: list[tuple[str, dict[str, str]]], per_target: int, path: str,
         timeout: float) -> tuple[list[dict], float]:
    """`per_target` clients on each (base URL, headers) of `targets`, all started together
    behind a barrier; returns every client's result (with "target": its index) and the wall
    time from the start to the last client's end."""
    n = len(targets) * per_target
    results: list[dict | None] = [None] * n
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        base, headers = targets[i % len(targets)]
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            results[i] = {"error": "barrier broken", "target": i % len(targets)}
            return
        results[i] = {**pull(base, path, headers, timeout), "target": i % len(targets)}

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(30)
    t0 = time.monotonic()
    deadline = t0 + timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.monotonic() - t0
    return [r if r is not None else {"error": "client did not finish in time",
                                     "target": i % len(targets)}
            for i, r in enumerate(results)], wall


# --- docxy nodes ------------------------------------------------------------------------------

def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def metric(node, name: str) -> float:
    """The sum of every sample of metric `name` on a node's /metrics (0 when absent or the
    node does not answer)."""
    try:
        with urllib.request.urlopen(f"{node.plain_url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def in_flight(node) -> int:
    try:
        return int(get_json(f"{node.plain_url}/health").get("cache", {})
                   .get("downloads_in_flight", 0))
    except OSError:
        return -1


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def start_cluster(stack: contextlib.ExitStack, work: Path, up, rgw: Rgw, redis: RedisServer,
                  count: int = NODES) -> Cluster:
    """A fresh cluster (harness.cluster.Cluster: a fresh bucket, its own Redis database,
    emptied first, and empty node disks), stopped when `stack` closes. bench/_hub gives the
    harness Upstream itself, which is what Cluster (mirror_args) expects."""
    cl = Cluster(work, up, rgw, redis, count=count)
    redis.cli("-n", cl.database, "FLUSHDB")
    stack.callback(cl.stop)
    c.DOCXY_TREES_SEEN.add(c.docxy_tree_hash())
    cl.start()
    return cl


def node_headers(node, up) -> dict[str, str]:
    """What a client sends a node: a token from the node's /auth/token, fetched now."""
    return hub.bearer(hub.docxy_token(node, up))


def settle_traffic(up, blob: hub.HubBlob, marks, quiet: float = 3.0,
                   timeout: float = 120.0) -> dict:
    """The upstream traffic since `marks`, once the CDN's log has not grown for `quiet`
    seconds (nginx writes a line when a response ends)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        t = hub.traffic_since(up, blob, marks)
        key = (t["cdn_blob_gets"], t["cdn_body_bytes"], t["front_requests"])
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= quiet or time.monotonic() > deadline:
            return t
        time.sleep(0.25)


def rss_samplers(pids: list[int]) -> list[c.RssSampler]:
    return [c.RssSampler(lambda p=p: [p], 0.1) for p in pids]


def summarize_clients(results: list[dict], digest: str, size: int, targets: int) -> dict:
    good = [r for r in results if client_ok(r, digest, size)]
    rates = [r["bytes"] / r["seconds"] / c.MB for r in good if r.get("seconds")]
    return {
        "clients": len(results), "clients_ok": len(good),
        "clients_failed": [r for r in results if not client_ok(r, digest, size)][:10],
        "client_mb_per_s": c.spread(rates),
        "clients_ok_per_target": [sum(1 for r in good if r["target"] == i)
                                  for i in range(targets)],
    }


# --- part 1: cold ---------------------------------------------------------------------------

def cold_docxy(work: Path, args, blob: hub.HubBlob, rgw: Rgw, redis: RedisServer,
               r: int) -> dict:
    up = blob.up
    with contextlib.ExitStack() as sub:
        home = work / f"cold-docxy-{r}"
        sub.callback(shutil.rmtree, home, True)
        cl = start_cluster(sub, home, up, rgw, redis)
        nodes = cl.nodes
        targets = [(n.plain_url, node_headers(n, up)) for n in nodes]
        pids = [n.process.pid for n in nodes]
        idle = [c.rss_bytes(p) for p in pids]
        cpu0 = [c.cpu_seconds(p) for p in pids]
        marks = hub.log_marks(up)
        samplers = rss_samplers(pids)
        with contextlib.ExitStack() as sampling:
            for s in samplers:
                sampling.enter_context(s)
            results, wall = load(targets, args.clients_per_node, blob.path, args.pull_timeout)
        stored = True
        try:
            wait_until(lambda: all(in_flight(n) == 0 for n in nodes)
                       and sum(metric(n, "docxy_store_uploads_total") for n in nodes) >= 1,
                       120, "the blob to be in the bucket and no download in flight")
        except RuntimeError as e:
            stored = False
            print(f"cold: docxy: {e}", file=sys.stderr)
        traffic = settle_traffic(up, blob, marks)
        rec = {
            "system": "docxy", "round": r, "bucket": cl.bucket,
            **summarize_clients(results, blob.digest, blob.size, len(nodes)),
            "wall_s": round(wall, 2),
            "aggregate_mb_per_s": round(sum(x.get("bytes", 0) for x in results) / wall / c.MB, 1),
            "idle_rss_mb": [round(x / c.MB, 1) for x in idle],
            "peak_rss_mb": [round(s.peak / c.MB, 1) for s in samplers],
            "cpu_s": [round(c.cpu_seconds(p) - x, 2) for p, x in zip(pids, cpu0)],
            "stored": stored,
            "store_uploads": sum(metric(n, "docxy_store_uploads_total") for n in nodes),
            "peer_bytes": sum(metric(n, "docxy_cluster_peer_bytes_total") for n in nodes),
            "lease_takeovers": sum(metric(n, "docxy_cluster_lease_takeovers_total")
                                   for n in nodes),
            "unleased_downloads": sum(metric(n, "docxy_cluster_unleased_downloads_total")
                                      for n in nodes),
            "upstream": traffic,
        }
    print(f"cold: round {r + 1} docxy cluster: {rec['clients_ok']}/{rec['clients']} clients "
          f"ok in {wall:.1f}s; upstream sent {traffic['cdn_body_bytes']} bytes = "
          f"{traffic['bytes_ratio']} x blob ({traffic['cdn_blob_gets']} CDN GETs); per client "
          f"{c.fmt_spread(rec['client_mb_per_s'])} MB/s; peak RSS {rec['peak_rss_mb']} MB",
          file=sys.stderr)
    return rec


def s3_client(rgw: Rgw):
    """A botocore S3 client for the RGW (path-style addressing; botocore is docxy's own
    dependency, docxy.s3.signing)."""
    import botocore.session
    from botocore.config import Config
    return botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=rgw.endpoint,
        aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))


class StorageRegistry(Registry):
    """harness.registry.Registry with another `storage` section in its config (the harness
    writes the filesystem driver only); everything else as harness.registry writes it."""

    def __init__(self, settings: RegistrySettings, workdir: Path, name: str,
                 storage: dict) -> None:
        super().__init__(settings, workdir, name)
        self.storage = storage

    def start(self, timeout: float = 30.0) -> "StorageRegistry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = registry_config(self.settings)
        config["storage"] = self.storage
        self.config_path.write_text(json.dumps(config, indent=2))
        # aws-sdk-go loads $AWS_CA_BUNDLE (set on some machines, this one included) into
        # the HTTP transport, which distribution 2.8 has wrapped: the S3 driver then panics
        # at start ("LoadCustomCABundleError: unable to load custom CA bundle, HTTPClient's
        # transport unsupported type"). An empty value counts as unset; the RGW is plain HTTP.
        env = {"AWS_CA_BUNDLE": ""}
        if self.settings.proxy and self.settings.proxy.ca_path:
            env["SSL_CERT_FILE"] = str(self.settings.proxy.ca_path)
        self.process = ManagedProcess(self.name, ["docker-registry", "serve",
                                                  str(self.config_path)], self.log_path, env=env)
        self.process.start()
        wait_for_port(self.settings.interface, self.settings.port, timeout, self.process)
        return self


def dist_storage(driver: str, rgw: Rgw, bucket: str, shared: Path) -> dict:
    """The `storage` section of the distribution registries: S3 on the RGW bucket (the
    registry serves the bytes itself: `redirect: disable`, as docxy does; otherwise it would
    answer 307 to a presigned RGW URL), or the filesystem driver on a shared directory."""
    common = {"delete": {"enabled": True}, "maintenance": {"uploadpurging": {"enabled": False}},
              "redirect": {"disable": True}}
    if driver == "s3":
        return {"s3": {"accesskey": rgw.access_key, "secretkey": rgw.secret_key,
                       "region": "us-east-1", "regionendpoint": rgw.endpoint,
                       "bucket": bucket, "secure": False, "v4auth": True,
                       "rootdirectory": DIST_ROOT}, **common}
    return {"filesystem": {"rootdirectory": str(shared)}, **common}


def dist_blob_stored(driver: str, s3, bucket: str, shared: Path, digest: str,
                     size: int) -> bool:
    hex_ = digest.split(":", 1)[1]
    rel = f"docker/registry/v2/blobs/sha256/{hex_[:2]}/{hex_}/data"
    if driver == "s3":
        try:
            head = s3.head_object(Bucket=bucket, Key=f"{DIST_ROOT.strip('/')}/{rel}")
        except Exception:  # noqa: BLE001 - not there (yet)
            return False
        return int(head.get("ContentLength", -1)) == size
    f = shared / rel
    return f.exists() and f.stat().st_size == size


def registry_errors(regs: list[StorageRegistry], lines: int = 6) -> str:
    """The error lines of the registries' logs (the last few of each)."""
    out = []
    for reg in regs:
        try:
            text = reg.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [x for x in text if "level=error" in x or "level=fatal" in x
                  or x.startswith("panic")]
        if errors:
            out.append(f"{reg.name}: " + " | ".join(x[:400] for x in errors[-lines:]))
    return "\n".join(out)


def cold_distribution(work: Path, args, blob: hub.HubBlob, rgw: Rgw, r: int,
                      driver: str) -> dict:
    """Three distribution registries in proxy mode on one fresh bucket (or one shared
    directory), the same load as the docxy cluster's. Raises RuntimeError with the
    registries' errors when the S3 driver does not work (no registry starts, or no client
    gets the blob)."""
    up = blob.up
    home = work / f"cold-dist-{r}"
    shared = home / "shared-storage"
    bucket = f"dist-{secrets.token_hex(4)}"
    s3 = s3_client(rgw)
    if driver == "s3":
        s3.create_bucket(Bucket=bucket)
    user, password = up.user
    with contextlib.ExitStack() as sub:
        sub.callback(shutil.rmtree, home, True)
        regs = []
        for i in range(NODES):
            settings = RegistrySettings(
                storage_dir=shared, log_level="warn",
                proxy=ProxySettings(remoteurl=up.registry_url, username=user,
                                    password=password, ca_path=up.ca_path))
            reg = StorageRegistry(settings, home, f"dist{i}",
                                  dist_storage(driver, rgw, bucket, shared))
            sub.callback(reg.stop)
            regs.append(reg)
            try:
                reg.start()
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{reg.name} did not start: {e}") from None
        pids = [reg.process.pid for reg in regs]
        idle = [c.rss_bytes(p) for p in pids]
        cpu0 = [c.cpu_seconds(p) for p in pids]
        time.sleep(0.5)
        marks = hub.log_marks(up)
        samplers = rss_samplers(pids)
        with contextlib.ExitStack() as sampling:
            for s in samplers:
                sampling.enter_context(s)
            results, wall = load([(reg.url, {}) for reg in regs], args.clients_per_node,
                                 blob.path, args.pull_timeout)
        clients = summarize_clients(results, blob.digest, blob.size, NODES)
        if clients["clients_ok"] == 0:
            raise RuntimeError(
                f"no client got the blob (first failure: {results[0]}); registry errors:\n"
                f"{registry_errors(regs) or '(none logged)'}")
        stored = True
        try:
            wait_until(lambda: dist_blob_stored(driver, s3, bucket, shared, blob.digest,
                                                blob.size), 120, "the blob to be stored")
        except RuntimeError as e:
            stored = False
            print(f"cold: distribution: {e}", file=sys.stderr)
        traffic = settle_traffic(up, blob, marks)
        rec = {
            "system": "distribution", "round": r, "driver": driver,
            "bucket": bucket if driver == "s3" else None,
            **clients,
            "wall_s": round(wall, 2),
            "aggregate_mb_per_s": round(sum(x.get("bytes", 0) for x in results) / wall / c.MB, 1),
            "idle_rss_mb": [round(x / c.MB, 1) for x in idle],
            "peak_rss_mb": [round(s.peak / c.MB, 1) for s in samplers],
            "cpu_s": [round(c.cpu_seconds(p) - x, 2) for p, x in zip(pids, cpu0)],
            "stored": stored,
            "registry_errors": registry_errors(regs),
            "upstream": traffic,
        }
    print(f"cold: round {r + 1} distribution ({driver}): {rec['clients_ok']}/{rec['clients']} "
          f"clients ok in {wall:.1f}s; upstream sent {traffic['cdn_body_bytes']} bytes = "
          f"{traffic['bytes_ratio']} x blob ({traffic['cdn_blob_gets']} CDN GETs)",
          file=sys.stderr)
    return rec


def part_cold(work: Path, args, blob: hub.HubBlob, rgw: Rgw, redis: RedisServer) -> dict:
    out: dict = {"clients_per_node": args.clients_per_node, "nodes": NODES, "rounds": [],
                 "distribution_driver": None if args.no_distribution else "s3",
                 "distribution_s3_error": None}
    systems = ["docxy"] + ([] if args.no_distribution else ["distribution"])
    for r in range(args.rounds):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            if system == "docxy":
                out["rounds"].append(cold_docxy(work, args, blob, rgw, redis, r))
                continue
            driver = out["distribution_driver"]
            try:
                out["rounds"].append(cold_distribution(work, args, blob, rgw, r, driver))
            except RuntimeError as e:
                if driver != "s3":
                    raise
                out["distribution_s3_error"] = str(e)[:3000]
                out["distribution_driver"] = "filesystem"
                print(f"cold: distribution on S3 failed, falling back to the filesystem "
                      f"driver on a shared directory:\n{e}", file=sys.stderr)
                out["rounds"].append(cold_distribution(work, args, blob, rgw, r, "filesystem"))
    dx = [x for x in out["rounds"] if x["system"] == "docxy"]
    ds = [x for x in out["rounds"] if x["system"] == "distribution"]
    out["docxy_bytes_ratio"] = c.spread([x["upstream"]["bytes_ratio"] for x in dx], 4)
    out["distribution_bytes_ratio"] = c.spread([x["upstream"]["bytes_ratio"] for x in ds], 4)
    out["docxy_client_mb_per_s"] = c.spread([v for x in dx
                                             for v in x["client_mb_per_s"]["all"]])
    out["distribution_client_mb_per_s"] = c.spread([v for x in ds
                                                    for v in x["client_mb_per_s"]["all"]])
    out["target_bytes_ratio"] = COLD_TARGET
    out["met"] = all(x["clients_ok"] == x["clients"] and x["upstream"]["bytes_ratio"] <= 1.01
                     and x["upstream"]["cdn_blob_gets"] == 1 for x in dx)
    return out


# --- part 2: warm ---------------------------------------------------------------------------

def start_static_nginx(stack: contextlib.ExitStack, work: Path, root: Path) -> c.NginxProcess:
    """nginx serving files from `root` over plain HTTP (sendfile on, tcp_nopush on: the
    harness defaults)."""
    port = free_port()
    body = f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}; }}
    }}
"""
    n = c.NginxProcess("nginx-static", work / "nginx-static", port, body)
    stack.callback(n.stop)
    n.start()
    return n


def part_warm(stack: contextlib.ExitStack, work: Path, args, blob: hub.HubBlob, rgw: Rgw,
              redis: RedisServer) -> dict:
    up = blob.up
    cl = start_cluster(stack, work / "warm", up, rgw, redis)
    n0, n1 = cl.nodes[0], cl.nodes[1]
    t = time.monotonic()
    first = pull(n0.plain_url, blob.path, node_headers(n0, up), args.pull_timeout)
    first_s = time.monotonic() - t
    if not client_ok(first, blob.digest, blob.size):
        raise RuntimeError(f"warm: the first pull through node 0 failed: {first}")
    fpath = cached_blob(cl.cache_dir(0), blob.digest)
    wait_until(lambda: fpath.exists() and in_flight(n0) == 0
               and metric(n0, "docxy_store_uploads_total") >= 1, 120,
               "node 0's cache file and its upload to the bucket")
    if fpath.stat().st_size != blob.size:
        raise RuntimeError(f"{fpath} has {fpath.stat().st_size} bytes, not {blob.size}")
    print(f"warm: first pull through node 0 {blob.size / first_s / c.MB:.0f} MB/s; cache file "
          f"{fpath}; uploaded to the bucket", file=sys.stderr)
    ng = start_static_nginx(stack, work, fpath.parent)
    nginx_url = f"http://127.0.0.1:{ng.port}/{fpath.name}"
    rgw_pids = [p for p in (rgw.gateway.pid, rgw.osd.pid) if p]

    def one(name: str) -> dict:
        if name == "bucket":
            cl.restart(1, empty_disk=True)
        node = n0 if name == "local" else n1
        if name == "nginx":
            url, headers, pids = nginx_url, {}, c.nginx_worker_pids(ng)
        else:
            url, headers, pids = node.plain_url + blob.path, node_headers(node, up), \
                [node.process.pid]
        cpu0 = {p: c.cpu_seconds(p) for p in pids + rgw_pids}
        res = c.curl_pull(url, args.pull_timeout, headers=headers)
        cpu = {p: c.cpu_seconds(p) - v for p, v in cpu0.items()}
        ok = res.get("status") == 200 and res.get("bytes") == blob.size
        rec = {"path": name, "ok": ok, **res,
               "mb_per_s": round(res["bytes"] / res["seconds"] / c.MB, 1) if ok else None,
               "server_cpu_s": round(sum(v for p, v in cpu.items() if p in pids), 3),
               "rgw_cpu_s": round(sum(v for p, v in cpu.items() if p in rgw_pids), 3)}
        if name == "bucket":
            rec["node_store_read_bytes"] = metric(node, "docxy_store_read_bytes_total")
            rec["node_peer_bytes"] = metric(node, "docxy_cluster_peer_bytes_total")
        return rec

    # One unmeasured pull from the local disk and from nginx (page cache).
    for name in ("local", "nginx"):
        w = one(name)
        if not w["ok"]:
            raise RuntimeError(f"warm: unmeasured pull from {name} failed: {w}")
    marks = hub.log_marks(up)
    pulls = []
    for i in range(args.rounds):
        for name in c.round_order(list(WARM_PATHS), i):
            rec = {"round": i, **one(name)}
            pulls.append(rec)
            shown = f"{rec['mb_per_s']:8.1f} MB/s" if rec["ok"] else f"FAILED {rec}"
            extra = (f", from the bucket {rec['node_store_read_bytes'] / c.MB:.0f} MB"
                     if name == "bucket" else "")
            print(f"warm: round {i + 1}/{args.rounds} {name:6s} {shown} (server cpu "
                  f"{rec['server_cpu_s']:.2f}s{extra})", file=sys.stderr)
    hub.wait_for_logs(1.0)
    traffic = hub.traffic_since(up, blob, marks)
    summary = {}
    gb = blob.size / 1e9
    for name in WARM_PATHS:
        mine = [p for p in pulls if p["path"] == name]
        good = [p for p in mine if p["ok"]]
        summary[name] = {"pulls": len(mine), "failed": len(mine) - len(good),
                         "mb_per_s": c.spread([p["mb_per_s"] for p in good]),
                         "cpu_s_per_gb": c.spread([p["server_cpu_s"] / gb for p in good], 3),
                         "rgw_cpu_s_per_gb": c.spread([p["rgw_cpu_s"] / gb for p in good], 3)}

    def ratio(a: str) -> tuple[float | None, dict]:
        per_round = []
        for i in range(args.rounds):
            x = [p["mb_per_s"] for p in pulls if p["round"] == i and p["path"] == a and p["ok"]]
            y = [p["mb_per_s"] for p in pulls if p["round"] == i and p["path"] == "nginx"
                 and p["ok"]]
            if x and y:
                per_round.append(x[0] / y[0])
        ma, mn = summary[a]["mb_per_s"]["median"], summary["nginx"]["mb_per_s"]["median"]
        return (round(ma / mn, 3) if ma and mn else None), c.spread(per_round, 3)

    out = {"first_pull_mb_per_s": round(blob.size / first_s / c.MB, 1), "cache_file": str(fpath),
           "pulls": pulls, "summary": summary, "upstream_during_warm_pulls": traffic,
           "bucket_pulls_read_from_bucket": all(
               p.get("node_store_read_bytes", 0) >= blob.size for p in pulls
               if p["path"] == "bucket" and p["ok"])}
    out["local_ratio"], out["local_ratio_per_round"] = ratio("local")
    out["bucket_ratio"], out["bucket_ratio_per_round"] = ratio("bucket")
    out["met"] = (all(s["failed"] == 0 for s in summary.values())
                  and traffic["cdn_blob_gets"] == 0 and out["bucket_pulls_read_from_bucket"])
    ng.stop()
    cl.stop()
    shutil.rmtree(work / "warm", ignore_errors=True)
    return out


# --- part 3: failover -----------------------------------------------------------------------

def gaps_after(arrivals: list[float], killed_at: float) -> dict:
    """The longest time without a byte after `killed_at` (from the kill to the first read
    after it, then between reads), and when that gap ended, relative to the kill."""
    after = [t for t in arrivals if t > killed_at]
    if not after:
        return {"longest_gap_s": None, "flowing_again_at_s": None, "reads_after_kill": 0}
    prev, longest, ended = killed_at, 0.0, after[0]
    for t in after:
        if t - prev > longest:
            longest, ended = t - prev, t
        prev = t
    return {"longest_gap_s": round(longest, 3), "flowing_again_at_s": round(ended - killed_at, 3),
            "first_read_after_kill_s": round(after[0] - killed_at, 3),
            "last_read_after_kill_s": round(after[-1] - killed_at, 3),
            "reads_after_kill": len(after)}


def failover_round(work: Path, args, blob: hub.HubBlob, rgw: Rgw, redis: RedisServer,
                   r: int) -> dict:
    up = blob.up
    kill_after = min(args.kill_after_mb * c.MiB, blob.size // 3)
    with contextlib.ExitStack() as sub:
        home = work / f"failover-{r}"
        sub.callback(shutil.rmtree, home, True)
        cl = start_cluster(sub, home, up, rgw, redis)
        leader, *followers = cl.nodes
        headers = [node_headers(n, up) for n in cl.nodes]
        sub.callback(up.restart_cdn, "ok")
        up.cdn.slow_rate = args.slow_rate
        up.restart_cdn("slow")
        marks = hub.log_marks(up)
        lead_progress: dict = {"read": 0}
        lead_result: dict = {}

        def run_lead() -> None:
            lead_result.update(pull(leader.plain_url, blob.path, headers[0], args.pull_timeout,
                                    lead_progress))

        lead_t = threading.Thread(target=run_lead, name="lead", daemon=True)
        t0 = time.monotonic()
        lead_t.start()
        wait_until(lambda: lead_progress["read"] > 0 or not lead_t.is_alive(), 60,
                   "the first bytes on node 0", 0.05)
        progress = [{"read": 0} for _ in followers]
        arrivals: list[list[float]] = [[] for _ in followers]
        results: list[dict] = [{} for _ in followers]

        def run_follower(i: int) -> None:
            results[i].update(pull(followers[i].plain_url, blob.path, headers[i + 1],
                                   args.pull_timeout, progress[i], arrivals[i]))

        threads = [threading.Thread(target=run_follower, args=(i,), name=f"follower-{i}",
                                    daemon=True) for i in range(len(followers))]
        for t in threads:
            t.start()
        wait_until(lambda: all(p["read"] > kill_after for p in progress)
                   or not all(t.is_alive() for t in threads), 120,
                   f"both followers to have {kill_after // c.MiB} MiB", 0.02)
        at_kill = [p["read"] for p in progress]
        lead_at_kill = lead_progress["read"]
        killed_at = time.monotonic()
        cl.kill(0)
        print(f"failover: round {r + 1}: node 0 killed {killed_at - t0:.1f}s after its pull "
              f"began (its client had {lead_at_kill / c.MiB:.0f} MiB, the followers' "
              f"{[round(x / c.MiB) for x in at_kill]} MiB)", file=sys.stderr)
        for t in threads:
            t.join(args.pull_timeout + 30)
        lead_t.join(30)
        done_at = time.monotonic()
        traffic = settle_traffic(up, blob, marks)
        takeovers = sum(metric(n, "docxy_cluster_lease_takeovers_total") for n in followers)
        per_follower = []
        for i, res in enumerate(results):
            g = gaps_after(arrivals[i], killed_at)
            per_follower.append({
                "node": i + 1, "ok": client_ok(res, blob.digest, blob.size),
                "bytes_at_kill": at_kill[i], **g,
                "completed_after_kill_s": (round(arrivals[i][-1] - killed_at, 3)
                                           if arrivals[i] else None),
                **{k: res.get(k) for k in ("status", "bytes", "sha256", "error", "seconds")}})
        rec = {
            "round": r, "slow_rate": args.slow_rate, "kill_after_bytes": kill_after,
            "killed_after_s": round(killed_at - t0, 2),
            "lead_client_bytes_at_kill": lead_at_kill,
            "lead_client": {k: lead_result.get(k) for k in ("status", "bytes", "error")},
            "followers": per_follower,
            "all_done_after_kill_s": round(done_at - killed_at, 2),
            "lease_takeovers": takeovers,
            "upstream": traffic,
        }
        gaps = [f["longest_gap_s"] for f in per_follower]
        rec["met"] = (all(f["ok"] for f in per_follower)
                      and all(g is not None and g < FAILOVER_GAP_TARGET for g in gaps)
                      and traffic["bytes_ratio"] < FAILOVER_BYTES_TARGET)
    print(f"failover: round {r + 1}: followers ok {[f['ok'] for f in per_follower]}, longest "
          f"gap after the kill {gaps} s, upstream {traffic['bytes_ratio']} x blob "
          f"({traffic['cdn_blob_gets']} CDN GETs), takeovers {takeovers}", file=sys.stderr)
    return rec


def part_failover(work: Path, args, blob: hub.HubBlob, rgw: Rgw, redis: RedisServer) -> dict:
    rounds = [failover_round(work, args, blob, rgw, redis, r) for r in range(args.rounds)]
    gaps = [f["longest_gap_s"] for x in rounds for f in x["followers"]
            if f["longest_gap_s"] is not None]
    return {"rounds": rounds, "slow_rate": args.slow_rate,
            "longest_gap_s": c.spread(gaps, 2),
            "bytes_ratio": c.spread([x["upstream"]["bytes_ratio"] for x in rounds], 4),
            "target_gap_s": FAILOVER_GAP_TARGET, "target_bytes_ratio": FAILOVER_BYTES_TARGET,
            "met": all(x["met"] for x in rounds)}


# --- run, report --------------------------------------------------------------------------

def run(args) -> dict:
    info = c.machine_info()
    info["redis"] = c._cmd_version(["redis-server", "--version"])
    info["ceph"] = c._cmd_version(["radosgw", "--version"])
    results: dict = {"benchmark": args.default_results_name, "machine": info, "parts": args.parts,
                     "size_mib": args.size_mb, "rounds": args.rounds,
                     "clients_per_node": args.clients_per_node, "slow_rate": args.slow_rate,
                     "kill_after_mb": args.kill_after_mb,
                     "no_distribution": args.no_distribution}
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(c.workdir(args.keep_workdir, "docxy-bench-cluster-"))
        print(f"work directory {work}", file=sys.stderr)
        blob = hub.start_hub(stack, work, args.size_mb * c.MiB, args.layer_cache)
        t = time.monotonic()
        redis = RedisServer.start(work / "redis")
        stack.callback(redis.stop)
        rgw = Rgw.start(work / "rgw")
        stack.callback(rgw.stop)
        print(f"Redis on port {redis.port}, RGW at {rgw.endpoint} up in "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr)
        results.update(blob_bytes=blob.size, blob_digest=blob.digest)
        if "cold" in args.parts:
            results["cold"] = part_cold(work, args, blob, rgw, redis)
        if "warm" in args.parts:
            results["warm"] = part_warm(stack, work, args, blob, rgw, redis)
        if "failover" in args.parts:
            results["failover"] = part_failover(work, args, blob, rgw, redis)
    results["run_seconds"] = round(time.monotonic() - t_start, 1)
    return results


def verdict(ok: bool | None) -> str:
    return "met" if ok else "NOT met"


def render_cold(results: dict) -> str:
    cd = results["cold"]
    rows = []
    for x in cd["rounds"]:
        u = x["upstream"]
        name = ("docxy cluster" if x["system"] == "docxy"
                else f"distribution proxy ({x['driver']})")
        rows.append([str(x["round"] + 1), name, f"{x['clients_ok']}/{x['clients']}",
                     str(u["cdn_body_bytes"]), f"**{u['bytes_ratio']}**", str(u["cdn_blob_gets"]),
                     str(x["wall_s"]), c.fmt_spread(x["client_mb_per_s"]),
                     str(x["aggregate_mb_per_s"]),
                     " / ".join(str(v) for v in x["peak_rss_mb"]),
                     " / ".join(str(v) for v in x["cpu_s"]), "yes" if x["stored"] else "NO"])
    t = c.table(["round", "system", "clients ok", "upstream bytes", "bytes / blob",
                 "CDN GETs", "wall s", "MB/s per client median (min–max)", "aggregate MB/s",
                 "peak RSS MB per node", "CPU s per node", "stored"], rows)
    dist = cd["distribution_driver"]
    if dist is None:
        dist_note = "The distribution registries were skipped (`--no-distribution`).\n"
    elif cd["distribution_s3_error"]:
        dist_note = ("**distribution on S3 did not work** with this RGW; the error, exactly:\n\n"
                     f"```\n{cd['distribution_s3_error']}\n```\n\nso the distribution rows "
                     "use the **filesystem driver on one directory shared by the three "
                     "registries** instead.\n")
    else:
        dist_note = ("The three distribution registries share one fresh bucket of the same "
                     "RGW (`storage: s3` with `regionendpoint` = the RGW, `v4auth`, "
                     f"`secure: false`, `rootdirectory: {DIST_ROOT}`, `redirect: disable` so "
                     "they serve the bytes themselves as docxy does). They run with "
                     "`AWS_CA_BUNDLE` set empty: with it set (this machine sets it to the "
                     "system CA file) distribution 2.8's S3 driver panics at start, "
                     "`LoadCustomCABundleError: unable to load custom CA bundle, "
                     "HTTPClient's transport unsupported type`.\n")
    dx = [x for x in cd["rounds"] if x["system"] == "docxy"]
    extra = "; ".join(f"round {x['round'] + 1}: bucket uploads {x['store_uploads']:.0f}, "
                      f"peer bytes {x['peer_bytes'] / max(results['blob_bytes'], 1):.2f} × blob, "
                      f"idle RSS {' / '.join(str(v) for v in x['idle_rss_mb'])} MB"
                      for x in dx)
    return (f"## 1. cold: {cd['clients_per_node']} concurrent cold pulls on each of "
            f"{cd['nodes']} nodes\n\n"
            f"Each round a fresh cluster (a fresh bucket, a fresh Redis database, empty node "
            f"disks) and {cd['clients_per_node'] * cd['nodes']} clients started together "
            f"behind a barrier, {cd['clients_per_node']} per node, each with a token from its "
            f"node's /auth/token; every client reads the whole body and checks its sha256. "
            f"Then the same load on three distribution registries in proxy mode (logging in "
            f"upstream as the harness user), {cd['clients_per_node']} clients each. Upstream "
            f"bytes = the CDN's `$body_bytes_sent` for the blob once the blob is stored and the "
            f"CDN's log is quiet for 3 s. \"stored\": the blob is in the bucket (docxy: "
            f"`docxy_store_uploads_total` ≥ 1 and nothing in flight on any node; distribution: "
            f"its `data` object has the full size). Order alternated every round.\n\n"
            f"{dist_note}\n{t}\n"
            f"docxy: {extra}.\n\n"
            f"- docxy cluster, upstream bytes / blob: {c.fmt_spread(cd['docxy_bytes_ratio'])} "
            f"(target {cd['target_bytes_ratio']}: {verdict(cd['met'])}); MB/s per client, all "
            f"rounds: {c.fmt_spread(cd['docxy_client_mb_per_s'])}\n"
            + (f"- distribution proxy ×3, upstream bytes / blob: "
               f"{c.fmt_spread(cd['distribution_bytes_ratio'])}; MB/s per client: "
               f"{c.fmt_spread(cd['distribution_client_mb_per_s'])}\n" if dist else "")
            + "\n")


def render_warm(results: dict) -> str:
    w = results["warm"]
    rows = []
    for name in WARM_PATHS:
        s = w["summary"][name]
        rows.append([WARM_LABELS[name], str(s["mb_per_s"]["median"]),
                     f"{s['mb_per_s']['min']}–{s['mb_per_s']['max']}",
                     ", ".join(str(x) for x in s["mb_per_s"]["all"]),
                     c.fmt_spread(s["cpu_s_per_gb"]),
                     c.fmt_spread(s["rgw_cpu_s_per_gb"]) if name == "bucket" else "–",
                     f"{s['failed']}/{s['pulls']}"])
    t = c.table(["path", "MB/s median", "min–max", "every pull (MB/s)",
                 "server CPU s/GB median (min–max)", "RGW CPU s/GB", "failed"], rows)
    r = c.table(["ratio", "of the medians", "per round: median (min–max)"],
                [["(a) local disk / (c) nginx", str(w["local_ratio"]),
                  c.fmt_spread(w["local_ratio_per_round"])],
                 ["(b) bucket / (c) nginx", str(w["bucket_ratio"]),
                  c.fmt_spread(w["bucket_ratio_per_round"])]])
    u = w["upstream_during_warm_pulls"]
    reads = [p.get("node_store_read_bytes", 0) for p in w["pulls"] if p["path"] == "bucket"]
    return (f"## 2. warm: one client, after one pull\n\n"
            f"`curl --http1.1 -o /dev/null` over plain HTTP, {results['rounds']} pulls of each "
            f"path, order rotated every round, after one unmeasured pull from (a) and (c). The "
            f"first pull through node 0 ({w['first_pull_mb_per_s']} MB/s, hashed by the "
            f"client) filled its disk and the bucket. (b): node 1 is restarted with an empty "
            f"disk before each of its pulls; bytes it read from the bucket per pull (its "
            f"`docxy_store_read_bytes_total`): {', '.join(str(int(x)) for x in reads)}. "
            f"Server CPU: the node's process, nginx's worker; RGW CPU: radosgw + ceph-osd.\n\n"
            f"{t}\n{r}\n"
            f"Upstream during the measured pulls: {u['cdn_blob_gets']} CDN GETs of the blob "
            f"(must be 0), front requests {u['front_by_method'] or 'none'}. No target; "
            f"checks (no failed pull, nothing from the CDN, (b) read from the bucket): "
            f"{verdict(w['met'])}.\n\n")


def render_failover(results: dict) -> str:
    f = results["failover"]
    rows = []
    for x in f["rounds"]:
        for fo in x["followers"]:
            rows.append([str(x["round"] + 1), f"node {fo['node']}",
                         f"{fo['bytes_at_kill'] / c.MiB:.1f}", str(fo["longest_gap_s"]),
                         str(fo["flowing_again_at_s"]), str(fo["completed_after_kill_s"]),
                         "yes" if fo["ok"] else f"NO ({fo.get('error') or fo.get('bytes')})",
                         str(x["upstream"]["bytes_ratio"]), str(x["upstream"]["cdn_blob_gets"]),
                         f"{x['lease_takeovers']:.0f}"])
    t = c.table(["round", "follower", "MiB at the kill", "longest gap after the kill s",
                 "bytes flowing again at +s", "complete at +s", "right digest",
                 "upstream bytes / blob", "CDN GETs", "lease takeovers"], rows)
    kills = "; ".join(f"round {x['round'] + 1}: killed {x['killed_after_s']} s after node 0's "
                      f"pull began, its client had {x['lead_client_bytes_at_kill'] / c.MiB:.0f} "
                      f"MiB and ended with {x['lead_client'].get('error') or 'no error'}"
                      for x in f["rounds"])
    return (f"## 3. failover: the leader killed mid-download\n\n"
            f"The CDN throttled to `limit_rate {f['slow_rate']}` per connection (nginx; "
            f"`harness.cdn` mode `slow`); a fresh cluster every round; a pull on node 0 (the "
            f"leader), then pulls on nodes 1 and 2; once both have more than "
            f"{f['rounds'][0]['kill_after_bytes'] // c.MiB} MiB, node 0 gets SIGKILL. Gap = "
            f"the longest time without a byte at a follower's client after the kill (from the "
            f"kill to the first read, then between reads); \"flowing again\" = when that gap "
            f"ended. {kills}.\n\n{t}\n"
            f"- longest gap after the kill: {c.fmt_spread(f['longest_gap_s'], ' s')} (target "
            f"< {f['target_gap_s']} s); upstream bytes / blob: {c.fmt_spread(f['bytes_ratio'])} "
            f"(target < {f['target_bytes_ratio']}); both followers complete with the right "
            f"digest: {verdict(f['met'])} (all targets of this part)\n\n")


def render(results: dict) -> str:
    command = (f"python bench/cluster.py --parts {','.join(results['parts'])} --size-mb "
               f"{results['size_mib']} --rounds {results['rounds']} --clients-per-node "
               f"{results['clients_per_node']}")
    if "failover" in results["parts"]:
        command += f" --slow-rate {results['slow_rate']} --kill-after-mb {results['kill_after_mb']}"
    if results.get("no_distribution"):
        command += " --no-distribution"
    command += c.extra_flags(results)
    info = results["machine"]
    out = ["# docxy cluster mode: 3 nodes, one bucket, one Redis\n\n",
           f"Command: `{command}`\n\n", c.machine_markdown(info),
           f"- also: {info['redis']}; {info['ceph']}\n",
           f"- run time {results['run_seconds']} s; MB = 10^6 bytes, MiB = 2^20\n",
           f"- path measured: the suite's Hub-like upstream (`tests/harness/upstream.py`): "
           f"a TLS registry (distribution behind an nginx TLS front), token auth (RS256 JWTs "
           f"from a TLS token service), blob GETs answered 307 to a TLS CDN (nginx, another "
           f"host name); the blob is the large layer of `{hub.REPOSITORY}`, "
           f"{results['blob_bytes']} bytes ({results['blob_digest']}). docxy nodes "
           f"(`harness.cluster.Cluster`: `--store s3://<bucket>/mirror --s3-endpoint <RGW> "
           f"--cluster redis://127.0.0.1:P/DB --cluster-secret --node-listen --node-url`, "
           f"each with its own `--cache-dir`) on a Ceph RGW (`tests/harness/ceph.py`: one "
           f"monitor, one bluestore OSD on a sparse file, radosgw beast, all on loopback) and "
           f"one redis-server (`tests/harness/redisd.py`); clients on plain HTTP to the "
           f"nodes. Everything on one 2-core machine.\n\n"]
    if "cold" in results:
        out.append(render_cold(results))
    if "warm" in results:
        out.append(render_warm(results))
    if "failover" in results:
        out.append(render_failover(results))
    return "".join(out)


def all_met(results: dict) -> bool:
    return all(results[p]["met"] for p in ALL_PARTS if p in results)


def main(argv=None) -> int:
    return c.run_benchmark(parse_args(argv), run, render, all_met)


if __name__ == "__main__":
    sys.exit(main())
