"""Three docxy nodes as one mirror, on a real Ceph RGW bucket and a real Redis, in front
of the Hub-like upstream: one CDN download for the whole cluster however many clients on
however many nodes ask, a leader killed mid-download without a failed pull, nodes
restarted with empty disks served from the bucket, one login and one rate budget for all
nodes, and Redis and the bucket going away and coming back."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from harness.admin import run_cli
from harness.ceph import Rgw
from harness.clients import Containerd, DockerDaemon, Skopeo
from harness.cluster import Cluster
from harness.daemon import cached_blob
from harness.procs import free_port, poll_until
from harness.redisd import RedisServer

pytestmark = pytest.mark.integration

MB = 1 << 20


def _get(url: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _token(base: str, repository: str, headers: dict | None = None) -> str:
    status, _, body = _get(f"{base}/auth/token?service=registry.docker.io&scope="
                           f"repository:{repository}:pull", headers)
    assert status == 200, body
    return json.loads(body)["token"]


def _pull_blob(url: str, token: str, out: dict, rss: list | None = None) -> None:
    h = hashlib.sha256()
    out["read"] = 0
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            out["status"] = r.status
            while chunk := r.read(MB):
                h.update(chunk)
                out["read"] += len(chunk)
        out["digest"] = "sha256:" + h.hexdigest()
    except Exception as e:  # recorded, asserted by the test
        out["error"] = e


def _cdn_gets(upstream, digest: str, since: int = 0) -> list[dict]:
    hex_part = digest.split(":")[1]
    return [e for e in upstream.cdn_log_entries()[since:]
            if hex_part in e["uri"] and e["method"] == "GET" and e["status"] in (200, 206)]


def _metric(node, name: str) -> float:
    text = _get(f"{node.url}/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _bucket_has(cluster, digest: str) -> bool:
    """Whether the cluster's bucket holds the blob (asked with botocore, not docxy)."""
    import botocore.session
    from botocore.exceptions import ClientError

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=cluster.rgw.endpoint, region_name="us-east-1",
        aws_access_key_id=cluster.rgw.access_key, aws_secret_access_key=cluster.rgw.secret_key)
    key = f"{cluster.prefix}/blobs/sha256/{digest.split(':')[1]}"
    try:
        s3.head_object(Bucket=cluster.bucket, Key=key)
        return True
    except ClientError:
        return False


def _large_layer(upstream):
    return max(upstream.images.large.manifest.layers, key=lambda b: b.size)


@pytest.fixture
def cluster(upstream, rgw, redis_server, tmp_path):
    with Cluster(tmp_path / "cluster", upstream, rgw, redis_server) as nodes:
        yield nodes


def test_thirty_cold_pulls_over_three_nodes_make_one_upstream_download(upstream, cluster):
    """30 clients, 10 per node, pull the large layer at once: the CDN serves it once, every
    client gets the right digest, and no node's memory grows by 100 MB."""
    layer = _large_layer(upstream)
    before = len(upstream.cdn_log_entries())
    nodes = cluster.nodes
    tokens = [_token(n.url, "library/large") for n in nodes]
    baselines = [n.rss_bytes() for n in nodes]
    results = [{} for _ in range(30)]
    threads = [threading.Thread(target=_pull_blob, args=(
        f"{nodes[i % 3].url}/v2/large/blobs/{layer.digest}", tokens[i % 3], results[i]))
        for i in range(30)]
    for t in threads:
        t.start()
    peaks = list(baselines)
    while any(t.is_alive() for t in threads):
        peaks = [max(p, n.rss_bytes()) for p, n in zip(peaks, nodes)]
        time.sleep(0.2)
    assert [r.get("digest") for r in results] == [layer.digest] * 30, results
    poll_until(lambda: _cdn_gets(upstream, layer.digest, before), 10)
    assert len(_cdn_gets(upstream, layer.digest, before)) == 1
    for node, peak, base in zip(nodes, peaks, baselines):
        assert peak - base < 100 * MB, f"{node.process.name} grew by {(peak - base) / MB:.0f} MB"
    # The leader put it in the bucket; the followers streamed it from the leader.
    poll_until(lambda: sum(_metric(n, "docxy_store_uploads_total") for n in nodes) >= 1, 30)
    assert sum(_metric(n, "docxy_cluster_peer_bytes_total") for n in nodes) >= 2 * layer.size
    ready = json.loads(_get(f"{nodes[1].url}/ready")[2])
    assert ready["cluster"]["members"] == sorted(f"http://127.0.0.1:{p}" for p in cluster.node_ports)


