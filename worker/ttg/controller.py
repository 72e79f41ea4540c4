"""The controller: submit a job, wait for it, aggregate and write the run summary.

Completion is decided from the results and dead letters against the job's chunk list, never
from counters or idle time. While waiting, a run with nothing queued and nothing in flight but
chunks still missing is reconciled: the missing chunks are enqueued again (this also repairs a
broker that lost its last writes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ttg.backends.base import Backend, Progress
from ttg.errors import ConfigError, TTGError
from ttg.partial import Aggregator
from ttg.progress import Reporter
from ttg.sweep import JobSpec, reference_expected_sum
from ttg.tasks import REFERENCE_VALUED

log = logging.getLogger("ttg.controller")


class WaitTimeout(TTGError):
    exit_code = 1


def wait(
    backend: Backend,
    run_id: str,
    reporter: Reporter | None = None,
    timeout_s: float | None = None,
    stall_s: float = 60.0,
    poll_s: float = 0.1,
    tail_poll_s: float = 0.02,
) -> Progress:
    """Block until every chunk is done or dead-lettered (or until it cannot progress).

    Polls every `poll_s`; in the tail (nothing left queued, the last chunks running) every
    twentieth of the mean chunk time, between `tail_poll_s` and `poll_s`: the end of a run is
    seen within a few percent of a chunk, and long chunks are not polled any faster."""
    t0 = time.monotonic()
    last_change = t0
    last_key = None
    reconciled_at = 0.0
    while True:
        p = backend.progress(run_id)
        if reporter:
            reporter.update(p)
        if p.finished:
            return p
        now = time.monotonic()
        key = (p.done, p.dead, p.executions)
        if key != last_key:
            last_key, last_change = key, now
        idle = p.queued == 0 and p.in_flight == 0
        stalled = now - last_change > stall_s
        if (idle or stalled) and now - reconciled_at > max(stall_s / 4, 2.0):
            reconciled_at = now
            backend.reconcile(run_id)
        if stalled and p.workers_alive == 0 and now - last_change > 2 * stall_s:
            log.error("no progress for %.0fs and no live worker: giving up", now - last_change)
            return p
        if timeout_s is not None and now - t0 > timeout_s:
            raise WaitTimeout(f"run {run_id} not finished after {timeout_s:.0f}s")
        if p.queued == 0 and p.executions:
            mean_chunk_s = p.task_s / p.executions
            time.sleep(min(poll_s, max(tail_poll_s, mean_chunk_s / 20)))
        else:
            time.sleep(poll_s)


def aggregate(backend: Backend, run_id: str, chunks_log: Path | None = None) -> Aggregator:
    """Merge every chunk's first result; optionally write the per-chunk log (JSON lines)."""
    agg = Aggregator()
    out = chunks_log.open("w") if chunks_log else None
    try:
        for chunk, partial, meta in backend.results(run_id):
            agg.add(chunk, partial)
            if out:
                out.write(json.dumps({"chunk": chunk, **meta}, separators=(",", ":")) + "\n")
    finally:
        if out:
            out.close()
    return agg


def write_events(backend: Backend, run_id: str, path: Path) -> int:
    """The run's rare events (reclaims, retries, dead letters) as JSON lines."""
    events = backend.events(run_id)
    with path.open("w") as out:
        for e in events:
            out.write(json.dumps(e, separators=(",", ":")) + "\n")
    return len(events)


def expected_result(spec: JobSpec, expect_dead: list[int]) -> tuple[int, float | None]:
    """The count and (for the reference formula, or faults built on it) the exact sum of the
    chunks that should be done: all but the ones expected to be dead-lettered."""
    count, total = spec.params, None
    if spec.task in REFERENCE_VALUED:
        total = reference_expected_sum(spec.params)
    for chunk in expect_dead:
        start, end = spec.bounds(chunk)
        count -= end - start
        if total is not None:
            total -= reference_expected_sum(end) - reference_expected_sum(start)
    return count, None if total is None else round(total, 6)


