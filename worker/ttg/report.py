"""`ttg report`: runs/<run_id>/report.md plus PNG plots, from what the run recorded only.

Inputs (in the run directory):

- summary.json   the run summary (required): verdict, totals, faults[]
- chunks.jsonl   one line per chunk result: chunk, count, sum, min, max, worker, started,
                 finished, task_s, attempt (written by `controller.aggregate`)
- events.jsonl   optional: rare broker events {ts, kind, chunk, worker...}; kind reclaimed,
                 retried, dead_lettered, reconciled, or a fault written by a chaos tool
- progress.jsonl optional: the controller's progress samples (done, in flight, workers alive)

Outputs: report.md, throughput.png, workers.png, durations.png, timeline.png and report.json
(the exact series that were plotted, so a test or a tool can check them against the summary).
matplotlib is imported lazily with the Agg backend; without it report.md is written without
plots and says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ttg.errors import ConfigError

log = logging.getLogger("ttg.report")

PLOTS = ("throughput.png", "workers.png", "durations.png", "timeline.png")
NICE_STEPS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600,
              900, 1800, 3600)
EVENT_STYLE = {  # kind -> (marker, colour, label)
    "reclaimed": ("v", "tab:orange", "reclaimed"),
    "retried": ("^", "goldenrod", "retried"),
    "dead_lettered": ("X", "tab:red", "dead-lettered"),
    "reconciled": ("D", "tab:purple", "reconciled"),
}


# ---- loading ---------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's JSON-lines file (chunks, events, progress); [] if absent."""
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON: skipped", path.name, n)
    return out


