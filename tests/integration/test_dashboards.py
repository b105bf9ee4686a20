"""The Grafana dashboard (etc/grafana/docxy.json) and the Prometheus alert rules
(etc/prometheus/docxy-alerts.yml) parse, are complete, and ask only for metrics a real
docxy exports: one daemon with the cache, a shared store on a real Ceph RGW and a cluster on
a real Redis (so that every metric family exists), after one pull through it."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from harness.ceph import Rgw
from harness.cluster import Cluster
from harness.redisd import RedisServer
from harness.upstream import Upstream
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "etc" / "grafana" / "docxy.json"
ALERTS = ROOT / "etc" / "prometheus" / "docxy-alerts.yml"
METRIC_NAME = re.compile(r"\bdocxy_[a-z0-9_]+")
MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
# The sample names each family type is exported under (counters with `_total`).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count", ""), "gauge": ("",), "untyped": ("",),
            "info": ("_info",)}


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, those inside rows (collapsed or not) included; rows themselves not."""
    for panel in panels:
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _expressions() -> dict[str, str]:
    """Every query of the dashboard (its panels and variables) and every alert's `expr`,
    by where it is."""
    dashboard = _dashboard()
    found = {}
    for panel in _panels(dashboard["panels"]):
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = variable["definition"]
    for rule in _rules():
        found[f"alert {rule['alert']}"] = rule["expr"]
    return found


@pytest.fixture(scope="module")
def metrics_text(upstream: Upstream, rgw: Rgw, redis_server: RedisServer,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of one docxy node (cache bounded, --store, --cluster) after one manifest
    and one blob pulled through it."""
    # One node, built as the cluster tests build theirs: own bucket, own Redis database.
    cluster = Cluster(tmp_path_factory.mktemp("dashboards"), upstream, rgw, redis_server,
                      count=1, extra=["--cache-max-size", "1G"])
    image = upstream.images.alpine
    with cluster:
        docxy = cluster.nodes[0]
        status, body = _get(f"{docxy.url}/auth/token?service=registry.docker.io&scope="
                            f"repository:{image.repository}:pull")
        assert status == 200, body
        auth = {"Authorization": f"Bearer {json.loads(body)['token']}"}
        status, _ = _get(f"{docxy.url}/v2/{image.repository}/manifests/{image.tag}",
                         {**auth, "Accept": MANIFEST_TYPES})
        assert status == 200
        layer = image.manifest.layers[0]
        status, data = _get(f"{docxy.url}/v2/{image.repository}/blobs/{layer.digest}", auth)
        assert status == 200 and len(data) == layer.size
        status, text = _get(f"{docxy.url}/metrics")
        assert status == 200
    return text.decode()


def test_dashboard_parses_and_every_panel_has_a_query():
    """docxy.json is JSON with the datasource and instance variables, and every panel
    (rows aside) has at least one target with a PromQL expression on that datasource."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    panels = list(_panels(dashboard["panels"]))
    assert len(panels) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert METRIC_NAME.search(target["expr"]), (panel["title"], target["expr"])


def test_every_alert_has_for_severity_summary_and_description():
    """docxy-alerts.yml is YAML of rule groups, and every rule is an alert with an
    `expr`, a `for`, a severity label and a summary and description."""
    rules = _rules()
    assert len(rules) >= 9
    for rule in rules:
        assert rule["alert"] and rule["expr"], rule
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_every_metric_asked_for_is_exported(metrics_text: str):
    """Each docxy_* name in a dashboard query or an alert expression is a series name
    /metrics exports (counters as `_total`, histograms as `_bucket`, `_sum`, `_count`)."""
    exported = set()
    for family in text_string_to_metric_families(metrics_text):
        exported.update(family.name + suffix for suffix in SUFFIXES[family.type])
        exported.update(sample.name for sample in family.samples)
    missing = {
        where: sorted(set(METRIC_NAME.findall(expr)) - exported)
        for where, expr in _expressions().items()
        if set(METRIC_NAME.findall(expr)) - exported
    }
    assert not missing, missing
    # the labelled series the alerts watch exist after one pull
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics_text)
               for s in family.samples}
    registry = (("registry", "docker.io"),)
    assert samples[("docxy_upstream_up", registry)] == 1
    assert samples[("docxy_upstream_token_service_up", registry)] == 1
    assert samples[("docxy_upstream_ratelimit_remaining", registry)] == 99
    assert samples[("docxy_cache_free_bytes", ())] > 0
    assert samples[("docxy_store_up", ())] == 1
    assert samples[("docxy_cluster_redis_up", ())] == 1
