# ruff: noqa: E501 - the page below is HTML/JS kept in one string, its lines are not Python
"""`ttg serve`: a live, read-only web view of the runs in a runs directory.

Stack: the standard library's `http.server` (a threading server) and one static page of
vanilla JavaScript that polls a JSON endpoint once a second and draws inline SVG. Nothing to
install, nothing to build, no framework to keep up to date, and the attack surface is a
handful of GET routes that only read files under the runs directory.

Data: what the controller writes into `runs/<id>/` — `progress.jsonl` (live, every ≥ 0.25 s:
done, dead, queued, in flight, executions, reclaims, retries, workers alive), and at the end
`summary.json`, `chunks.jsonl` (per chunk: worker, start, end), `events.jsonl` (reclaims,
retries, dead letters with their errors) and the report's PNG plots. With a broker given
(`--broker-url`, `--backend`, the password from a file: it never reaches the page), a running
run's dead letters and progress are read from the broker too.

Bound to 127.0.0.1 by default; only GET and HEAD; run ids are checked against the run-id
pattern and files against a fixed list of names, so nothing outside the runs dir is served.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("ttg.dashboard")

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FIGURE = re.compile(r"^[a-z][a-z0-9_-]{0,40}\.png$")
MAX_SAMPLES = 600  # points per chart sent to the page
MAX_LIST = 200


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    out: list[dict] = []
    try:
        with path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being written, or damaged: skip it
                if isinstance(rec, dict):
                    out.append(rec)
    except OSError:
        return out
    return out[-limit:] if limit else out


def _thin(samples: list[dict], n: int = MAX_SAMPLES) -> list[dict]:
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n - 1)] + [samples[-1]]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_runs(runs_dir: Path) -> list[dict]:
    runs = []
    try:
        entries = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    for d in entries:
        if not RUN_ID.match(d.name):
            continue
        summary = _read_json(d / "summary.json")
        progress = d / "progress.jsonl"
        try:
            mtime = max(p.stat().st_mtime for p in [d, *d.iterdir()])
        except (OSError, ValueError):
            mtime = 0.0
        runs.append({"run_id": d.name, "finished": summary is not None,
                     "ok": summary.get("ok") if summary else None,
                     "backend": summary.get("backend") if summary else None,
                     "has_progress": progress.exists(), "mtime": round(mtime, 3)})
    runs.sort(key=lambda r: r["mtime"], reverse=True)
    return runs


def _workers(chunks: list[dict]) -> list[dict]:
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"chunks": 0, "task_s": 0.0,
                                                         "first": None, "last": None})
    for c in chunks:
        w = per[str(c.get("worker") or "?")]
        w["chunks"] += 1
        w["task_s"] += float(c.get("task_s") or 0.0)
        for key, field, pick in (("first", "started", min), ("last", "finished", max)):
            v = c.get(field)
            if isinstance(v, (int, float)):
                w[key] = v if w[key] is None else pick(w[key], v)
    return [{"worker": k, **v, "task_s": round(v["task_s"], 3)} for k, v in sorted(per.items())]


def run_view(run_dir: Path, live: Callable[[str], dict] | None = None) -> dict:
    """Everything the page shows about one run, from its directory (and the broker, if any)."""
    summary = _read_json(run_dir / "summary.json")
    samples = read_jsonl(run_dir / "progress.jsonl")
    chunks = read_jsonl(run_dir / "chunks.jsonl") if summary else []
    events = read_jsonl(run_dir / "events.jsonl") if summary else []
    last = samples[-1] if samples else {}
    rate = 0.0
    if len(samples) >= 2:
        recent = [s for s in samples if s["ts"] >= samples[-1]["ts"] - 10] or samples[-2:]
        first = recent[0] if len(recent) > 1 else samples[-2]
        dt = samples[-1]["ts"] - first["ts"]
        rate = (samples[-1].get("done", 0) - first.get("done", 0)) / dt if dt > 0 else 0.0
    dead = [e for e in events if "dead" in str(e.get("kind", ""))]
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[str(e.get("kind"))] += 1
    view: dict[str, Any] = {
        "run_id": run_dir.name,
        "state": ("ok" if summary.get("ok") else "not ok") if summary else
                 ("running" if samples else "waiting"),
        "now": round(time.time(), 3),
        "progress": {k: last.get(k) for k in ("chunks_total", "done", "dead", "queued",
                                              "in_flight", "executions", "reclaimed",
                                              "retried", "workers_alive")},
        "rate_chunks_s": round(rate, 2),
        "started": samples[0]["ts"] if samples else None,
        "updated": last.get("ts"),
        "samples": _thin([{k: s.get(k) for k in ("ts", "done", "dead", "in_flight",
                                                   "workers_alive")} for s in samples]),
        "workers": _workers(chunks),
        "dead_letters": dead[:MAX_LIST],
        "event_counts": dict(counts),
        "faults": (summary or {}).get("faults", []),
        "summary": summary,
        "figures": sorted(p.name for p in run_dir.glob("*.png") if FIGURE.match(p.name)),
    }
    if summary is None and live is not None:
        try:
            view["live"] = live(run_dir.name)
        except Exception as exc:  # noqa: BLE001 - the broker is optional: say why, go on
            view["live"] = {"error": str(exc)}
    return view


def broker_reader(connect: Callable[[], Any]) -> Callable[[str], dict]:
    """Live data of a running run from the broker (one connection, made on first use)."""
    lock = threading.Lock()
    holder: dict[str, Any] = {}

    def read(run_id: str) -> dict:
        with lock:
            if "b" not in holder:
                failed = holder.get("failed_at")
                if failed is not None and time.monotonic() - failed < 30:
                    return {"error": holder["error"]}  # retried every 30 s, not per request
                try:
                    holder["b"] = connect()
                except Exception as exc:
                    holder["failed_at"], holder["error"] = time.monotonic(), f"broker: {exc}"
                    raise
            b = holder["b"]
            p = b.progress(run_id)
            dead = [d.to_dict() for d in b.dead_letters(run_id)][:MAX_LIST]
        return {"progress": p.to_dict(), "dead_letters": dead}

    return read


class Handler(BaseHTTPRequestHandler):
    server_version = "ttg-serve"
    runs_dir: Path
    live: Callable[[str], dict] | None = None

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: debug level only
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                         "script-src 'self' 'unsafe-inline'; img-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if not parts or (parts[0] == "run" and len(parts) == 2):
            return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        if parts == ["api", "runs"]:
            return self._json(list_runs(self.runs_dir))
        if len(parts) >= 3 and parts[:2] == ["api", "run"] and RUN_ID.match(parts[2]):
            run_dir = self.runs_dir / parts[2]
            if not run_dir.is_dir():
                return self._json({"error": f"no run {parts[2]}"}, 404)
            if len(parts) == 3:
                return self._json(run_view(run_dir, self.live))
            if len(parts) == 4 and FIGURE.match(parts[3]) and (run_dir / parts[3]).is_file():
                return self._send(200, (run_dir / parts[3]).read_bytes(), "image/png")
        return self._json({"error": "not found"}, 404)

    def _refuse(self) -> None:
        self._json({"error": "read-only"}, HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815


def make_server(runs_dir: Path, host: str = "127.0.0.1", port: int = 8765,
                live: Callable[[str], dict] | None = None) -> ThreadingHTTPServer:
    handler = type("RunsHandler", (Handler,), {"runs_dir": runs_dir, "live": staticmethod(live)
                                               if live else None})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TTG runs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:center}
header a{color:#9cc3ff} main{padding:14px 18px;display:grid;gap:14px;
grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px}
h2{font-size:14px;margin:0 0 8px;color:#4a5568} table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:2px 8px 2px 0;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}
.big{display:flex;gap:22px;flex-wrap:wrap}.big div{min-width:90px}.big b{display:block;font-size:22px}
.ok{color:#137333}.bad{color:#b3261e}.run{color:#1a56db} svg{width:100%;height:160px}
.bar{height:10px;background:#e6e9ee;border-radius:5px;overflow:hidden}.bar i{display:block;height:100%;background:#1a56db}
img{max-width:100%} small{color:#6b7280}
</style></head><body>
<header><b>TTG</b><span id="title">runs</span><span id="state"></span>
<a href="/">all runs</a><small id="updated"></small></header>
<main id="main"><section><h2>Runs</h2><table id="runs"></table></section></main>
<script>
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmt = (x, d=0) => x == null ? "–" : Number(x).toLocaleString("en", {maximumFractionDigits: d});
const m = location.pathname.match(/^\/run\/([^/]+)$/);
function rows(list, cols) {
  return "<tr>" + cols.map(c => `<th>${esc(c[0])}</th>`).join("") + "</tr>" +
    list.map(r => "<tr>" + cols.map(c => `<td>${esc(c[1](r))}</td>`).join("") + "</tr>").join("");
}
function chart(samples, key, color, max) {
  if (samples.length < 2) return "<svg></svg>";
  const t0 = samples[0].ts, t1 = samples[samples.length-1].ts || t0 + 1;
  const ys = samples.map(s => s[key] || 0), top = max || Math.max(1, ...ys);
  const pts = samples.map((s, i) => `${((s.ts - t0) / Math.max(t1 - t0, 1e-3) * 600).toFixed(1)},${(150 - ys[i] / top * 140).toFixed(1)}`);
  return `<svg viewBox="0 0 600 160" preserveAspectRatio="none"><polyline fill="none" stroke="${color}" stroke-width="2" points="${pts.join(" ")}"/>` +
    `<text x="4" y="12" font-size="11">${fmt(top)}</text><text x="520" y="158" font-size="11">${fmt(t1 - t0, 1)} s</text></svg>`;
}
function rateSeries(samples) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].ts - samples[i-1].ts;
    out.push({ts: samples[i].ts, rate: dt > 0 ? (samples[i].done - samples[i-1].done) / dt : 0});
  }
  return out;
}
async function listRuns() {
  const runs = await (await fetch("/api/runs")).json();
  $("runs").innerHTML = rows(runs, [["run", r => r.run_id], ["state", r => r.finished ? (r.ok ? "ok" : "NOT ok") : "running"],
    ["backend", r => r.backend || ""], ["updated", r => new Date(r.mtime * 1000).toLocaleTimeString()]]);
  [...$("runs").querySelectorAll("tr")].slice(1).forEach((tr, i) => {
    tr.firstChild.innerHTML = `<a href="/run/${encodeURIComponent(runs[i].run_id)}">${esc(runs[i].run_id)}</a>`; });
}
function layout() {
  $("main").innerHTML = `
  <section><h2>Progress</h2><div class="bar"><i id="bar" style="width:0"></i></div><div class="big">
   <div>done<b id="done">–</b></div><div>of<b id="total">–</b></div><div>in flight<b id="inflight">–</b></div>
   <div>dead<b id="dead">–</b></div><div>workers<b id="workers">–</b></div><div>chunks/s<b id="rate">–</b></div>
   <div>reclaimed<b id="reclaimed">–</b></div><div>retried<b id="retried">–</b></div></div></section>
  <section><h2>Chunks done over time</h2><div id="c_done"></div></section>
  <section><h2>Rate (chunks/s) over time</h2><div id="c_rate"></div></section>
  <section><h2>Workers alive / in flight over time</h2><div id="c_workers"></div></section>
  <section><h2>Per-worker activity</h2><table id="wtable"><tr><td><small>at the end of the run (chunks.jsonl)</small></td></tr></table></section>
  <section><h2>Dead-lettered chunks</h2><table id="dtable"></table></section>
  <section><h2>Faults</h2><table id="ftable"></table></section>
  <section id="sumsec"><h2>Summary</h2><table id="stable"><tr><td><small>when the run ends</small></td></tr></table><div id="figs"></div></section>`;
}
let figsShown = false;
async function refresh(id) {
  const r = await fetch(`/api/run/${encodeURIComponent(id)}`);
  if (!r.ok) { $("state").textContent = "no such run"; return; }
  const v = await r.json(), p = v.progress || {}, live = (v.live && v.live.progress) || {};
  $("title").textContent = v.run_id;
  $("state").innerHTML = `<span id="verdict" class="${v.state == "ok" ? "ok" : v.state == "not ok" ? "bad" : "run"}">${esc(v.state)}</span>`;
  const done = v.summary ? v.summary.chunks_done : (live.done ?? p.done), total = v.summary ? v.summary.chunks_total : p.chunks_total;
  $("done").textContent = fmt(done); $("total").textContent = fmt(total);
  $("inflight").textContent = fmt(live.in_flight ?? p.in_flight);
  $("dead").textContent = fmt(v.summary ? v.summary.chunks_dead_lettered : (live.dead ?? p.dead));
  $("workers").textContent = fmt(live.workers_alive ?? p.workers_alive);
  $("rate").textContent = fmt(v.rate_chunks_s, 1);
  $("reclaimed").textContent = fmt(p.reclaimed); $("retried").textContent = fmt(p.retried);
  $("bar").style.width = total ? `${(100 * done / total).toFixed(1)}%` : "0";
  $("c_done").innerHTML = chart(v.samples, "done", "#1a56db", total);
  $("c_rate").innerHTML = chart(rateSeries(v.samples), "rate", "#137333");
  $("c_workers").innerHTML = chart(v.samples, "workers_alive", "#7c3aed") ;
  if (v.workers.length) $("wtable").innerHTML = rows(v.workers, [["worker", w => w.worker], ["chunks", w => fmt(w.chunks)],
    ["task s", w => fmt(w.task_s, 2)], ["busy from", w => w.first ? fmt(w.first - v.started, 2) + " s" : ""], ["to", w => w.last ? fmt(w.last - v.started, 2) + " s" : ""]]);
  const dl = v.summary ? v.dead_letters : ((v.live && v.live.dead_letters) || v.dead_letters);
  $("dtable").innerHTML = dl.length ? rows(dl, [["chunk", d => d.chunk], ["error", d => d.reason || d.error || ""],
    ["attempts", d => d.attempts ?? ""], ["worker", d => d.worker || ""]]) : "<tr><td><small>none</small></td></tr>";
  $("ftable").innerHTML = v.faults.length ? rows(v.faults, [["fault", f => f.type], ["target", f => f.target || ""],
    ["at", f => f.at_progress != null ? fmt(100 * f.at_progress) + "%" : ""],
    ["recovered", f => f.error ? "NOT INJECTED: " + f.error : (f.recovered_s != null ? fmt(f.recovered_s, 2) + " s" : "–")]]) : "<tr><td><small>none</small></td></tr>";
  if (v.summary) {
    const s = v.summary, res = s.result || {};
    $("stable").innerHTML = rows([
      ["verdict", s.ok ? "OK" : "NOT OK"], ["chunks", `${s.chunks_done}/${s.chunks_total} done, ${s.chunks_missing} missing, ${s.chunks_dead_lettered} dead-lettered`],
      ["executions", s.executions], ["result", `count ${fmt(res.count)}  sum ${res.sum}  min ${res.min}  max ${res.max}`],
      ["wall", `${fmt(s.wall_s, 2)} s`], ["utilization", `${fmt(100 * s.utilization)}%`],
      ["platform / backend", `${s.platform} / ${s.backend}`], ["task", `${s.task}, ${s.workers} workers`]],
      [["", x => x[0]], ["", x => x[1]]]);
    $("stable").querySelectorAll("tr")[0].remove();
    if (!$("sum")) { const sum = document.createElement("span"); sum.id = "sum"; sum.hidden = true; $("stable").after(sum); }
    $("sum").textContent = res.sum;
    if (!figsShown && v.figures.length) { figsShown = true;
      $("figs").innerHTML = v.figures.map(f => `<img alt="${esc(f)}" src="/api/run/${encodeURIComponent(id)}/${encodeURIComponent(f)}">`).join(""); }
  }
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  return v;
}
if (m) { layout(); const id = decodeURIComponent(m[1]);
  const tick = async () => { let v; try { v = await refresh(id); } catch (e) { $("updated").textContent = "server unreachable"; }
    setTimeout(tick, v && v.summary ? 5000 : 1000); };
  tick();
} else { listRuns(); setInterval(listRuns, 3000); }
</script></body></html>
"""


def serve(runs_dir: Path, host: str, port: int, live: Callable[[str], dict] | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    server = make_server(runs_dir, host, port, live)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    (ready or (lambda u: print(f"ttg serve: {u} (runs in {runs_dir}; Ctrl-C stops)",
                               flush=True)))(url)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