def find_run_dir(run_dir: Path | None = None, runs_dir: Path = Path("runs")) -> Path:
    """The run to report: `run_dir`, or the latest run under `runs_dir`."""
    if run_dir is not None:
        if not (run_dir / "summary.json").exists():
            raise ConfigError(f"no summary.json in {run_dir}: not a run directory")
        return run_dir
    latest = runs_dir / "latest"
    if latest.is_symlink() and (latest.resolve() / "summary.json").exists():
        return latest.resolve()
    if (latest / "summary.json").exists():  # a copy, not a link: find the real directory
        run_id = json.loads((latest / "summary.json").read_text()).get("run_id", "")
        if run_id and (runs_dir / run_id / "summary.json").exists():
            return runs_dir / run_id
        return latest
    candidates = sorted(
        (d for d in runs_dir.glob("*/summary.json") if d.parent.name != "latest"),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise ConfigError(f"no run found under {runs_dir} (no */summary.json)")
    return candidates[-1].parent


# ---- the numbers -----------------------------------------------------------------------


def _nice_bin(span: float, target: int = 60) -> float:
    raw = max(span, 1e-3) / target
    for step in NICE_STEPS:
        if step >= raw:
            return step
    return NICE_STEPS[-1] * math.ceil(raw / NICE_STEPS[-1])


def _quantile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(int(math.ceil(q * len(sorted_vals))) - 1, len(sorted_vals) - 1)
    return sorted_vals[max(i, 0)]


def _time_at_progress(frac: float, chunks: list[dict], progress: list[dict],
                      chunks_total: int) -> float | None:
    """Epoch time at which `frac` of the chunks were done (controller samples first)."""
    target = frac * max(chunks_total, 1)
    for s in progress:
        if s.get("done", 0) >= target:
            return float(s["ts"])
    finished = sorted(float(c["finished"]) for c in chunks if "finished" in c)
    if not finished:
        return None
    i = min(max(int(math.ceil(target)) - 1, 0), len(finished) - 1)
    return finished[i]


def analyse(run_dir: Path) -> dict:
    """Everything the report states and plots, from the run directory's files."""
    summary = json.loads((run_dir / "summary.json").read_text())
    chunks = [c for c in read_jsonl(run_dir / "chunks.jsonl") if "finished" in c]
    events = [e for e in read_jsonl(run_dir / "events.jsonl") if "ts" in e]
    progress = [s for s in read_jsonl(run_dir / "progress.jsonl") if "ts" in s]
    stamps = [float(c["started"]) for c in chunks if "started" in c]
    stamps += [float(c["finished"]) for c in chunks]
    stamps += [float(e["ts"]) for e in events] + [float(s["ts"]) for s in progress]
    t0 = min(stamps) if stamps else 0.0
    t_end = max(stamps) if stamps else 0.0

    # throughput: parameters completed per second, binned on the chunk's finish time
    span = max(t_end - t0, 1e-3)
    width = _nice_bin(span)
    nbins = max(int(math.ceil(span / width)), 1)
    counts = [0] * nbins
    for c in chunks:
        i = min(int((float(c["finished"]) - t0) / width), nbins - 1)
        counts[i] += int(c.get("count", 0))
    throughput = {
        "bin_s": width,
        "t": [round(i * width, 6) for i in range(nbins)],
        "params_per_s": [n / width for n in counts],
        "params": sum(counts),
    }

    # per worker
    per_worker_chunks: Counter[str] = Counter()
    per_worker_params: Counter[str] = Counter()
    per_worker_busy: dict[str, float] = defaultdict(float)
    for c in chunks:
        w = str(c.get("worker", "?"))
        per_worker_chunks[w] += 1
        per_worker_params[w] += int(c.get("count", 0))
        per_worker_busy[w] += float(c.get("task_s", 0.0))
    workers = sorted(per_worker_chunks, key=_natural)

    durations = sorted(float(c.get("task_s", 0.0)) for c in chunks)
    lo, hi = (durations[0], durations[-1]) if durations else (0.0, 0.0)
    nb = 40 if hi > lo else 1
    step = (hi - lo) / nb if hi > lo else max(hi, 1e-3)
    edges = [lo + i * step for i in range(nb + 1)]
    hist = [0] * nb
    for v in durations:
        hist[min(int((v - lo) / step), nb - 1)] += 1
    attempts = Counter(int(c.get("attempt", 1)) for c in chunks)

    # faults: when, first reclaim after it, recovered
    faults = []
    for f in summary.get("faults") or []:
        at = f.get("at")
        if at is None and f.get("at_progress") is not None:
            at = _time_at_progress(float(f["at_progress"]), chunks, progress,
                                   int(summary.get("chunks_total", 0)))
        rec = f.get("recovered_s")
        first_reclaim = None
        if at is not None:
            later = [e for e in events if e.get("kind") in ("reclaimed", "reconciled")
                     and float(e["ts"]) >= float(at)]
            if later:
                first_reclaim = min(later, key=lambda e: float(e["ts"]))
        faults.append({
            **f,
            "at_s": round(float(at) - t0, 3) if at is not None else None,
            "reclaim_s": (round(float(first_reclaim["ts"]) - float(at), 3)
                          if first_reclaim else None),
            "reclaim_chunk": first_reclaim.get("chunk") if first_reclaim else None,
            "recovered_at_s": (round(float(at) - t0 + float(rec), 3)
                               if at is not None and rec is not None else None),
        })

    kinds = Counter(str(e.get("kind")) for e in events)
    return {
        "run_dir": str(run_dir),
        "summary": summary,
        "t0": t0,
        "span_s": round(t_end - t0, 3),
        "chunks_recorded": len(chunks),
        "throughput": throughput,
        "workers": {
            w: {"chunks": per_worker_chunks[w], "params": per_worker_params[w],
                "busy_s": round(per_worker_busy[w], 3)}
            for w in workers
        },
        "durations": {
            "n": len(durations),
            "mean_s": sum(durations) / len(durations) if durations else 0.0,
            "p50_s": _quantile(durations, 0.5),
            "p95_s": _quantile(durations, 0.95),
            "max_s": durations[-1] if durations else 0.0,
            "edges_s": edges,
            "counts": hist,
        },
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "events": {"counts": dict(sorted(kinds.items())), "n": len(events)},
        "faults": faults,
        "_chunks": chunks,
        "_events": events,
        "_progress": progress,
    }


def _natural(name: str) -> tuple:
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1, name)


# ---- the plots -------------------------------------------------------------------------


def _merged_spans(spans: list[tuple[float, float]], tol: float) -> list[tuple[float, float]]:
    """(start, width) spans merged where the gap is below `tol`: few rectangles to draw."""
    out: list[list[float]] = []
    for start, w in sorted(spans):
        if out and start <= out[-1][0] + out[-1][1] + tol:
            out[-1][1] = max(out[-1][1], start + w - out[-1][0])
        else:
            out.append([start, w])
    return [(a, b) for a, b in out]


