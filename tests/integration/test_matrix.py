"""The client x scenario matrix: every real client pulls every kind of image through docxy in
every situation a fleet meets, and gets the upstream's digests.

Clients: dockerd (`registry-mirrors`), containerd (`ctr` with a hosts directory), podman
(a registries.conf mirror) and skopeo (the same, `skopeo copy --all`). Images: a single-arch
Docker v2 manifest, a Docker manifest list and an OCI index, each layer holding 2 MiB that do
not compress. docxy runs as users run it: over TLS (a certificate every client trusts), cache
on, pass-through auth (clients follow docxy's challenge to its /auth/token), in front of the
Hub-like upstream (TLS registry with token auth, blob GETs redirected to a TLS CDN, here
reached through a TCP cutter).

Each (client, scenario) gets a fresh docxy, and its stage is set the way a user sets it: one
client pulls the three images once, in its own order of requests (dockerd and containerd
resolve a tag with HEAD and then GET by digest; podman and skopeo GET the tag), then the fault
comes, then each cell pulls one image with a fresh client. Scenarios:

- cold: that first pull itself; its blobs came from the CDN and are now in docxy's cache.
- warm: a fresh client pulls again; no blob is fetched from the CDN again.
- outage: the registry (and its front), the CDN and the token service are stopped.
- rate_limited: the registry answers 429 TOOMANYREQUESTS to every /v2/<name>/ request.
- token_down: the token service is stopped.
- cut: the first pull runs while every CDN connection is cut after 1 MiB; docxy resumes.
"""
from __future__ import annotations

import re
import shutil
import ssl
import tempfile
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from harness.clients import ClientError, Containerd, DockerDaemon, Podman, Skopeo
from harness.daemon import Docxy, cached_blob, mirror_args
from harness.faultfront import FaultFront
from harness.images import Image, Manifest
from harness.procs import poll_until, port_open
from harness.upstream import Upstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

CLIENTS = ("dockerd", "containerd", "podman", "skopeo")
IMAGES = ("alpine", "multiarch", "oci_index")  # ImageSet attributes
PLATFORM = "amd64"  # what dockerd, ctr (--platform linux/amd64) and podman pick here
CUT_BUDGET = 1 << 20  # bytes per CDN connection in "cut"; every layer is over 2 MiB
PULL_TIMEOUT = 90.0  # a pull takes seconds here; three of them fit the test's timeout
LOG_TAIL = 60


# --- the clients, behind one shape ------------------------------------------------------

@dataclass(frozen=True)
class Pulled:
    """What one client pull gave: the digest the reference resolved to, the local image id
    where the client has one (the config digest of the platform's manifest), the blobs
    stored where the client shows them (skopeo), and the client's output."""

    digest: str
    image_id: str | None
    blobs: frozenset[str] | None
    output: str = field(repr=False)


