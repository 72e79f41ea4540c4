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
from ttg.results import ResultsWriter
from ttg.sweep import JobSpec, reference_expected_sum, reference_value
from ttg.tasks import REFERENCE_VALUED

log = logging.getLogger("ttg.controller")


class WaitTimeout(TTGError):
    exit_code = 1


class WorkersFailed(TTGError):
    """The fleet cannot run the job (a task that does not import, a refused task...)."""

    exit_code = 2


def wait(
    backend: Backend,
    run_id: str,
    reporter: Reporter | None = None,
    timeout_s: float | None = None,
    stall_s: float = 60.0,
    poll_s: float = 0.1,
    tail_poll_s: float = 0.02,
    on_poll: Callable[[], object] | None = None,
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
        if on_poll is not None:
            on_poll()
        p = backend.progress(run_id)
        if reporter:
            reporter.update(p)
        if p.finished:
            return p
        errors = backend.worker_errors(run_id)
        if errors:
            worker, error = sorted(errors.items())[0]
            raise WorkersFailed(f"the workers cannot run this job ({len(errors)} said so); "
                                f"{worker}: {error}")
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


def drain_all(writer: ResultsWriter, backend: Backend, run_id: str, done: set[int],
              patience_s: float = 10.0) -> None:
    """Store every row still in transit: until each done chunk's rows are written (a queue
    broker may still be delivering the last ones), for at most `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        writer.drain(backend, run_id, budget_s=5.0)
        if done <= writer.written | set(writer.bad) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def write_events(backend: Backend, run_id: str, path: Path) -> int:
    """The run's rare events (reclaims, retries, dead letters) as JSON lines."""
    events = backend.events(run_id)
    with path.open("w") as out:
        for e in events:
            out.write(json.dumps(e, separators=(",", ":")) + "\n")
    return len(events)


def expected_result(spec: JobSpec, expect_dead: list[int],
                    expect_failed: list[int] | None = None) -> tuple[int, float | None]:
    """The count and (for the reference formula over the range space, or faults built on it)
    the exact sum of the points that should succeed: all but those of the chunks expected to
    be dead-lettered and the points expected to fail."""
    count, total = spec.params, None
    if spec.task in REFERENCE_VALUED and not spec.space:
        total = reference_expected_sum(spec.params)
    for p in expect_failed or []:
        count -= 1
        if total is not None:
            total -= reference_value(p)
    for chunk in expect_dead:
        start, end = spec.bounds(chunk)
        count -= end - start
        if total is not None:
            total -= reference_expected_sum(end) - reference_expected_sum(start)
    return count, None if total is None else round(total, 6)


def worker_seconds(workers: int, wall_s: float, faults: list[dict], t_end: float) -> float:
    """The worker-seconds that existed during the run: the fleet over the wall time, plus or
    minus what a `scale` fault added (from its record's `at`) or removed (from `stopped_at`)."""
    total = workers * wall_s
    for f in faults:
        delta = f.get("workers_delta")
        if isinstance(delta, int) and delta:
            since = f.get("stopped_at", f.get("at")) if delta < 0 else f.get("at")
            if isinstance(since, (int, float)):
                total += delta * min(max(t_end - since, 0.0), wall_s)
    return total


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
    results: dict | None = None,
    expect_failed: list[int] | None = None,
    t_end: float | None = None,
) -> dict:
    """The run summary of DESIGN.md. `ok` means: nothing missing, exactly one stored row per
    point (results + failures), the exact expected result, and exactly the expected dead
    letters and failed points (none, except in a poison experiment). With `results` (the
    stored rows, `ttg.results`), `result` is computed from the rows; the chunks' partials
    must agree with it."""
    expect_dead = sorted(expect_dead or [])
    expect_failed = sorted(expect_failed or [])
    done = agg.seen
    missing = spec.chunks_total - len(done | set(dead))
    result = agg.result()
    rows_ok = True
    if results is not None:
        rows_result = results.pop("stats")
        dead_points = sum(spec.bounds(c)[1] - spec.bounds(c)[0] for c in dead
                          if 0 <= c < spec.chunks_total)
        rows_ok = (results["duplicate_rows"] == 0
                   and results["distinct_indices"] == spec.params - dead_points
                   and results["failed_points"] == len(expect_failed)
                   and not results["unreadable_chunks"]
                   and (results["objective"] != "value" or rows_result["count"] == result["count"]))
        result = rows_result
    count, expected = expected_result(spec, expect_dead, expect_failed)
    worker_s = worker_seconds(spec.workers, wall_s, faults or [],
                              time.time() if t_end is None else t_end)
    ok = (
        missing == 0
        and dead == expect_dead
        and rows_ok
        and (results is None or result["count"] == count or results["objective"] != "value")
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
        "utilization": round(progress.task_s / worker_s, 3) if worker_s > 0 else 0.0,
        "faults": faults or [],
        "ok": ok,
    }
    if expected is not None:
        summary["expected_sum"] = expected
    if dead or expect_dead:
        summary["dead_lettered"] = dead
    if expect_dead:
        summary["expected_dead_lettered"] = expect_dead
    if results is not None:
        summary["results"] = results
    if spec.space:
        space = spec.get_space()
        summary["space"] = {"type": space.kind, "names": list(space.names), "size": space.size}
    if spec.objective:
        summary["objective"] = spec.objective
    if expect_failed:
        summary["expected_failed_points"] = expect_failed
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
    res = summary.get("results")
    if res:
        once = res["duplicate_rows"] == 0 and res["missing_indices"] == 0
        lines.append(f"  results  {res['rows']:,} rows, {res['failed_points']:,} failed points, "
                     f"one row per point: {'yes' if once else 'NO'}  ({res['path']})")
        if res["failed_points"]:
            lines.append(f"  failed   {res['failures_path']}  (ttg results "
                         f"{summary['run_id']} --failures)")
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
    expect_failed: list[int] | None = None,
) -> dict:
    """Submit, wait, aggregate; write runs/<id>/summary.json and runs/latest; return it.

    `during` (chaos) runs in a thread from the submission on; the fault records it returns
    go into the summary's `faults`.
    """
    t0 = time.time()
    if not backend.submit(spec):
        log.info("run %s was already submitted: waiting for it", spec.run_id)
        t0 = backend.submitted_at(spec.run_id) or t0
    submit_s = time.time() - t0
    injected: list[dict] = []
    thread = None
    if during is not None:
        thread = threading.Thread(target=lambda: injected.extend(during()), name="chaos")
        thread.start()
    reporter = reporter or Reporter(spec.params, spec.chunk_size,
                                    record_dir=runs_dir / spec.run_id, run_id=spec.run_id)
    run_dir = runs_dir / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultsWriter(run_dir)
    while True:
        progress = wait(backend, spec.run_id, reporter, timeout_s=timeout_s, stall_s=stall_s,
                        on_poll=lambda: writer.drain(backend, spec.run_id))
        agg = aggregate(backend, spec.run_id, run_dir / "chunks.jsonl")
        drain_all(writer, backend, spec.run_id, agg.seen)
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
    results = writer.finish(spec.params, spec.get_space().names, spec.objective)
    summary = build_summary(spec, backend.name, platform, agg, progress, dead, wall_s,
                            [*given, *injected], expect_dead, results, expect_failed,
                            t_end=t0 + wall_s)
    summary["submit_s"] = round(submit_s, 3)
    summary["controller_max_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_summary(runs_dir, summary)
    return summary