def plot(data: dict, run_dir: Path) -> list[str]:
    """Draw the PNGs; returns the file names written."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    t0 = data["t0"]
    title = f"run {s.get('run_id', '?')}"
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=90)
        plt.close(fig)
        written.append(name)

    # 1. throughput
    tp = data["throughput"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(tp["t"], tp["params_per_s"], width=tp["bin_s"], align="edge", color="tab:blue",
           alpha=0.8, label=f"params/s ({tp['bin_s']:g} s bins)")
    ax.set_xlabel("seconds since the first recorded event")
    ax.set_ylabel("parameters / s")
    ax2 = ax.twinx()
    cum, acc = [], 0.0
    for r in tp["params_per_s"]:
        acc += r * tp["bin_s"]
        cum.append(acc)
    ax2.step([t + tp["bin_s"] for t in tp["t"]], cum, where="pre", color="black", lw=1.2,
             label="parameters done (cumulative)")
    ax2.set_ylabel("parameters done")
    ax2.set_ylim(0, max(s.get("params", 0), acc, 1) * 1.05)
    _mark_faults(ax, data)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(f"Throughput — {title}")
    save(fig, "throughput.png")

    # 2. chunks per worker
    ws = data["workers"]
    names = list(ws)
    fig, ax = plt.subplots(figsize=(8, max(2.4, 0.35 * len(names) + 1.2)))
    vals = [ws[w]["chunks"] for w in names]
    ax.barh(names, vals, color="tab:green")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("chunks completed (first write kept)")
    ax.set_title(f"Chunks per worker — {title} ({sum(vals)} chunks)")
    save(fig, "workers.png")

    # 3. chunk duration distribution
    d = data["durations"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    if d["n"]:
        ax.stairs(d["counts"], d["edges_s"], fill=True, color="tab:cyan", alpha=0.8)
        ax.stairs(d["counts"], d["edges_s"], color="black", lw=0.6)
        for q, style in (("p50_s", "--"), ("p95_s", ":")):
            ax.axvline(d[q], color="black", ls=style, lw=1,
                       label=f"{q[:-2]} {d[q] * 1000:.1f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("seconds inside the task per chunk")
    ax.set_ylabel("chunks")
    ax.set_title(f"Chunk duration — {title}")
    save(fig, "durations.png")

    # 4. timeline: each worker's chunk executions, events, faults, workers alive
    chunks = data["_chunks"]
    lanes = names or ["?"]
    lane = {w: i for i, w in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(9, max(2.8, 0.45 * len(lanes) + 1.6)))
    tol = data["span_s"] / 1500 if data["span_s"] else 0.0
    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in chunks:
        start = float(c.get("started", c["finished"])) - t0
        by_worker[str(c.get("worker", "?"))].append((start, float(c["finished"]) - t0 - start))
    for w, spans in by_worker.items():
        ax.broken_barh(_merged_spans(spans, tol), (lane[w] - 0.35, 0.7), color="tab:blue",
                       alpha=0.6, lw=0)
    seen_labels: set[str] = set()
    for e in data["_events"]:
        style = EVENT_STYLE.get(str(e.get("kind")))
        if style is None:
            continue
        marker, colour, label = style
        y = lane.get(str(e.get("worker")), -0.8)
        ax.scatter([float(e["ts"]) - t0], [y], marker=marker, color=colour, s=40, zorder=3,
                   label=label if label not in seen_labels else None)
        seen_labels.add(label)
    _mark_faults(ax, data, with_labels=True)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.4, -1.2)
    ax.set_xlabel("seconds since the first recorded event")
    prog = data["_progress"]
    if prog:
        ax3 = ax.twinx()
        ax3.step([float(p["ts"]) - t0 for p in prog], [p.get("workers_alive", 0) for p in prog],
                 where="post", color="grey", lw=1, ls="--", label="workers alive")
        ax3.set_ylabel("workers alive")
        ax3.set_ylim(0, max(max(p.get("workers_alive", 0) for p in prog), 1) + 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    kind = "Fault timeline" if data["faults"] else "Worker timeline"
    ax.set_title(f"{kind} — {title} (bars: chunks executing)")
    save(fig, "timeline.png")
    return written


def _mark_faults(ax: Any, data: dict, with_labels: bool = False) -> None:
    for f in data["faults"]:
        if f.get("at_s") is None:
            continue
        ax.axvline(f["at_s"], color="tab:red", lw=1.5)
        if with_labels:
            ax.annotate(f"{f.get('type', 'fault')} {f.get('target', '')}".strip(),
                        (f["at_s"], -1.0), color="tab:red", fontsize=8, ha="left")
        if f.get("recovered_at_s") is not None:
            ax.axvspan(f["at_s"], f["recovered_at_s"], color="tab:red", alpha=0.12)
            ax.axvline(f["recovered_at_s"], color="tab:green", lw=1.5, ls="--")
            if with_labels:
                ax.annotate("recovered", (f["recovered_at_s"], -0.7), color="tab:green",
                            fontsize=8)


# ---- the text --------------------------------------------------------------------------


def verdict(summary: dict) -> tuple[str, list[str]]:
    reasons = []
    if summary.get("chunks_missing"):
        reasons.append(f"{summary['chunks_missing']} chunk(s) missing")
    if summary.get("chunks_dead_lettered"):
        reasons.append(f"{summary['chunks_dead_lettered']} chunk(s) dead-lettered "
                       f"{summary.get('dead_lettered', [])[:20]}")
    res = summary.get("results") or {}
    failed, expected_failed = res.get("failed_points", 0), summary.get("expected_failed_points", [])
    if failed != len(expected_failed):
        reasons.append(f"{failed} point(s) failed, {len(expected_failed)} expected "
                       f"(ttg results {summary.get('run_id')} --failures)")
    r = summary.get("result") or {}
    if r.get("count") != (summary.get("params") or 0) - len(expected_failed):
        reasons.append(f"count {r.get('count')} != params {summary.get('params')}")
    if "expected_sum" in summary and r.get("sum") != summary["expected_sum"]:
        reasons.append(f"sum {r.get('sum')} != expected {summary['expected_sum']}")
    return ("OK" if summary.get("ok") else "NOT OK"), reasons


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def render(data: dict, plots: list[str], plot_error: str | None = None) -> str:
    s = data["summary"]
    r = s.get("result") or {}
    word, reasons = verdict(s)
    tp, ws, d = data["throughput"], data["workers"], data["durations"]
    lines = [
        f"# Run report: {s.get('run_id', '?')}",
        "",
        f"**Verdict: {word}**" + (f" — {'; '.join(reasons)}" if reasons else
                                  " — every chunk done once in the result, "
                                  "count and sum as expected."),
        "",
        "## Summary",
        "",
        "| field | value |",
        "|---|---|",
    ]
    rows = [
        ("platform / backend", f"{s.get('platform')} / {s.get('backend')}"),
        ("task", f"{s.get('task')} (work_ms {s.get('work_ms')})"),
        ("parameters", _fmt(s.get("params"))),
        ("chunk size", _fmt(s.get("chunk_size"))),
        ("workers", _fmt(s.get("workers"))),
        ("chunks done / total", f"{_fmt(s.get('chunks_done'))} / {_fmt(s.get('chunks_total'))}"),
        ("chunks missing", _fmt(s.get("chunks_missing"))),
        ("chunks dead-lettered", _fmt(s.get("chunks_dead_lettered"))),
        ("executions", f"{_fmt(s.get('executions'))} "
                       f"({_fmt((s.get('executions') or 0) - (s.get('chunks_done') or 0))} "
                       "redundant)"),
        ("result count", _fmt(r.get("count"))),
        ("result sum", _fmt(r.get("sum"))
         + (f" (expected {_fmt(s['expected_sum'])})" if "expected_sum" in s else "")),
        ("result min / max", f"{r.get('min')} / {r.get('max')}"),
        ("wall time", f"{s.get('wall_s')} s"),
        ("utilization", f"{(s.get('utilization') or 0):.0%}"),
        ("faults injected", str(len(s.get("faults") or []))),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Data", "",
              f"Plotted from `chunks.jsonl` ({data['chunks_recorded']} chunk results, first "
              f"write per chunk), `events.jsonl` ({data['events']['n']} broker events"
              + (": " + ", ".join(f"{k} {v}" for k, v in data["events"]["counts"].items())
                 if data["events"]["counts"] else "") + ") and `progress.jsonl` "
              f"({len(data['_progress'])} controller samples). Time axes are seconds since "
              f"the first recorded event; the recorded span is {data['span_s']} s.",
              ""]
    checks = []
    per_worker_total = sum(w["chunks"] for w in ws.values())
    checks.append(("chunks per worker sum to chunks_done", per_worker_total,
                   s.get("chunks_done")))
    checks.append(("throughput integrates to the result count", tp["params"], r.get("count")))
    lines += ["| check | plotted | summary | |", "|---|---|---|---|"]
    for name, got, want in checks:
        lines.append(f"| {name} | {_fmt(got)} | {_fmt(want)} | "
                     f"{'ok' if got == want else 'MISMATCH'} |")
    lines.append("")
    if plot_error:
        lines += [f"_Plots not drawn: {plot_error}_", ""]

    def img(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({name})", ""] if name in plots else []

    peak = max(tp["params_per_s"]) if tp["params_per_s"] else 0.0
    mean = tp["params"] / data["span_s"] if data["span_s"] else 0.0
    lines += ["## Throughput over time", ""] + img("throughput.png", "throughput") + [
        f"Bars: parameters completed per second, in {tp['bin_s']:g} s bins by each chunk's "
        f"finish time; line: parameters done so far. Peak {peak:,.0f} params/s, mean "
        f"{mean:,.0f} params/s over the recorded span. Red lines mark injected faults, the "
        "shaded band lasts until the run recovered.", ""]
    lines += ["## Chunks per worker", ""] + img("workers.png", "chunks per worker") + [
        "Which worker wrote each chunk's (first) result. A worker killed mid-run shows fewer "
        "chunks; the others took over its share.", "",
        "| worker | chunks | parameters | busy s |", "|---|---|---|---|"]
    lines += [f"| {w} | {v['chunks']:,} | {v['params']:,} | {v['busy_s']} |"
              for w, v in ws.items()]
    lines += [f"| **total** | **{per_worker_total:,}** | "
              f"**{sum(v['params'] for v in ws.values()):,}** | |", ""]
    lines += ["## Chunk duration distribution", ""] + img("durations.png", "durations") + [
        f"Time inside the task per chunk ({d['n']:,} chunks): mean {d['mean_s'] * 1000:.1f} ms, "
        f"p50 {d['p50_s'] * 1000:.1f} ms, p95 {d['p95_s'] * 1000:.1f} ms, max "
        f"{d['max_s'] * 1000:.1f} ms. A long tail means slow parameters or a starved host. "
        f"Attempts of the kept results: "
        + ", ".join(f"attempt {k}: {v}" for k, v in data["attempts"].items()) + ".", ""]
    kind = "Fault timeline" if data["faults"] else "Worker timeline"
    lines += [f"## {kind}", ""] + img("timeline.png", "timeline") + [
        "One lane per worker; bars are chunks executing (started → finished of the kept "
        "result). Markers: ▼ reclaimed, ▲ retried, ✕ dead-lettered (at the worker that did "
        "it); the dashed grey line is the number of workers alive seen by the controller."
        + (" Red line: the fault; shaded band and green dashed line: until recovered."
           if data["faults"] else " No faults were injected in this run."), ""]
    if data["faults"]:
        lines += ["| fault | target | at (s) | first reclaim after (s) | recovered after (s) |",
                  "|---|---|---|---|---|"]
        for f in data["faults"]:
            lines.append(
                f"| {f.get('type')} | {f.get('target')} | {f.get('at_s')}"
                + (f" (progress {f['at_progress']:.0%})" if f.get("at_progress") is not None
                   else "")
                + f" | {f.get('reclaim_s') if f.get('reclaim_s') is not None else '-'}"
                + (f" (chunk {f['reclaim_chunk']})" if f.get("reclaim_chunk") is not None
                   else "")
                + f" | {f.get('recovered_s', '-')} |")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: Path, objective: str | None = None, goal: str = "min") -> Path:
    """Write report.md, the PNGs and report.json in `run_dir`; return report.md's path."""
    from ttg import results_report

    data = analyse(run_dir)
    computed = results_report.analyse(run_dir, data["summary"], objective, goal)
    plots: list[str] = []
    error = None
    try:
        plots = plot(data, run_dir)
        if computed is not None:
            plots += results_report.plot(computed, run_dir)
    except ImportError as exc:
        error = f"matplotlib is not installed ({exc}); pip install matplotlib"
    public = {k: v for k, v in data.items() if not k.startswith("_")}
    public["plots"] = plots
    public["results"] = computed
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(public, indent=1) + "\n")
    os.replace(tmp, run_dir / "report.json")
    path = run_dir / "report.md"
    text = render(data, plots, error)
    if computed is not None:
        text += "\n" + "\n".join(results_report.render(computed, plots))
    path.write_text(text + "\n")
    return path


def try_report(run_dir: Path) -> Path | None:
    """For `ttg sweep --report`: a report failure must not fail the run."""
    try:
        path = write_report(run_dir, goal=os.environ.get("TTG_GOAL") or "min")
    except Exception as exc:  # noqa: BLE001 - report best-effort at the end of a run
        log.warning("could not write the run report in %s: %s", run_dir, exc)
        return None
    log.info("run report: %s", path)
    return path


def report_cli(run_dir: Path | None, runs_dir: Path, objective: str | None = None,
               goal: str = "min") -> int:
    path = write_report(find_run_dir(run_dir, runs_dir), objective, goal)
    size = sum(p.stat().st_size for p in path.parent.iterdir()
               if p.name in {"report.md", "report.json", "outputs.png", "heatmap.png", *PLOTS})
    print(f"report: {path} ({size / 1024:.0f} KiB with plots)")
    return 0