def test_a_corrupt_upstream_blob_never_enters_the_bucket(upstream, cluster):
    """The CDN sends wrong bytes: the client's connection is aborted and the bucket gets
    nothing; once the CDN is right again the blob is pulled whole and stored."""
    layer = upstream.images.alpine.manifest.layers[0]
    node = cluster.nodes[0]
    url = f"{node.url}/v2/library/alpine/blobs/{layer.digest}"
    token = _token(node.url, "library/alpine")
    upstream.restart_cdn("corrupt")
    try:
        out: dict = {}
        _pull_blob(url, token, out)
        assert out.get("digest") != layer.digest
        assert _metric(node, "docxy_cache_digest_mismatches_total") == 1
    finally:
        upstream.restart_cdn("ok")
    assert _metric(node, "docxy_store_uploads_total") == 0
    assert not _bucket_has(cluster, layer.digest)
    out = {}
    _pull_blob(url, token, out)
    assert out.get("digest") == layer.digest
    poll_until(lambda: _bucket_has(cluster, layer.digest), 30)


def test_leader_killed_mid_download_followers_complete(upstream, cluster):
    """The node leading a slow download is killed (SIGKILL): the pulls on the other two
    nodes complete with the right digest, and the CDN sends less than 1.5 blobs."""
    layer = _large_layer(upstream)
    leader, *followers = cluster.nodes
    upstream.cdn.slow_rate = "40m"
    upstream.restart_cdn("slow")
    try:
        before = len(upstream.cdn_log_entries())
        lead = {}
        lead_thread = threading.Thread(target=_pull_blob, args=(
            f"{leader.url}/v2/large/blobs/{layer.digest}", _token(leader.url, "library/large"), lead))
        lead_thread.start()
        poll_until(lambda: lead.get("read", 0) > 0, 30)
        results = [{} for _ in followers]
        threads = [threading.Thread(target=_pull_blob, args=(
            f"{node.url}/v2/large/blobs/{layer.digest}", _token(node.url, "library/large"), out))
            for node, out in zip(followers, results)]
        for t in threads:
            t.start()
        poll_until(lambda: all(r.get("read", 0) > 20 * MB for r in results), 60)
        killed_at = time.monotonic()
        cluster.kill(0)
        for t in threads:
            t.join(timeout=300)
        lead_thread.join(timeout=30)
        assert [r.get("digest") for r in results] == [layer.digest] * 2, results
        assert lead.get("read", 0) < layer.size, "the dead node's client got a whole body"
        sent = sum(e["body_bytes_sent"] for e in _cdn_gets(upstream, layer.digest, before))
        assert sent < 1.5 * layer.size, f"the CDN sent {sent / layer.size:.2f} blobs"
        took_over = sum(_metric(n, "docxy_cluster_lease_takeovers_total") for n in followers)
        assert took_over == 1
        assert time.monotonic() - killed_at < 120
    finally:
        upstream.restart_cdn("ok")


def test_nodes_restarted_with_empty_disks_serve_from_the_bucket(upstream, cluster, short_tmp):
    """After one skopeo copy through node 0, every node restarts with an empty disk; docker
    pull, ctr pull and skopeo copy through any node are then served from the bucket: the
    CDN sends no blob."""
    image = upstream.images.namespaced
    nodes = cluster.nodes
    with Skopeo(short_tmp / "skopeo-first", tls_verify=False) as skopeo:
        assert skopeo.copy(f"{nodes[0].host}/{image.ref}").digest == image.digest
    poll_until(lambda: _metric(nodes[0], "docxy_store_uploads_total") >= len(image.blobs), 30)
    for i in range(3):
        cluster.restart(i, empty_disk=True)
    before = len(upstream.cdn_log_entries())
    with DockerDaemon(short_tmp / "docker", mirrors=[nodes[1].url]) as docker:
        assert docker.pull(image.ref).digest == image.digest
    with Containerd(short_tmp / "ctr", mirrors={"docker.io": [nodes[2].url]}) as ctr:
        assert ctr.pull(f"docker.io/{image.ref}").digest == image.digest
    with Skopeo(short_tmp / "skopeo", tls_verify=False) as skopeo:
        assert skopeo.copy(f"{nodes[0].host}/{image.ref}").digest == image.digest
    hexes = [b.digest.split(":")[1] for b in image.blobs]
    blob_gets = [e for e in upstream.cdn_log_entries()[before:]
                 if any(h in e["uri"] for h in hexes)]
    assert blob_gets == []
    # a fill is counted once its file is committed, which may be just after the client's last byte
    poll_until(lambda: sum(_metric(n, "docxy_store_read_bytes_total") for n in nodes) > 0, 10)


