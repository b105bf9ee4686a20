"""docxy behind nginx with --accel-redirect, as the README configures it: the first pull is
streamed by docxy, later pulls of a cached blob are sent by nginx from docxy's cache file
(sendfile), Range included, with docxy's headers."""
from __future__ import annotations

import json
import urllib.request

import pytest
from harness.clients import Skopeo
from harness.daemon import Docxy, cached_blob, mirror_args
from harness.nginx import NginxProcess, accel_front_locations
from harness.procs import free_port, poll_until

pytestmark = pytest.mark.integration

PREFIX = "/_docxy_blobs"


def _front(workdir, docxy_port: int, cache) -> NginxProcess:
    port = free_port()
    body = f"""
    server {{
        listen 127.0.0.1:{port};{accel_front_locations(docxy_port, cache, PREFIX)}
    }}
"""
    return NginxProcess("front", workdir, port, body)


def _blob_gets(lines: list[str], digest: str) -> list[dict]:
    entries = [json.loads(line) for line in lines]
    return [e for e in entries if e["method"] == "GET" and digest in e["uri"]]


def test_cached_blobs_are_sent_by_nginx_with_accel_redirect(upstream, tmp_path):
    """skopeo copies an image through nginx twice: both copies are whole; the second one's
    blobs leave docxy as a header only (0 bytes in its log) and nginx sends every byte; a
    Range request gets the right 206 from nginx."""
    image = upstream.images.namespaced
    cache = tmp_path / "cache"
    args = mirror_args(upstream, "--accel-redirect", PREFIX, cache=cache)
    with Docxy(tmp_path / "docxy", args) as docxy, _front(tmp_path / "nginx", docxy.port, cache) as front:
        host = f"127.0.0.1:{front.port}"
        layer = max(image.manifest.layers, key=lambda b: b.size)
        with Skopeo(tmp_path / "s1", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{host}/{image.ref}").digest == image.digest
        poll_until(lambda: cached_blob(cache, layer.digest).exists(), 30)
        docxy_lines_before = docxy.log().count(layer.digest)
        front_before = len(_blob_gets(front.access_log_lines(), layer.digest))
        with Skopeo(tmp_path / "s2", tls_verify=False) as skopeo:
            assert skopeo.copy(f"{host}/{image.ref}").digest == image.digest

        served = _blob_gets(front.access_log_lines(), layer.digest)[front_before:]
        assert served and all(e["status"] == 200 and e["body_bytes_sent"] == layer.size
                              for e in served), served
        poll_until(lambda: docxy.log().count(layer.digest) > docxy_lines_before, 10)
        warm = [line for line in docxy.log().splitlines()
                if layer.digest in line and "[docxy.access" in line][-1]
        assert " 200 0B cache " in warm, warm

        query = f"scope=repository:{image.repository}:pull"
        with urllib.request.urlopen(f"http://{host}/auth/token?{query}", timeout=30) as r:
            token = json.loads(r.read())["token"]
        request = urllib.request.Request(
            f"http://{host}/v2/{image.repository}/blobs/{layer.digest}",
            headers={"Authorization": f"Bearer {token}", "Range": "bytes=10-19"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 206
            assert r.headers["Docker-Content-Digest"] == layer.digest
            assert r.read() == cached_blob(cache, layer.digest).read_bytes()[10:20]