def build_summary(
    spec: JobSpec,
    backend_name: str,
    platform: str,
    agg: Aggregator,
    progress: Progress,
    dead: list[int],
    wall_s: float,
    faults: list[dict] | None = None,
    expect_dead: list[int] | None = None,
) -> dict:
    """The run summary of DESIGN.md. `ok` means: nothing missing, the exact expected result,
    and exactly the expected dead letters (none, except in a poison experiment)."""
    expect_dead = sorted(expect_dead or [])
    done = agg.seen
    missing = spec.chunks_total - len(done | set(dead))
    result = agg.result()
    count, expected = expected_result(spec, expect_dead)
    ok = (
        missing == 0
        and dead == expect_dead
        and result["count"] == count
        and (expected is None or result["sum"] == expected)
    )
    summary = {
        "run_id": spec.run_id,
        "platform": platform,
        "backend": backend_name,
        "task": spec.task,
        "params": spec.params,
        "chunk_size": spec.chunk_size,
        "workers": spec.workers,
        "work_ms": spec.work_ms,
        "chunks_total": spec.chunks_total,
        "chunks_done": len(done),
        "chunks_missing": missing,
        "chunks_dead_lettered": len(dead),
        "executions": progress.executions,
        "result": result,
        "wall_s": round(wall_s, 3),
        "utilization": round(progress.task_s / (spec.workers * wall_s), 3) if wall_s else 0.0,
        "faults": faults or [],
        "ok": ok,
    }
    if expected is not None:
        summary["expected_sum"] = expected
    if dead or expect_dead:
        summary["dead_lettered"] = dead
    if expect_dead:
        summary["expected_dead_lettered"] = expect_dead
    return summary


