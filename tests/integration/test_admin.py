"""The operator's handles on the cache, driven with the `docxy` command against a daemon's
--admin-listen, in the order an operator uses them: warm an image before a rollout, the
upstream goes away, a fresh dockerd still pulls it; `cache ls` shows it; `cache rm`
removes it (a layer another image shares stays) and the next pull goes upstream again;
`cache gc` removes what nothing names; retention expires what was not pulled, never
what a running pull uses."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from harness import images as images_mod
from harness.admin import run_cli
from harness.clients import ClientError, DockerDaemon, Skopeo
from harness.daemon import Docxy, cached_blob, mirror_args
from harness.procs import free_port, poll_until
from harness.upstream import Upstream

pytestmark = pytest.mark.integration


def _blob_gets(up: Upstream, digests, since: int = 0) -> list[str]:
    hexes = {d.split(":")[1]: d for d in digests}
    return [hexes[h] for e in up.cdn_log_entries()[since:] for h in hexes
            if h in e["uri"] and e.get("status") in (200, 206, "200", "206")]


def _shared_pair(up: Upstream, workdir):
    """Two images, library/sharea and library/shareb, with one layer in common."""
    shared, shared_diff = images_mod.make_layer({"usr/share/common.txt": b"both images\n"})
    pair = []
    for label in ("sharea", "shareb"):
        own, own_diff = images_mod.make_layer({f"{label}.txt": f"only {label}\n".encode()})
        config = images_mod.make_config([shared_diff, own_diff], label=f"library/{label}")
        manifest = images_mod.make_image_manifest(config, [shared, own])
        pair.append(images_mod.Image(f"library/{label}", ("latest",), manifest))
    up.restart_registry(auth=False)
    with images_mod.RegistryClient(up.registry_internal_url) as client:
        for image in pair:
            client.push_image(image)
    up.restart_registry(auth=True)
    return pair[0], pair[1], shared


@pytest.fixture
def up(short_tmp):
    upstream = Upstream.start(short_tmp / "up", large_layer_size=24 << 20)
    yield upstream
    upstream.stop()


def _admin_daemon(up, workdir, *extra):
    port = free_port()
    args = mirror_args(up, "--admin-listen", f"tcp:{port}:interface=127.0.0.1",
                       "--header-timeout", "10", "--connect-timeout", "5", *extra)
    return Docxy(workdir, args), f"http://127.0.0.1:{port}"


def _metric(admin: str, name: str) -> float:
    """A value of the admin listener's /metrics."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _listed(admin: str) -> set[tuple[str, str | None]]:
    ran = run_cli(admin, "cache", "ls", "--json")
    assert ran.code == 0, ran.err
    return {(r["repository"], r["tag"]) for r in ran.json()["images"]}