def test_nodes_sharing_only_the_bucket_serve_each_others_blobs(upstream, rgw, tmp_path, short_tmp):
    """Without --cluster two nodes share the bucket and nothing else: an image pulled
    through node A is served to a client of node B (its own disk empty) with no blob
    from the CDN, and neither node names Redis in /ready."""
    image = upstream.images.nested
    with Cluster(tmp_path / "pair", upstream, rgw, None, count=2, coordinated=False) as pair:
        a, b = pair.nodes
        with Skopeo(short_tmp / "a", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{a.host}/{image.ref}").digest == image.digest
        poll_until(lambda: _metric(a, "docxy_store_uploads_total") >= len(image.blobs), 30)
        before = len(upstream.cdn_log_entries())
        with Skopeo(short_tmp / "b", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{b.host}/{image.ref}").digest == image.digest
        hexes = [blob.digest.split(":")[1] for blob in image.blobs]
        assert [e for e in upstream.cdn_log_entries()[before:]
                if any(h in e["uri"] for h in hexes)] == []
        poll_until(lambda: _metric(b, "docxy_store_read_bytes_total") > 0, 10)
        ready = json.loads(_get(f"{b.url}/ready")[2])
        assert "redis" not in ready["cluster"] and ready["cluster"]["store"]["up"] is True


USER, PASSWORD = "carol", "mirror-password"


def test_login_on_one_node_pull_on_another_and_one_rate_budget(upstream, rgw, redis_server,
                                                                 tmp_path, short_tmp):
    """`docker login` gets its token from node A (the realm every node names) and pulls
    through node B; a token of node A still works on B after both restart; and a rate
    limit of 10/m is one budget across the three nodes."""
    users = tmp_path / "users"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=8)).decode()
    users.write_text(f"{USER}:{hashed}\n")
    credentials = tmp_path / "upstream-credentials"
    credentials.write_text("%s:%s\n" % upstream.user)
    extra = ["--htpasswd", str(users), "--mirror-mode", "--upstream-credentials",
             str(credentials), "--rate-limit", "10/m"]
    cluster = Cluster(tmp_path / "cluster", upstream, rgw, redis_server, extra=extra)
    # Node A's address is the one every node names as its realm (as a load balancer's).
    cluster.add_args("--public-url", cluster.nodes[0].plain_url)
    image = upstream.images.private
    with cluster:
        a, b, c = cluster.nodes
        with DockerDaemon(short_tmp / "docker", insecure_registries=[b.host]) as docker:
            docker.login(b.host, USER, PASSWORD)
            assert docker.pull(f"{b.host}/{image.ref}").digest == image.digest
        basic = {"Authorization": "Basic " + base64.b64encode(
            f"{USER}:{PASSWORD}".encode()).decode()}
        status, _, body = _get(f"{a.url}/auth/token?service=docxy", basic)
        assert status == 200
        token = json.loads(body)["token"]
        cluster.restart(0)
        cluster.restart(1)
        manifest = f"/v2/{image.repository}/manifests/{image.tag}"
        bearer = {"Authorization": f"Bearer {token}", "Accept": image.media_type}
        # The docker pull spent some of carol's budget of 10 a minute (all nodes together):
        # what is left is spent on all three nodes, then every node refuses.
        statuses = [_get(cluster.nodes[i % 3].url + manifest, bearer)[0] for i in range(1, 13)]
        assert statuses[0] == 200, "node A's token was refused by node B after restarts"
        first_refusal = statuses.index(429)
        assert set(statuses[first_refusal:]) == {429}, statuses
        assert 1 <= statuses.count(200) <= 9, statuses