class Client:
    """One instance of a client (fresh state in `workdir`) with docxy as its docker.io mirror."""

    def __init__(self, kind: str, workdir: Path, mirror: str, ca_path: Path) -> None:
        self.kind = kind
        mirrors = {"docker.io": [mirror]}
        if kind == "dockerd":
            # dockerd retries a failed layer itself, resuming with Range (by default 4 more
            # times, 5-20 s apart): a failure docxy promised never to show would be hidden.
            # 20.10 still retries once with 1 (its lowest value); pull() reports that retry.
            self.driver: Any = DockerDaemon(workdir, mirrors=[mirror], ca_path=ca_path,
                                            extra_config={"max-download-attempts": 1})
        elif kind == "containerd":
            self.driver = Containerd(workdir, mirrors=mirrors, ca_path=ca_path)
        elif kind == "podman":
            self.driver = Podman(workdir, mirrors=mirrors, ca_path=ca_path)
        elif kind == "skopeo":
            self.driver = Skopeo(workdir, mirrors=mirrors, ca_path=ca_path)
        else:
            raise ValueError(kind)

    def __enter__(self) -> "Client":
        self.driver.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.driver.__exit__(*exc)

    def pull(self, image: Image) -> Pulled:
        """Pull `image` as its users name it: `alpine:latest` for dockerd (mirrors serve
        docker.io only), `docker.io/library/alpine:latest` for the others."""
        if self.kind == "dockerd":
            offset = len(self.driver.log_text())
            r = self.driver.pull(f"{image.short_name}:{image.tag}", timeout=PULL_TIMEOUT)
            # "Download failed, retrying (1/1): ..." goes to the daemon's log, not the CLI's
            retried = [line for line in self.driver.log_text()[offset:].splitlines()
                       if "retrying" in line.lower()]
            return Pulled(r.digest, r.image_id, None, "\n".join([r.output, *retried]))
        ref = f"docker.io/{image.ref}"
        if self.kind == "containerd":
            r = self.driver.pull(ref, platform=f"linux/{PLATFORM}", timeout=PULL_TIMEOUT)
            return Pulled(r.digest, None, None, r.output)
        if self.kind == "podman":
            r = self.driver.pull(ref, timeout=PULL_TIMEOUT)
            return Pulled(r.digest, r.image_id, None, r.output)
        copied = self.driver.copy(ref, all=True, timeout=PULL_TIMEOUT)
        return Pulled(copied.digest, None, frozenset(copied.blobs), copied.output)


def _platform_manifest(image: Image) -> Manifest:
    m = image.manifest
    return m.child_for(PLATFORM) if m.is_index else m


def expected_blobs(kind: str, image: Image) -> set[str]:
    """The blobs a pull by `kind` fetches: every platform's with skopeo --all, else amd64's."""
    if kind == "skopeo":
        return {b.digest for b in image.blobs}
    return {b.digest for b in _platform_manifest(image).blobs}


def assert_digests(kind: str, image: Image, pulled: Pulled, what: str) -> None:
    """The reference resolved to the upstream's digest; the image id is the platform
    config's; skopeo stored exactly the image's blobs; podman never had to retry."""
    assert pulled.digest == image.digest, \
        f"{what}: {kind} resolved {image.ref} to {pulled.digest}, the upstream has {image.digest}"
    if pulled.image_id is not None:
        config = _platform_manifest(image).config
        assert config is not None
        assert pulled.image_id == config.digest, \
            f"{what}: {kind} image id {pulled.image_id}, the upstream config is {config.digest}"
    if pulled.blobs is not None:
        expected = expected_blobs(kind, image)
        assert pulled.blobs == expected, \
            f"{what}: skopeo stored {sorted(pulled.blobs)}, expected {sorted(expected)}"
    # podman (libimage) retries a failed copy 3 times, 1 s apart, and says so on stderr;
    # dockerd's retries are in its log, which Client.pull adds to the output
    assert "retrying" not in pulled.output.lower(), \
        f"{what}: {kind} saw a failure and retried:\n{pulled.output[-3000:]}"


