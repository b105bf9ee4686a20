"""The status page at `/` on the admin listener: one self-contained HTML document (inline
CSS and JS, no external asset, no framework) that reads `/api/v1/status` (docxy.ops.status)
every few seconds and draws its plots as inline SVG.  Its Content-Security-Policy admits
only its own script and style and requests to the admin listener itself."""
from __future__ import annotations

import base64
import hashlib
import re

from docxy.stream.clients import request_gone
from docxy.web.resources.admin import AdminResource


def _csp(page: str) -> bytes:
    """A policy admitting exactly the page's inline <style> and <script> (by hash)."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(b.encode()).digest())
                        .decode() for b in bodies)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'").encode()


class StatusPage(AdminResource):
    """`GET /`: the page (the admin users' password is asked as for the API)."""

    needs_cache = False

    def _headers(self, request) -> None:
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(BODY))
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")

    async def do_GET(self, request) -> None:
        self._headers(request)
        _finish(request, BODY)

    async def do_HEAD(self, request) -> None:
        self._headers(request)
        _finish(request, b"")


def _finish(request, body: bytes) -> None:
    if not request_gone(request):
        if body:
            request.write(body)
        request.finish()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>docxy status</title>
<style>
:root{--fg:#1d2330;--mute:#6b7280;--line:#e5e7eb;--bg:#f7f8fa;--card:#fff;--ok:#15803d;--bad:#b91c1c;--cache:#2563eb;--up:#ea580c}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;gap:1em;align-items:baseline;padding:.8em 1.2em;background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:1.2em;margin:0}
h2{font-size:.95em;margin:0 0 .6em;color:var(--mute);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:1em;padding:1em 1.2em}
section{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:1em}
.wide{grid-column:1/-1}
.big{font-size:1.8em;font-weight:600}
.mute{color:var(--mute)}
.badge{padding:.1em .6em;border-radius:1em;color:#fff;background:var(--mute);font-size:.85em}
.ok{background:var(--ok)}.bad{background:var(--bad)}
.bar{height:10px;background:var(--line);border-radius:5px;overflow:hidden;margin:.4em 0}
.bar>div{height:100%;background:var(--cache);width:0}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:.3em .4em;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mute);font-weight:500}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.w{width:30%}
.bad-text{color:var(--bad)}
svg{width:100%;height:auto;display:block;margin-top:.6em}
svg text{font-size:17px;fill:var(--mute)}
svg .grid{stroke:var(--line)}
svg .l{fill:none;stroke-width:2}
svg .ratio{stroke:var(--ok)}
svg .cache{stroke:var(--cache)}
svg .upstream{stroke:var(--up)}
svg .used{stroke:var(--fg)}
svg .bound{stroke:var(--bad);stroke-dasharray:4 3;fill:none}
.key span{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin:0 .3em 0 .8em}
.key .c{background:var(--cache)}.key .u{background:var(--up)}
#error{display:none;background:var(--bad);color:#fff;padding:.5em 1.2em}
</style>
</head>
<body>
<header><h1>docxy</h1><span id="ready" class="badge" data-value="">…</span>
<span class="mute">updated <span id="updated" data-value="">never</span></span></header>
<div id="error"></div>
<main>
<section><h2>Cache</h2>
<div class="big"><span id="cache-used" data-value="">–</span></div>
<div class="mute">of <span id="cache-bound" data-value="">–</span> <span id="cache-bound-is"></span>
· <span id="cache-free" data-value="">–</span> free on disk · <span id="cache-entries" data-value="">–</span> entries</div>
<div class="bar"><div id="cache-bar"></div></div>
<svg id="plot-used" viewBox="0 0 600 150"></svg>
</section>
<section><h2>Hit ratio</h2>
<div class="big"><span id="hit-ratio" data-value="">–</span></div>
<div class="mute"><span id="hits" data-value="">–</span> hits · <span id="misses" data-value="">–</span> misses (blobs and manifests, since start)</div>
<svg id="plot-ratio" viewBox="0 0 600 150"></svg>
</section>
<section><h2>Bytes served</h2>
<div class="key"><span class="c"></span>from the cache <b id="bytes-cache" data-value="">–</b><span class="u"></span>from upstreams <b id="bytes-upstream" data-value="">–</b></div>
<svg id="plot-bytes" viewBox="0 0 600 150"></svg>
</section>
<section class="wide"><h2>Downloads in flight: <span id="in-flight" data-value="">–</span></h2>
<table><thead><tr><th>blob</th><th>from</th><th class="n">received</th><th class="n">of</th><th class="w">progress</th></tr></thead><tbody id="downloads"></tbody></table>
</section>
<section><h2>Most pulled repositories</h2>
<table><thead><tr><th>repository</th><th class="n">pulls</th><th>last pull</th></tr></thead><tbody id="top"></tbody></table>
</section>
<section><h2>Upstreams</h2>
<table><thead><tr><th>registry</th><th>ready</th><th>last answer</th><th>token service</th><th class="n">ratelimit remaining</th></tr></thead><tbody id="upstreams"></tbody></table>
</section>
<section class="wide"><h2>Warm-ups</h2>
<table><thead><tr><th>image</th><th>state</th><th class="n">layers</th><th class="n">bytes</th><th>started</th></tr></thead><tbody id="warmups"></tbody></table>
</section>
</main>
<script>
"use strict";
const EVERY = 5000, NS = "http://www.w3.org/2000/svg", $ = id => document.getElementById(id);
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : String(Math.round(n))) + " " + u[i];
}
const pct = r => r == null ? "–" : (100 * r).toFixed(1) + " %";
const clock = t => t ? new Date(t * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}) : "–";
const when = t => t ? new Date(t * 1000).toLocaleString() : "–";
function show(id, value, text) { const e = $(id); e.dataset.value = value == null ? "" : String(value); e.textContent = text; }
function yes(v) { return v == null ? "–" : v ? "yes" : "no"; }
function cell(tr, text, cls) { const td = tr.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function rows(id, list, fill, empty) {
  const body = $(id); body.textContent = "";
  for (const item of list) fill(body.insertRow(), item);
  if (!list.length) { const td = body.insertRow().insertCell(); td.colSpan = 5; td.className = "mute"; td.textContent = empty; }
}
function el(parent, name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  parent.appendChild(e); return e;
}
// One step per interval (from its start to its end) of each line's values; null: a gap.
function plot(svg, s, lines, top, fmt, extra) {
  svg.textContent = "";
  const H = 150, L = 4, R = 596, T = 24, B = 124, t = s.t, n = t.length;
  const begin = i => t[i] - s.seconds[i];
  const max = top || Math.max(1e-9, ...lines.flatMap(l => l.values.filter(v => v != null)), extra || 0);
  const t0 = n ? begin(0) : 0, t1 = n ? t[n - 1] : 1;
  const x = v => (L + (R - L) * (v - t0) / Math.max(t1 - t0, 1e-9)).toFixed(1);
  const y = v => (B - (B - T) * Math.min(v, max) / max).toFixed(1);
  el(svg, "line", {x1: L, x2: R, y1: B, y2: B, class: "grid"});
  el(svg, "line", {x1: L, x2: R, y1: T, y2: T, class: "grid"});
  el(svg, "text", {x: L, y: 17}, fmt(max));
  el(svg, "text", {x: L, y: H - 4}, clock(t0));
  el(svg, "text", {x: R, y: H - 4, "text-anchor": "end"}, n ? clock(t1) : "no data yet");
  if (extra) el(svg, "line", {x1: L, x2: R, y1: y(extra), y2: y(extra), class: "bound"});
  for (const line of lines) {
    let d = "", open = false;
    line.values.forEach((v, i) => {
      if (v == null) { open = false; return; }
      d += (open ? "L" : "M") + x(begin(i)) + " " + y(v) + "L" + x(t[i]) + " " + y(v);
      open = true;
    });
    if (d) el(svg, "path", {d, class: "l " + line.cls});
  }
}
function render(s) {
  const c = s.cache, h = s.hits, series = s.history.series;
  if (s.ready) { const r = $("ready"); r.dataset.value = String(s.ready.ready); r.textContent = s.ready.status; r.className = "badge " + (s.ready.ready ? "ok" : "bad"); }
  show("updated", s.now, when(s.now));
  if (c) {
    show("cache-used", c.used, bytes(c.used));
    show("cache-bound", c.bound, bytes(c.bound));
    $("cache-bound-is").textContent = c.bound_is === "disk" ? "(the disk: no --cache-max-size)" : "(--cache-max-size)";
    show("cache-free", c.free, bytes(c.free));
    show("cache-entries", c.entries, c.entries == null ? "–" : String(c.entries));
    $("cache-bar").style.width = (100 * Math.min(1, c.used_fraction || 0)).toFixed(1) + "%";
  } else show("cache-used", null, "the cache is off");
  show("hit-ratio", h.ratio, pct(h.ratio));
  show("hits", h.hits, h.hits.toLocaleString());
  show("misses", h.misses, h.misses.toLocaleString());
  show("bytes-cache", s.bytes.cache, bytes(s.bytes.cache));
  show("bytes-upstream", s.bytes.upstream, bytes(s.bytes.upstream));
  const rate = k => series[k].map((v, i) => series.seconds[i] > 0 ? v / series.seconds[i] : null);
  plot($("plot-ratio"), series, [{values: series.hit_ratio, cls: "ratio"}], 1, pct);
  plot($("plot-bytes"), series, [{values: rate("cache_bytes"), cls: "cache"}, {values: rate("upstream_bytes"), cls: "upstream"}], 0, v => bytes(v) + "/s");
  plot($("plot-used"), series, [{values: series.used, cls: "used"}], 0, bytes, c && c.bound_is === "max-size" ? c.bound : 0);
  show("in-flight", s.in_flight, String(s.in_flight));
  rows("downloads", s.downloads, (tr, d) => {
    tr.dataset.digest = d.digest; tr.dataset.received = d.received;
    cell(tr, d.digest.slice(0, 19) + "…").title = d.digest;
    cell(tr, d.source || "–");
    cell(tr, bytes(d.received), "n"); cell(tr, bytes(d.length), "n");
    const bar = document.createElement("div"), fill = document.createElement("div");
    bar.className = "bar"; bar.appendChild(fill); tr.insertCell().appendChild(bar);
    fill.style.width = d.length ? (100 * d.received / d.length).toFixed(1) + "%" : "0";
  }, "none");
  rows("top", s.top, (tr, r) => {
    tr.dataset.repository = r.registry + "/" + r.repository; tr.dataset.pulls = r.pulls;
    cell(tr, r.registry + "/" + r.repository); cell(tr, String(r.pulls), "n"); cell(tr, when(r.last_pull));
  }, "nothing pulled yet");
  rows("upstreams", s.upstreams, (tr, u) => {
    tr.dataset.upstream = u.name; tr.dataset.ready = String(u.ready); tr.dataset.up = String(u.up);
    tr.dataset.ratelimit = u.ratelimit_remaining == null ? "" : String(u.ratelimit_remaining);
    cell(tr, u.name);
    const r = cell(tr, yes(u.ready)); r.className = u.ready ? "" : "bad-text";
    if (u.readiness && u.readiness.error) r.textContent += " (" + u.readiness.error + ")";
    cell(tr, yes(u.up)); cell(tr, u.token_service_up == null ? "–" : u.token_service_up ? "up" : "down");
    cell(tr, u.ratelimit_remaining == null ? "–" : u.ratelimit_remaining + (u.ratelimit_limit == null ? "" : " of " + u.ratelimit_limit), "n");
  }, "none");
  rows("warmups", s.warmups, (tr, j) => {
    tr.dataset.state = j.state;
    cell(tr, j.ref); cell(tr, j.state + (j.error ? ": " + j.error : ""));
    cell(tr, j.layers_done + " / " + j.layers, "n"); cell(tr, bytes(j.done) + " / " + bytes(j.total), "n"); cell(tr, when(j.started));
  }, "none");
  document.body.dataset.rendered = String((+document.body.dataset.rendered || 0) + 1);
}
async function refresh() {
  try {
    const r = await fetch("api/v1/status", {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) throw new Error("status answered " + r.status);
    render(await r.json());
    $("error").style.display = "none";
  } catch (e) {
    $("error").textContent = "cannot read the status: " + e.message; $("error").style.display = "block";
  } finally { setTimeout(refresh, EVERY); }
}
refresh();
</script>
</body>
</html>
"""
BODY = PAGE.encode("utf-8")
CSP = _csp(PAGE)