def write_summary(runs_dir: Path, summary: dict) -> Path:
    run_dir = runs_dir / summary["run_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    text = json.dumps(summary, indent=2) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    latest = runs_dir / "latest"
    if latest.is_symlink() or latest.is_file():
        latest.unlink()
    if latest.is_dir():
        (latest / "summary.json").write_text(text)
    else:
        latest.symlink_to(summary["run_id"], target_is_directory=True)
    return path


def human(summary: dict) -> str:
    r = summary["result"]
    lines = [
        f"run {summary['run_id']}  {summary['platform']}/{summary['backend']}  "
        f"task {summary['task']}  {summary['workers']} workers",
        f"  chunks   {summary['chunks_done']}/{summary['chunks_total']} done, "
        f"{summary['chunks_missing']} missing, {summary['chunks_dead_lettered']} dead-lettered, "
        f"{summary['executions']} executions",
        f"  result   count {r['count']:,}  sum {r['sum']}  min {r['min']}  max {r['max']}",
        f"  time     {summary['wall_s']:.2f} s wall, utilization {summary['utilization']:.0%}",
    ]
    if "expected_sum" in summary:
        mark = "matches" if r["sum"] == summary["expected_sum"] else "DOES NOT match"
        lines.append(f"  check    sum {mark} the expected {summary['expected_sum']}")
    if summary.get("dead_lettered"):
        lines.append(f"  dead     chunks {summary['dead_lettered'][:20]}")
    for f in summary.get("faults", []):
        if "error" in f:
            lines.append(f"  fault    {f.get('type')}: NOT INJECTED: {f['error']}")
            continue
        rec = f.get("recovered_s")
        recovery = f"recovered in {rec:.2f} s" if rec is not None else "no recovery to measure"
        extra = {k: v for k, v in f.items()
                 if k not in ("type", "target", "at", "at_progress", "recovered_s")}
        lines.append(
            f"  fault    {f.get('type')} {f.get('target', '')} at {f.get('at_progress', 0):.0%}"
            f" -> {recovery}"
            + (f" {extra}" if extra else ""))
    lines.append(f"  verdict  {'OK' if summary['ok'] else 'NOT OK'}")
    return "\n".join(lines)


def measure_faults(faults: list[dict], chunks_jsonl: Path, chunks_total: int = 0) -> list[dict]:
    """Complete fault records given from outside the run (`ttg sweep --faults`, written by
    playbooks/recover-infra.yml): a record with an `at` and no `recovered_s` is measured
    against the run's own results. `recovered_s`: from `at` to the first result after it;
    `last_result_before`: the last result before it (the crash lies between the two, so
    `outage_s` bounds the whole cost of the fault from above); `at_progress`, if not given:
    the share of chunks whose first result came before `at`."""
    from ttg.report import read_jsonl

    todo = [f for f in faults if f.get("recovered_s") is None and f.get("at") is not None]
    if not todo:
        return faults
    finished = [float(row["finished"]) for row in read_jsonl(chunks_jsonl) if "finished" in row]
    for f in todo:
        at = float(f["at"])
        after = min((t for t in finished if t > at), default=None)
        before = max((t for t in finished if t <= at), default=None)
        f["recovered_s"] = round(after - at, 3) if after is not None else None
        if f.get("at_progress") is None and chunks_total:
            f["at_progress"] = round(sum(t <= at for t in finished) / chunks_total, 3)
        if before is not None:
            f["last_result_before"] = round(before, 3)
            if after is not None:
                f["outage_s"] = round(after - before, 3)
    return faults


def load_faults(path: Path) -> list[dict]:
    """A --faults file: a JSON list of records, each with a `type`."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--faults {path}: not a readable JSON file ({exc})") from None
    return parse_faults(text, f"--faults {path}")


def parse_faults(text: str, where: str) -> list[dict]:
    """Fault records given from outside the run: a JSON list of objects with a `type`."""
    try:
        faults = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: '[[[[...' nested too deep
        reason = str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"{where}: not a readable JSON file ({reason})") from None
    if not isinstance(faults, list) or not all(
            isinstance(f, dict) and isinstance(f.get("type"), str) for f in faults):
        raise ConfigError(f"{where}: expected a JSON list of objects with a 'type'")
    for f in faults:  # numbers written by a template may arrive as strings
        for key in ("at", "at_progress", "recovered_s", "outage_s"):
            if key not in f or f[key] is None:
                continue
            value = f[key]
            try:
                if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                    raise ValueError
                f[key] = float(value)
                if not math.isfinite(f[key]) or f[key] < 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{where}: {key} {str(value)[:80]!r} is not a number "
                                  ">= 0") from None
    return faults


def run_sweep(
    backend: Backend,
    spec: JobSpec,
    platform: str,
    runs_dir: Path,
    timeout_s: float | None = None,
    stall_s: float = 60.0,
    faults: list[dict] | None = None,
    reporter: Reporter | None = None,
    during: Callable[[], list[dict]] | None = None,
    expect_dead: list[int] | None = None,
) -> dict:
    """Submit, wait, aggregate; write runs/<id>/summary.json and runs/latest; return it.

    `during` (chaos) runs in a thread from the submission on; the fault records it returns
    go into the summary's `faults`.
    """
    t0 = time.time()
    if not backend.submit(spec):
        log.info("run %s was already submitted: waiting for it", spec.run_id)
        t0 = getattr(backend, "submitted_at", lambda _r: None)(spec.run_id) or t0
    submit_s = time.time() - t0
    injected: list[dict] = []
    thread = None
    if during is not None:
        thread = threading.Thread(target=lambda: injected.extend(during()), name="chaos")
        thread.start()
    reporter = reporter or Reporter(spec.params, spec.chunk_size,
                                    record_dir=runs_dir / spec.run_id, run_id=spec.run_id)
    while True:
        progress = wait(backend, spec.run_id, reporter, timeout_s=timeout_s, stall_s=stall_s)
        run_dir = runs_dir / spec.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        agg = aggregate(backend, spec.run_id, run_dir / "chunks.jsonl")
        write_events(backend, spec.run_id, run_dir / "events.jsonl")
        dead = sorted({d.chunk for d in backend.dead_letters(spec.run_id)} - agg.seen)
        if len(agg.seen) + len(dead) >= spec.chunks_total or not progress.finished:
            break
        # counts said finished but the exact sets disagree (a duplicate dead letter): go on
        backend.reconcile(spec.run_id)
    wall_s = time.time() - t0
    reporter.close(progress)
    if thread is not None:
        thread.join()
    given = measure_faults(list(faults or []), run_dir / "chunks.jsonl", spec.chunks_total)
    summary = build_summary(spec, backend.name, platform, agg, progress, dead, wall_s,
                            [*given, *injected], expect_dead)
    summary["submit_s"] = round(submit_s, 3)
    summary["controller_max_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_summary(runs_dir, summary)
    return summary