# --- the upstream -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """The matrix's own Hub-like upstream: small images whose layers can be cut mid-body,
    the CDN behind a cutter."""
    upstream = Upstream.start(tmp_path_factory.mktemp("matrix-upstream"),
                              large_layer_size=1 << 20, image_padding=2 << 20,
                              cdn_cutter=True)
    try:
        assert upstream.cutter is not None
        for name in IMAGES:  # the premise of "cut": every layer is cut at least once
            for blob in getattr(upstream.images, name).manifest.blobs:
                if "tar" in blob.media_type:
                    assert blob.size > 2 * CUT_BUDGET, (name, blob)
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def docxy_cert(up: Upstream) -> tuple[Path, Path]:
    """docxy's certificate (chain, key), from the upstream's CA, which every client trusts.
    Over plain HTTP podman and skopeo first try TLS, and docxy holds that handshake until
    its request timeout (30 s) while they give up after 10 s: 10 s lost on every pull."""
    cert = up.intermediate_ca.issue_server("docxy-matrix", ["127.0.0.1", "localhost"])
    return cert.chain_path, cert.key_path


def _get(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def assert_healthy(up: Upstream) -> None:
    """Registry (through its front), token service and CDN all answer, on their own ports."""
    context = up.ssl_context()
    assert _get(f"{up.registry_url}/v2/", context) == 401, "the registry front is not healthy"
    assert up.fetch_token([up.pull_scope("library/alpine")]), "the token service is not healthy"
    assert _get(f"{up.cdn.url}/health", context) == 200, "the CDN is not healthy"
    assert up.cutter.running() and up.cutter.budget is None and not up.cutter.plan, \
        "the cutter is not passing connections through"


def _token_running(up: Upstream) -> bool:
    return up.token_server.process.running()


def restore(up: Upstream) -> None:
    """Undo any fault: the same processes on the same ports, the cutter passing through."""
    up.cutter.budget = None
    up.start_registry()
    if not up.cdn.running():
        up.cdn.start()
    if not up.cutter.running():
        up.cutter.start()
    if not _token_running(up):
        up.token_server.start()


# --- the stage: one docxy, one first pull of each image, then the fault -----------------

@dataclass
class FirstPull:
    """The first pull of one image on a stage: the result or the error, where the CDN's log
    stood when it began, how many connections the cutter cut and what docxy logged while it
    ran."""

    pulled: Pulled | None
    error: str | None
    cdn_since: int  # the CDN's log entries before it began
    cuts: int
    docxy_log: str = field(repr=False)  # what docxy logged while it ran


@dataclass
class Stage:
    scenario: str
    kind: str
    up: Upstream
    docxy: Docxy
    cache: Path
    clients_dir: Path
    fault_front: FaultFront | None
    first: dict[str, FirstPull] = field(default_factory=dict)

    def image(self, name: str) -> Image:
        return getattr(self.up.images, name)

    def docxy_tail(self, since: int = 0) -> str:
        """What docxy logged after character `since`, without the connection pool's chatter."""
        lines = [line for line in self.docxy.log()[since:].splitlines()
                 if "_HTTP11ClientFactory" not in line]
        return "\n".join(lines[-LOG_TAIL:])

    def pull(self, name: str, label: str) -> Pulled:
        """One pull of image `name` by a fresh client; a failure shows the client's error and
        what docxy logged meanwhile."""
        since = len(self.docxy.log())
        try:
            with Client(self.kind, self.clients_dir / f"{label}-{name}", self.docxy.url,
                        self.up.ca_path) as c:
                return c.pull(self.image(name))
        except ClientError as e:
            raise AssertionError(
                f"{label} pull of {self.image(name).ref} by a fresh {self.kind} failed "
                f"({self.scenario}):\n{e}\n--- docxy log meanwhile:\n{self.docxy_tail(since)}"
            ) from None

    def assert_fault_holds(self) -> None:
        """The scenario's fault is still in place (nothing between the cells undid it)."""
        up = self.up
        registry = port_open(up.front.interface, up.front.port)
        cdn = port_open(up.cdn.interface, up.cdn.port) and up.cutter.running()
        token = port_open(up.token_server.config.interface, up.token_server.config.port)
        if self.scenario == "outage":
            assert not (registry or cdn or token), (registry, cdn, token)
        elif self.scenario == "rate_limited":
            assert self.fault_front is not None and self.fault_front.running()
            assert self.fault_front.mode == "429" and registry and cdn and token
        elif self.scenario == "token_down":
            assert registry and cdn and not token, (registry, cdn, token)
        else:
            assert registry and cdn and token, (registry, cdn, token)

    def first_pull(self, name: str) -> Pulled:
        """The stage's first pull of `name`, which must have succeeded."""
        first = self.first[name]
        if first.pulled is None:
            raise AssertionError(f"the first pull of {self.image(name).ref} by {self.kind} "
                                 f"({self.scenario} stage) failed:\n{first.error}")
        assert_digests(self.kind, self.image(name), first.pulled, "first pull")
        return first.pulled

    def cdn_entries(self, name: str, since: int) -> list[dict[str, Any]]:
        """CDN requests for the blobs this client fetches of `name`, after entry `since`."""
        hexes = [d.split(":", 1)[1] for d in expected_blobs(self.kind, self.image(name))]
        return [e for e in self.up.cdn_log_entries()[since:]
                if any(h in e["uri"] for h in hexes)]


