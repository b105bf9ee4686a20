"""The status page's document (`GET /api/v1/status` on the admin listener): the cache's use
against its bound, hit ratio and bytes by source now and over the last hours, downloads
in flight, warm-ups, the most pulled repositories, and each upstream's rate limit and
readiness.  Every number /metrics also exports is read from the same metrics registry, in
one collection per document, so the page and a scrape taken together agree.  The page
itself is docxy.web.resources.status; the sampling, docxy.ops.history."""
from __future__ import annotations

import shutil
from typing import Any, Callable, Iterable

from docxy.ops.history import History, Sample, hit_ratio, series
from docxy.registry.references import references

TOP = 10  # repositories listed

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def collect(registry) -> Samples:
    """Every sample a scrape of `registry` (a prometheus_client CollectorRegistry) would
    show, by (sample name, sorted labels)."""
    found: Samples = {}
    for family in registry.collect():
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the label values not given (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """`name`'s values by one label (a family with that label alone)."""
    return {dict(ls)[label]: v for (n, ls), v in samples.items()
            if n == name and label in dict(ls)}


def counters(samples: Samples) -> dict[str, float]:
    """What docxy.ops.history samples, from the metrics: cache hits and misses (blobs and
    manifests), body bytes sent from the cache and from upstreams, bytes stored."""
    found = {
        "hits": total(samples, "docxy_cache_hits_total"),
        "misses": total(samples, "docxy_cache_misses_total"),
        "cache_bytes": total(samples, "docxy_sent_bytes_total", source="cache"),
        "upstream_bytes": total(samples, "docxy_sent_bytes_total", source="upstream"),
        "used": total(samples, "docxy_cache_size_bytes"),
    }
    # Prometheus values are floats; whole ones stay whole in the JSON (1440 of each kept).
    return {k: int(v) if float(v).is_integer() else v for k, v in found.items()}


def read_counters(metrics) -> dict[str, float]:
    """`counters` of a docxy.ops.metrics.Metrics now: what docxy.ops.history samples."""
    return counters(collect(metrics.registry))


def cache_section(samples: Samples, disk_total: int | None) -> dict | None:
    """Use against the bound: --cache-max-size, or the file system's size when unbounded.
    None when the cache is off (no cache metrics)."""
    used = value(samples, "docxy_cache_size_bytes")
    if used is None:
        return None
    bound = value(samples, "docxy_cache_max_size_bytes")
    source = "max-size"
    if bound is None:
        bound, source = disk_total, "disk"
    return {
        "used": used,
        "bound": bound,
        "bound_is": source if bound is not None else None,
        "used_fraction": round(used / bound, 4) if bound else None,
        "free": value(samples, "docxy_cache_free_bytes"),
        "entries": value(samples, "docxy_cache_entries"),
    }


def hits_section(samples: Samples) -> dict:
    hits = by_label(samples, "docxy_cache_hits_total", "kind")
    misses = by_label(samples, "docxy_cache_misses_total", "kind")
    all_hits, all_misses = sum(hits.values()), sum(misses.values())
    return {
        "hits": all_hits,
        "misses": all_misses,
        "ratio": hit_ratio(all_hits, all_misses),
        "by_kind": {k: {"hits": hits.get(k, 0.0), "misses": misses.get(k, 0.0),
                        "ratio": hit_ratio(hits.get(k, 0.0), misses.get(k, 0.0))}
                    for k in sorted(set(hits) | set(misses))},
    }


def downloads_section(fills: Iterable) -> list[dict]:
    """Each blob download into the cache running now (docxy.cache.fill.Fill): bytes come
    from the upstream so far (`received`), of which on disk and hashed (`stored`), of
    `length` (None: not announced)."""
    rows = []
    for fill in fills:
        source = getattr(fill, "source", None)
        rows.append({"digest": fill.digest, "received": fill.received, "stored": fill.durable,
                     "length": fill.length,
                     "source": source.value if source is not None else None})
    return sorted(rows, key=lambda r: r["digest"])


def warmups_section(jobs: Iterable) -> list[dict]:
    """The warm-ups kept by docxy.admin.warmup (newest first)."""
    return [{"ref": j.ref, "started": j.started, "state": j.state, "layers": j.layers,
             "layers_done": j.layers_done, "total": j.total, "done": j.done, "error": j.error}
            for j in reversed(list(jobs))]


def top_repositories(records: Iterable, children: set[str], names: dict[str, str],
                     limit: int = TOP) -> list[dict]:
    """The most pulled repositories from the pull log's records ((registry key, repository,
    digest), Usage): pulls summed per repository, as `docxy cache ls` counts them, i.e.
    without the GETs of an index's own images (`children`), which one pull of a
    multi-platform image also makes.  Ties go by name."""
    totals: dict[tuple[str, str], list[float]] = {}
    for (key, repository, digest), usage in records:
        if digest in children or usage.pulls <= 0:
            continue
        entry = totals.setdefault((key, repository), [0, 0.0])
        entry[0] += usage.pulls
        entry[1] = max(entry[1], usage.last)
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    return [{"registry": names.get(key, key), "repository": repository, "pulls": int(pulls),
             "last_pull": last or None}
            for (key, repository), (pulls, last) in ranked]


def upstreams_section(names: Iterable[str], samples: Samples, readiness: dict | None) -> list[dict]:
    """Each upstream: the last ratelimit-remaining (and -limit) it sent (None: none yet),
    whether its last request got an answer (None: none yet), its token service, and its
    part of the readiness check (docxy.ops.readiness)."""
    checked = (readiness or {}).get("upstreams", {})
    rows = []
    for name in names:
        up = value(samples, "docxy_upstream_up", registry=name)
        token = value(samples, "docxy_upstream_token_service_up", registry=name)
        remaining = value(samples, "docxy_upstream_ratelimit_remaining", registry=name)
        limit = value(samples, "docxy_upstream_ratelimit_limit", registry=name)
        check = checked.get(name)
        rows.append({
            "name": name,
            "ratelimit_remaining": None if remaining is None else int(remaining),
            "ratelimit_limit": None if limit is None else int(limit),
            "up": None if up is None else bool(up),
            "token_service_up": None if token is None else bool(token),
            "ready": None if check is None else bool(check.get("ok")),
            "readiness": check,
        })
    return rows


def document(samples: Samples, now: float, *, disk_total: int | None = None,
             history: list[Sample] | None = None, every: float | None = None,
             fills: Iterable = (), jobs: Iterable = (), top: list[dict] | None = None,
             upstreams: Iterable[str] = (), readiness: dict | None = None) -> dict:
    """The status document, from one collection of the metrics and what /metrics does not
    carry (the samples kept, downloads, warm-ups, pulls, the readiness report)."""
    now_sample = Sample(now, **counters(samples))
    hits = hits_section(samples)
    return {
        "now": now,
        "cache": cache_section(samples, disk_total),
        "hits": hits,
        "bytes": {"cache": now_sample.cache_bytes, "upstream": now_sample.upstream_bytes},
        # the samples kept and now: the newest interval runs up to this document
        "history": {"every": every, "series": series((history or []) + [now_sample])},
        "in_flight": total(samples, "docxy_upstream_fetches_in_flight"),
        "downloads": downloads_section(fills),
        "warmups": warmups_section(jobs),
        "top": top or [],
        "upstreams": upstreams_section(upstreams, samples, readiness),
        "ready": None if readiness is None else {"status": readiness.get("status"),
                                                 "ready": readiness.get("ready")},
    }


class StatusSource:
    """Builds the document from the daemon's objects (docxy.service.build_admin).  The
    children of each pulled index are read once per digest (content by digest does not
    change) and forgotten with the digest's last pull record."""

    def __init__(self, context, history: History | None = None, pulls=None, warmup=None,
                 names: dict[str, str] | None = None,
                 disk_usage: Callable[[Any], Any] = shutil.disk_usage) -> None:
        self._context = context  # docxy.web.resources._base.Context
        self._history = history
        self._pulls = pulls  # docxy.cache.usage.PullLog, None without the cache
        self._warmup = warmup  # docxy.admin.warmup.WarmUp, None without the cache
        self._names = names or {}  # registry key -> its name
        self._disk_usage = disk_usage
        self._children: dict[str, tuple[str, ...]] = {}

    def _disk_total(self) -> int | None:
        blobs = self._context.blobs
        if blobs is None:
            return None
        try:
            return self._disk_usage(blobs.store.root).total
        except OSError:
            return None

    def _top(self) -> list[dict]:
        manifests = self._context.manifests
        if self._pulls is None or manifests is None:
            return []
        records = self._pulls.records()
        digests = {d for (_, _, d), _ in records}
        known = {d: c for d, c in self._children.items() if d in digests}
        for digest in digests - known.keys():
            manifest = manifests.document(digest)
            if manifest is not None:  # not stored (yet): asked again next time
                known[digest] = tuple(references(manifest)[0])
        self._children = known
        children = {c for kids in known.values() for c in kids}
        return top_repositories(records, children, self._names)

    async def document(self) -> dict:
        """The document, after the readiness check (kept a few seconds, docxy.ops.readiness)."""
        context = self._context
        readiness = await context.readiness.check()
        samples = collect(context.metrics.registry)
        blobs = context.blobs
        history = self._history
        return document(
            samples, context.reactor.seconds(),
            disk_total=self._disk_total(),
            history=history.samples() if history is not None else None,
            every=history.every if history is not None else None,
            # BlobCache keeps its downloads in flight by digest; read, never changed here
            fills=blobs.downloads() if blobs is not None else (),
            jobs=self._warmup.jobs if self._warmup is not None else (),
            top=self._top(),
            upstreams=list(context.proxies),
            readiness=readiness,
        )