def test_warm_then_outage_then_ls_rm_gc(up, short_tmp):
    images = up.images
    daemon, admin = _admin_daemon(up, short_tmp / "docxy")
    with daemon as docxy:
        # --- warm a multi-arch image (every platform) and one platform of an OCI index
        before = len(up.cdn_log_entries())
        warmed = run_cli(admin, "warm", "docker.io/library/multiarch:latest")
        assert warmed.code == 0, warmed.err
        assert "Pull complete" in warmed.err and images.multiarch.digest in warmed.err
        every_blob = {b.digest for child in images.multiarch.manifest.children
                      for b in child.blobs}
        assert sorted(_blob_gets(up, every_blob, before)) == sorted(every_blob)

        before = len(up.cdn_log_entries())
        arm = images.oci_index.manifest.child_for("arm64")
        amd = images.oci_index.manifest.child_for("amd64")
        warmed = run_cli(admin, "warm", "--json", "--platform", "linux/arm64",
                         f"docker.io/{images.oci_index.repository}:latest")
        assert warmed.code == 0, warmed.err
        events = [json.loads(line) for line in warmed.out.splitlines()]
        assert events[-1]["event"] == "done" and events[-1]["digest"] == images.oci_index.digest
        assert events[-1]["blobs"] == len(arm.blobs)
        fetched = set(_blob_gets(up, {b.digest for b in arm.blobs + amd.blobs}, before))
        assert fetched == {b.digest for b in arm.blobs}

        # a second warm-up of a cached image downloads nothing: its tag costs one HEAD
        before, asked = len(up.cdn_log_entries()), len(up.registry_log_entries())
        again = run_cli(admin, "warm", "--json", "docker.io/library/multiarch:latest")
        assert again.code == 0 and json.loads(again.out.splitlines()[-1])["downloaded"] == 0
        assert _blob_gets(up, every_blob, before) == []
        manifests = [e["method"] + " " + e["uri"] for e in up.registry_log_entries()[asked:]
                     if "/multiarch/manifests/" in e["uri"] and e["status"] != 401]
        assert manifests == ["HEAD /v2/library/multiarch/manifests/latest"], manifests

        # bad input: a clear error and a usage exit code; nothing unreachable hangs
        bad = run_cli(admin, "warm", "docker.io/Not Valid:tag")
        assert bad.code == 2 and "not a repository name" in bad.err
        missing = run_cli(admin, "warm", "docker.io/library/nosuchimage:latest")
        assert missing.code == 1 and "404" in missing.err

        # --- the upstream goes away: a fresh dockerd pulls the warmed image
        up.stop_registry()
        up.cdn.stop()
        up.token_server.stop()
        with DockerDaemon(short_tmp / "docker", mirrors=[docxy.url]) as docker:
            assert docker.pull("multiarch:latest").digest == images.multiarch.digest

        # --- cache ls
        listed = run_cli(admin, "cache", "ls", "--json")
        assert listed.code == 0, listed.err
        rows = {(r["repository"], r["tag"]): r for r in listed.json()["images"]}
        multi = rows[("library/multiarch", "latest")]
        assert multi["registry"] == "docker.io" and multi["digest"] == images.multiarch.digest
        assert multi["size"] == sum(b.size for c in images.multiarch.manifest.children
                                    for b in c.blobs)
        assert multi["stored"] == multi["size"]
        assert multi["pulls"] >= 1 and multi["last_pull"] > time.time() - 600
        assert sorted(multi["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
        oci = rows[("library/ocimulti", "latest")]
        assert oci["pulls"] == 0 and oci["stored"] == sum(b.size for b in arm.blobs)
        table = run_cli(admin, "cache", "ls", "--registry", "docker.io")
        assert table.code == 0
        assert any("library/multiarch" in line and "latest" in line
                   for line in table.out.splitlines()[1:])
        unknown = run_cli(admin, "cache", "ls", "--registry", "nowhere.example")
        assert unknown.code == 2 and "does not mirror" in unknown.err

        # --- cache rm: the tag and its blobs go; pulling it needs the upstream again
        removed = run_cli(admin, "cache", "rm", "--json", "docker.io/library/ocimulti:latest")
        assert removed.code == 0, removed.err
        assert removed.json()["tags"] == ["docker.io/library/ocimulti:latest"]
        for blob in arm.blobs:
            assert not cached_blob(docxy.workdir / "cache", blob.digest).exists()
        for child in images.multiarch.manifest.children:
            for blob in child.blobs:
                assert cached_blob(docxy.workdir / "cache", blob.digest).exists()
        nothing = run_cli(admin, "cache", "rm", "docker.io/library/ocimulti:latest")
        assert nothing.code == 1 and "nothing cached" in nothing.err
        with Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
            with pytest.raises(ClientError):
                skopeo.copy(f"{docxy.host}/{images.oci_index.ref}", timeout=90)
        up.start_registry()
        up.cdn.start()
        up.token_server.start()
        before = len(up.cdn_log_entries())
        with Skopeo(short_tmp / "skopeo2", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{docxy.host}/{images.oci_index.ref}").digest == amd.digest
        assert _blob_gets(up, {b.digest for b in amd.blobs}, before)


def test_a_shared_layer_stays_until_neither_image_needs_it_and_gc(up, short_tmp):
    a, b, shared = _shared_pair(up, short_tmp)
    daemon, admin = _admin_daemon(up, short_tmp / "docxy")
    with daemon as docxy:
        cache = docxy.workdir / "cache"
        for image in (a, b):
            assert run_cli(admin, "warm", f"docker.io/{image.repository}:latest").code == 0
        removed = run_cli(admin, "cache", "rm", f"docker.io/{a.repository}@{a.digest}")
        assert removed.code == 0, removed.err
        assert "Untagged: docker.io/library/sharea:latest" in removed.out
        assert cached_blob(cache, shared.digest).exists(), "the layer b still uses went"
        own_a = [x for x in a.manifest.blobs if x.digest != shared.digest]
        assert all(not cached_blob(cache, x.digest).exists() for x in own_a)
        assert all(cached_blob(cache, x.digest).exists() for x in b.manifest.blobs)
        # the pull of a goes upstream for its own blobs, not for the one b kept
        before = len(up.cdn_log_entries())
        with Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{docxy.host}/sharea:latest").digest == a.digest
        assert sorted(_blob_gets(up, {x.digest for x in a.manifest.blobs}, before)) == \
            sorted(x.digest for x in own_a)
        # removing b by its digest alone now leaves the shared layer to a
        assert run_cli(admin, "cache", "rm", b.digest).code == 0
        assert cached_blob(cache, shared.digest).exists()
        # gc: a blob pulled on its own (no cached manifest names it) goes, nothing else
        lone = up.images.nested.manifest.layers[0]
        token = up.fetch_token([f"repository:{up.images.nested.repository}:pull"])
        request = urllib.request.Request(
            f"{docxy.url}/v2/{up.images.nested.repository}/blobs/{lone.digest}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(response.read()) == lone.size
        poll_until(lambda: cached_blob(cache, lone.digest).exists(), 10)
        collected = run_cli(admin, "cache", "gc", "--json")
        assert collected.code == 0, collected.err
        assert collected.json()["blobs"] == [lone.digest]
        assert not cached_blob(cache, lone.digest).exists()
        assert all(cached_blob(cache, x.digest).exists() for x in a.manifest.blobs)


def test_retention_expires_only_what_was_not_pulled_and_never_a_running_pull(up, short_tmp):
    """max_age 4 s, keep org/*: a pulled image expires (the layer a kept image shares
    stays); the large image, whose slow pull runs during several sweeps, is kept and its
    pull completes with the right digest."""
    a, b, shared = _shared_pair(up, short_tmp)
    config = short_tmp / "docxy.toml"
    config.write_text('retention_interval = "1s"\n[upstream."docker.io"]\n'
                      'max_age = "4s"\nkeep = ["library/shareb", "org/*"]\n')
    daemon, admin = _admin_daemon(up, short_tmp / "docxy", "--config", str(config))
    with daemon as docxy:
        cache = docxy.workdir / "cache"
        with Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
            for ref in ("sharea:latest", "shareb:latest", up.images.namespaced.ref):
                skopeo.copy(f"{docxy.host}/{ref}")
            up.restart_cdn("slow")  # 1 MB/s: the 24 MB layer takes ~20 s, many sweeps
            result = {}
            pull = threading.Thread(target=lambda: result.update(
                digest=skopeo.copy(f"{docxy.host}/{up.images.large.ref}", timeout=240).digest))
            pull.start()
            own_a = [x for x in a.manifest.blobs if x.digest != shared.digest]
            poll_until(lambda: not any(cached_blob(cache, x.digest).exists() for x in own_a), 30)
            sweeps = docxy.log().count("retention")
            time.sleep(6)  # more sweeps than max_age while the large layer still downloads
            assert pull.is_alive(), "the slow pull ended too soon to test anything"
            assert ("library/large", "latest") in _listed(admin)
            pull.join(timeout=240)
        assert result.get("digest") == up.images.large.digest
        assert cached_blob(cache, shared.digest).exists()
        assert all(cached_blob(cache, x.digest).exists() for x in b.manifest.blobs)
        assert all(cached_blob(cache, x.digest).exists()
                   for x in up.images.namespaced.manifest.blobs)
        listed = _listed(admin)
        assert ("library/sharea", "latest") not in listed
        assert {("library/shareb", "latest"), ("org/app", "latest")} <= listed
        # once its pull has ended, the large image is as old as its last pull: it goes too
        big = max(up.images.large.manifest.layers, key=lambda x: x.size)
        poll_until(lambda: not cached_blob(cache, big.digest).exists(), 30)
        assert sweeps >= 1
        assert "retention for docker.io: removed" in docxy.log()


def test_a_scheduled_warm_up_and_a_client_pulling_at_once_share_one_download(up, short_tmp):
    """[[warm]] warms the large image at the start; a client pulling it meanwhile gets it
    from the same download: the CDN sends the big layer once, and only the client's GET
    counts as a pull."""
    config = short_tmp / "docxy.toml"
    config.write_text('[[warm]]\nimages = ["docker.io/library/large:latest"]\nevery = "1h"\n')
    big = max(up.images.large.manifest.layers, key=lambda x: x.size)
    up.restart_cdn("slow")  # 1 MB/s: the warm-up's download runs for ~20 s
    daemon, admin = _admin_daemon(up, short_tmp / "docxy", "--config", str(config))
    with daemon as docxy:
        time.sleep(8)  # the schedule starts 5 s after the start
        with Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{docxy.host}/{up.images.large.ref}",
                               timeout=240).digest == up.images.large.digest
        poll_until(lambda: "scheduled warm-up of docker.io/library/large:latest" in docxy.log(),
                   60)
        assert _blob_gets(up, {big.digest}) == [big.digest]
        assert cached_blob(docxy.workdir / "cache", big.digest).exists()
        assert _metric(admin, "docxy_cache_joined_downloads_total") >= 1  # the client joined
        ran = run_cli(admin, "cache", "ls", "--json")
        row = next(r for r in ran.json()["images"] if r["repository"] == "library/large")
        assert row["pulls"] == 1 and row["stored"] == row["size"]