def _set_the_stage(stage: Stage) -> None:
    up = stage.up
    if stage.scenario == "cut":
        up.cutter.budget = CUT_BUDGET
    with Client(stage.kind, stage.clients_dir / "first", stage.docxy.url,
                up.ca_path) as client:
        for name in IMAGES:
            cdn_before = len(up.cdn_log_entries())
            cuts_before = up.cutter.counters()["cuts"]
            since = len(stage.docxy.log())
            pulled, error = None, None
            try:
                pulled = client.pull(stage.image(name))
            except ClientError as e:
                error = f"{e}\n--- docxy log meanwhile:\n{stage.docxy_tail(since)}"
            cuts = up.cutter.counters()["cuts"] - cuts_before
            stage.first[name] = FirstPull(pulled, error, cdn_before, cuts,
                                          stage.docxy.log()[since:])
    up.cutter.budget = None
    if stage.scenario == "outage":
        up.stop_registry()
        up.cdn.stop()
        up.cutter.stop()  # the CDN's address refuses connections, as the CDN's own does
        up.token_server.stop()
    elif stage.scenario == "rate_limited":
        assert stage.fault_front is not None
        stage.fault_front.set_mode("429")
    elif stage.scenario == "token_down":
        up.token_server.stop()


@pytest.fixture(scope="module")
def stage(request: pytest.FixtureRequest, up: Upstream, docxy_cert: tuple[Path, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """A fresh docxy for one (scenario, client), the first pull of every image by one client,
    then the scenario's fault; afterwards the upstream is healthy again."""
    scenario, kind = request.param
    assert_healthy(up)
    workdir = tmp_path_factory.mktemp(f"matrix-{scenario}-{kind}")
    # containerd's socket paths must stay short: the clients live under /tmp directly
    clients_dir = Path(tempfile.mkdtemp(prefix="dxm-", dir="/tmp"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, clients_dir, True)
        stack.callback(restore, up)
        fault_front = None
        url = None
        if scenario == "rate_limited":
            fault_front = FaultFront(workdir / "fault-front", up.registry_url, up.registry_cert)
            stack.enter_context(fault_front)
            url = fault_front.url
        cache = workdir / "cache"
        docxy = stack.enter_context(Docxy(workdir / "docxy",
                                          mirror_args(up, cache=cache, url=url), tls=docxy_cert))
        s = Stage(scenario, kind, up, docxy, cache, clients_dir, fault_front)
        _set_the_stage(s)
        yield s
    assert_healthy(up)


def _stages(scenario: str) -> list[Any]:
    return [pytest.param((scenario, kind), id=kind) for kind in CLIENTS]


image_names = pytest.mark.parametrize("name", IMAGES)


# --- the cells ----------------------------------------------------------------------------

@image_names
@pytest.mark.parametrize("stage", _stages("cold"), indirect=True)
def test_cold_pull(stage: Stage, name: str) -> None:
    """The first pull through a fresh docxy gets the upstream's digests; every blob came from
    the CDN through docxy and is in its cache."""
    stage.first_pull(name)
    blobs = expected_blobs(stage.kind, stage.image(name))
    # nothing but this pull fetched these blobs on this stage: the log may be read now
    entries = stage.cdn_entries(name, stage.first[name].cdn_since)
    gets = {d: [(e["status"], e["completion"]) for e in entries
                if e["method"] == "GET" and d.split(":", 1)[1] in e["uri"]] for d in blobs}
    assert all(g == [(200, "OK")] for g in gets.values()), \
        f"each blob must be fetched from the CDN once, whole: {gets}"
    missing = [d for d in blobs if not cached_blob(stage.cache, d).exists()]
    assert not missing, f"not in docxy's cache: {missing}"
    # the premise of the other scenarios: each client asked for the tag its own way
    image = stage.image(name)
    log = stage.first[name].docxy_log
    # docxy's access lines: "<client> <METHOD> docker.io/<name> <reference> <status> ..."
    asked = set(re.findall(rf"\[docxy\.access#\w+\] \S+ (HEAD|GET) docker\.io/"
                           rf"{re.escape(image.repository)} {re.escape(image.tag)} ", log))
    expected = {"HEAD"} if stage.kind in ("dockerd", "containerd") else {"GET"}
    assert asked == expected, \
        f"{stage.kind} asked for the tag with {asked}, not {expected}; docxy logged:\n{log[-3000:]}"


@image_names
@pytest.mark.parametrize("stage", _stages("warm"), indirect=True)
def test_warm_pull(stage: Stage, name: str) -> None:
    """A fresh client pulling what one pull brought in gets the upstream's digests, and no
    blob is fetched from the CDN again."""
    stage.first_pull(name)
    stage.assert_fault_holds()
    before = len(stage.up.cdn_log_entries())
    pulled = stage.pull(name, "warm")
    assert_digests(stage.kind, stage.image(name), pulled, "warm pull")
    again = stage.cdn_entries(name, before)
    assert not again, f"the warm pull went to the CDN: {again}"


@image_names
@pytest.mark.parametrize("stage", _stages("outage"), indirect=True)
def test_outage_after_one_pull(stage: Stage, name: str) -> None:
    """After exactly one pull by this client, with registry, CDN and token service down, a
    fresh client still pulls the image with the upstream's digests."""
    stage.first_pull(name)
    stage.assert_fault_holds()
    pulled = stage.pull(name, "outage")
    assert_digests(stage.kind, stage.image(name), pulled, "pull during the outage")


@image_names
@pytest.mark.parametrize("stage", _stages("rate_limited"), indirect=True)
def test_rate_limited_after_one_pull(stage: Stage, name: str) -> None:
    """After one pull, with the registry answering 429 to every /v2/<name>/ request, a
    fresh client still pulls the image with the upstream's digests."""
    stage.first_pull(name)
    stage.assert_fault_holds()
    assert stage.fault_front is not None
    before = len(stage.fault_front.entries())
    pulled = stage.pull(name, "rate-limited")
    assert_digests(stage.kind, stage.image(name), pulled, "pull while rate limited")
    front, repository = stage.fault_front, stage.image(name).repository
    try:
        poll_until(lambda: [e for e in front.entries()[before:]
                            if e["status"] == 429 and f"/v2/{repository}/" in e["uri"]],
                   timeout=5)
    except TimeoutError:
        raise AssertionError("the upstream was never asked: no 429 was exercised") from None


@image_names
@pytest.mark.parametrize("stage", _stages("token_down"), indirect=True)
def test_token_service_down_after_one_pull(stage: Stage, name: str) -> None:
    """After one pull, with the token service down (registry and CDN up), a fresh client
    still pulls the image with the upstream's digests."""
    stage.first_pull(name)
    stage.assert_fault_holds()
    pulled = stage.pull(name, "token-down")
    assert_digests(stage.kind, stage.image(name), pulled, "pull with the token service down")


@image_names
@pytest.mark.parametrize("stage", _stages("cut"), indirect=True)
def test_cut_mid_blob_resumes(stage: Stage, name: str) -> None:
    """A first pull while every CDN connection is cut after 1 MiB still succeeds with the
    upstream's digests: the cutter did cut this image's layers, and docxy resumed."""
    first = stage.first[name]
    stage.first_pull(name)
    assert first.cuts > 0, "the cutter never cut a transfer of this image"
    assert "resum" in first.docxy_log.lower(), \
        f"docxy logged no resume during this pull:\n{first.docxy_log[-4000:]}"