def test_redis_then_bucket_go_away_and_come_back(upstream, tmp_path, short_tmp):
    """Redis stops: pulls go on (each node for itself), /ready says degraded and a metric
    counts it.  Then the bucket stops too: cached images still pull from the local disk
    and a new one is fetched upstream.  Both come back and the nodes use them again,
    without a restart, and the blobs fetched meanwhile are put in the bucket."""
    redis = RedisServer.start(tmp_path / "redis")
    rgw = Rgw.start(tmp_path / "rgw")
    try:
        with Cluster(tmp_path / "cluster", upstream, rgw, redis, count=2) as cluster:
            a, b = cluster.nodes
            alpine, nested = upstream.images.alpine, upstream.images.nested
            with Skopeo(short_tmp / "s1", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{a.host}/{alpine.ref}").digest == alpine.digest
            redis.stop()
            with Skopeo(short_tmp / "s2", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{b.host}/{alpine.ref}").digest == alpine.digest
                assert skopeo.copy(f"{a.host}/{nested.ref}").digest == nested.digest
            ready = json.loads(_get(f"{a.url}/ready")[2])
            assert ready["ready"] and ready["cluster"]["redis"]["up"] is False, ready
            assert any("Redis" in why for why in ready["cluster"]["degraded"])
            assert _metric(a, "docxy_cluster_redis_up") == 0
            assert _metric(a, "docxy_cluster_redis_errors_total") > 0
            rgw.stop_gateway()
            fresh = upstream.images.paginated  # in neither node's disk, nor in the bucket
            with Skopeo(short_tmp / "s3", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{a.host}/{alpine.ref}").digest == alpine.digest
                assert skopeo.copy(f"{b.host}/{nested.ref}").digest == nested.digest
                assert skopeo.copy(f"{b.host}/{fresh.ref}").digest == fresh.digest
            assert _metric(b, "docxy_store_up") == 0
            assert _metric(b, "docxy_store_upload_failures_total") >= 1
            redis.restart()
            rgw.start_gateway()
            poll_until(lambda: _metric(a, "docxy_cluster_redis_up") == 1, 15)
            with Skopeo(short_tmp / "s4", tls_verify=False) as skopeo:
                image = upstream.images.namespaced
                assert skopeo.copy(f"{a.host}/{image.ref}").digest == image.digest
            poll_until(lambda: _metric(a, "docxy_store_up") == 1, 15)
            # A blob fetched once the bucket is back goes into it again, and what node B
            # fetched while it was away is put there once it answers.
            poll_until(lambda: _metric(a, "docxy_store_uploads_total") >= len(image.blobs), 30)
            with Skopeo(short_tmp / "s5", tls_verify=False) as skopeo:
                assert skopeo.copy(f"{b.host}/{alpine.ref}").digest == alpine.digest
            poll_until(lambda: all(_bucket_has(cluster, blob.digest) for blob in fresh.blobs), 30)
            # /ready keeps a report for a few seconds: it says ready, not degraded, soon.
            poll_until(lambda: json.loads(_get(f"{a.url}/ready")[2])["status"] == "ready", 15)
            assert "degraded" not in json.loads(_get(f"{a.url}/ready")[2])["cluster"]
            assert "Traceback" not in a.log() + b.log()
    finally:
        rgw.stop()
        redis.stop()


def test_warm_on_one_node_remove_on_another_clears_the_cluster(upstream, rgw, redis_server,
                                                              tmp_path, short_tmp):
    """`docxy warm` through node 0 puts the image in the bucket; node 1 serves it from
    there; `docxy cache rm` through node 0 removes it from the bucket and from node 1's
    disk, so the next pull through node 1 goes upstream again."""
    image = upstream.images.namespaced
    pair = Cluster(tmp_path / "pair", upstream, rgw, redis_server, count=2)
    admins = []
    for node in pair.nodes:
        port = free_port()
        node.process.argv.extend(["--admin-listen", f"tcp:{port}:interface=127.0.0.1"])
        admins.append(f"http://127.0.0.1:{port}")
    with pair:
        a, b = pair.nodes
        warmed = run_cli(admins[0], "warm", f"docker.io/{image.repository}:latest")
        assert warmed.code == 0, warmed.err
        poll_until(lambda: all(_bucket_has(pair, x.digest) for x in image.blobs), 30)
        before = len(upstream.cdn_log_entries())
        with Skopeo(short_tmp / "b1", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{b.host}/{image.ref}").digest == image.digest
        hexes = [x.digest.split(":")[1] for x in image.blobs]
        assert [e for e in upstream.cdn_log_entries()[before:]
                if any(h in e["uri"] for h in hexes)] == []
        listed = run_cli(admins[1], "cache", "ls", "--json").json()["images"]
        assert any(r["repository"] == image.repository and r["tag"] == "latest"
                   and r["pulls"] == 1 for r in listed)

        removed = run_cli(admins[0], "cache", "rm", "--json", f"docker.io/{image.repository}:latest")
        assert removed.code == 0, removed.err
        assert removed.json()["nodes"] == {pair_url(pair, 1): "removed"}
        for x in image.blobs:
            assert not _bucket_has(pair, x.digest)
            assert not cached_blob(pair.cache_dir(1), x.digest).exists()
            assert not cached_blob(pair.cache_dir(0), x.digest).exists()
        assert run_cli(admins[1], "cache", "ls", "--json").json()["images"] == []
        before = len(upstream.cdn_log_entries())
        with Skopeo(short_tmp / "b2", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{b.host}/{image.ref}").digest == image.digest
        poll_until(lambda: [e for e in upstream.cdn_log_entries()[before:]
                            if any(h in e["uri"] for h in hexes)], 10)


def pair_url(cluster, index: int) -> str:
    return f"http://127.0.0.1:{cluster.node_ports[index]}"
