"""`ttg bench` (behind `make bench`): what the fleet costs, measured against the targets.

For each backend it starts its own worker processes (`ttg work`, the same CLI a fleet runs)
against an already running broker and measures:

1. the reference sweep 10,000 x 1 ms, chunk 100, 3 workers: wall, ideal, utilization;
2. no-op throughput: 100,000 chunks of `noop`: chunks/s;
3. per-chunk overhead (lease -> result written -> ack), p50/p99, from the gaps between one
   worker's consecutive chunks in the no-op run (each gap is one ack plus one lease);
4. scale: 10,000,000 points (10,000 chunks of 1,000, `noop2`: two float outputs per point,
   every row stored in results.parquet): submit time, wall, rows/s into the results dataset,
   broker memory at its peak, controller peak RSS;
5. reclaim latency after SIGKILL: from the kill to the chunk running again elsewhere;
6. the static baseline on the same sweeps, side by side;
7. CPU-bound, side by side with what a user would pick on one machine: the `cpu` task over
   200,000 points with `multiprocessing.Pool(2)` vs the fleet with 2 workers (throughput
   ratio; Redis only).

A benchmark reports; it does not fail on a slow machine. Results: runs/bench/<stamp>.json,
runs/bench/latest.json and a table on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ttg.backends import get_backend
from ttg.backends.base import BrokerConfig
from ttg.chaos import Chaos
from ttg.controller import run_sweep
from ttg.progress import Reporter
from ttg.sweep import JobSpec, new_run_id

log = logging.getLogger("ttg.bench")

FLEET_WARMUP_S = 2.0

TARGETS = {
    ("reference", "utilization"): (">=", 0.95),
    ("noop", "chunks_per_s", "redis"): (">=", 10000),
    ("noop", "chunks_per_s", "rabbitmq"): (">=", 3000),
    ("overhead", "p50_ms", "redis"): ("<=", 1.0),
    ("scale", "broker_peak_mb", "redis"): ("<=", 128),
    ("scale", "controller_rss_mb"): ("<=", 300),
    ("scale", "rows_per_s", "redis"): (">=", 1_000_000),
    ("cpu", "ratio_to_pool", "redis"): (">=", 0.9),
    ("reclaim", "seconds", "redis"): ("<=", 5.0),
    ("reclaim", "seconds", "rabbitmq"): ("<=", 2.0),
}


@dataclass
class Target:
    """Where one backend's broker is, and how to start its workers."""

    backend: str
    url: str
    password_file: str | None

    def config(self) -> BrokerConfig:
        password = Path(self.password_file).read_text().strip() if self.password_file else None
        return BrokerConfig(url=self.url, password=password,
                            ca_file=os.environ.get("TTG_BROKER_CA_FILE") or None)

    def env(self, run_id: str) -> dict[str, str]:
        env = {**os.environ, "TTG_BACKEND": self.backend, "TTG_BROKER_URL": self.url,
               "TTG_RUN_ID": run_id, "TTG_LOG_LEVEL": "WARNING"}
        if self.password_file:
            env["TTG_BROKER_PASSWORD_FILE"] = self.password_file
        return env


class Fleet:
    """Worker processes of one run; doubles as the chaos platform for the reclaim bench."""

    def __init__(self, target: Target, run_id: str, n: int) -> None:
        self.procs = {
            f"worker-{i}": subprocess.Popen(
                [sys.executable, "-m", "ttg.cli", "work", "--worker-index", str(i),
                 "--exit-when-done"],
                env=target.env(run_id), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(n)
        }

    def workers(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def kill_worker(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def kill_broker(self) -> None:
        raise NotImplementedError("the bench does not kill brokers")

    def add_worker(self, name: str, env: dict[str, str]) -> object:
        raise NotImplementedError

    def stop_added(self, handle: object, sig: int) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not leave the finished run: killed", p.pid)
                p.kill()
                p.wait()


def _quiet_reporter(spec: JobSpec) -> Reporter:
    return Reporter(spec.params, spec.chunk_size, stream=open(os.devnull, "w"), live=False)  # noqa: SIM115


class BrokerMemory:
    """Samples the broker's memory during a run (Redis `used_memory`, RabbitMQ node memory)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        backend = get_backend(self.target.backend, self.target.config())
        try:
            return backend.broker_memory_bytes()
        finally:
            backend.close()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.sample())
            except Exception as exc:  # noqa: BLE001 - sampling is best effort
                log.debug("memory sample failed: %s", exc)

    def __enter__(self) -> BrokerMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sweep(target: Target, runs_dir: Path, params: int, chunk: int, task: str, work_ms: float,
          workers: int = 3, during: object = None) -> dict:
    run_id = "bench-" + new_run_id()
    spec = JobSpec(run_id, params, chunk, task, work_ms, workers).validate()
    fleet = Fleet(target, run_id, workers)
    backend = get_backend(target.backend, target.config())
    try:
        backend.check()
        # As on the platforms (a supervisord program, a Deployment), the fleet is up and
        # waiting before the job is submitted: wall_s measures the sweep, not Python start-up.
        time.sleep(FLEET_WARMUP_S)
        summary = run_sweep(backend, spec, "local", runs_dir, stall_s=30,
                            reporter=_quiet_reporter(spec),
                            during=during(fleet, spec) if callable(during) else None)
    finally:
        fleet.wait()
        backend.close()
    # each experiment starts from an empty broker; only once the fleet has left the run
    # (a worker waits for the run to be complete, and a purged run never is)
    backend = get_backend(target.backend, target.config())
    backend.purge(run_id)
    backend.close()
    return summary


def overhead_ms(runs_dir: Path, run_id: str) -> tuple[float | None, float | None]:
    """p50/p99 of the gap between one worker's consecutive chunks (ack + next lease)."""
    from ttg.report import read_jsonl

    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in read_jsonl(runs_dir / run_id / "chunks.jsonl"):
        by_worker[row["worker"]].append((row["started"], row["finished"]))
    gaps = []
    for rows in by_worker.values():
        rows.sort()
        gaps += [(b[0] - a[1]) * 1000 for a, b in zip(rows, rows[1:], strict=False)]
    if not gaps:
        return None, None
    gaps.sort()
    return (round(statistics.median(gaps), 3),
            round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 3))


def bench_backend(target: Target, runs_dir: Path, quick: bool) -> dict:
    b = target.backend
    out: dict[str, dict] = {}
    scale = 10 if quick else 1
    log.warning("[%s] reference sweep 10,000 x 1 ms", b)
    s = sweep(target, runs_dir, 10000, 100, "reference", 1)
    ideal = 10000 * 0.001 / 3
    out["reference"] = {"wall_s": s["wall_s"], "ideal_s": round(ideal, 3),
                        "utilization": s["utilization"], "ok": s["ok"]}

    n = 100000 // scale
    log.warning("[%s] no-op throughput, %d chunks", b, n)
    s = sweep(target, runs_dir, n, 1, "noop", 0)
    out["noop"] = {"chunks": n, "wall_s": s["wall_s"],
                   "chunks_per_s": round(n / s["wall_s"]), "ok": s["ok"]}
    p50, p99 = overhead_ms(runs_dir, s["run_id"])
    out["overhead"] = {"p50_ms": p50, "p99_ms": p99}

    params = 10_000_000 // scale
    log.warning("[%s] scale: %d parameters in chunks of 1,000", b, params)
    with BrokerMemory(target) as mem:
        base = mem.sample()
        s = sweep(target, runs_dir, params, 1000, "noop2", 0)
    rows = (s.get("results") or {}).get("rows", 0)
    out["scale"] = {"params": params, "submit_s": s.get("submit_s"), "wall_s": s["wall_s"],
                    "rows": rows, "rows_per_s": round(rows / s["wall_s"]) if s["wall_s"] else 0,
                    "broker_peak_mb": round(mem.peak / 2**20, 1),
                    "broker_growth_mb": round(max(mem.peak - base, 0) / 2**20, 1),
                    "controller_rss_mb": s.get("controller_max_rss_mb"), "ok": s["ok"]}

    if b != "static":
        log.warning("[%s] reclaim latency after SIGKILL", b)

        def during(fleet: Fleet, spec: JobSpec):  # noqa: ANN202
            chaos = Chaos("worker-kill", spec, fleet,
                          lambda: get_backend(b, target.config()), at=0.3)
            return chaos.run

        s = sweep(target, runs_dir, 3000, 100, "reference", 5, during=during)
        rec = [f.get("recovered_s") for f in s["faults"]]
        out["reclaim"] = {"seconds": rec[0] if rec else None, "ok": s["ok"]}
    if b == "redis":
        n = 200_000 // scale
        log.warning("[%s] CPU-bound: %d points, Pool(2) vs 2 workers", b, n)
        pool_s = pool_seconds(n)
        s = sweep(target, runs_dir, n, 1000, "cpu", 0, workers=2)
        out["cpu"] = {"points": n, "pool_s": round(pool_s, 3), "fleet_s": s["wall_s"],
                      "ratio_to_pool": round(pool_s / s["wall_s"], 3) if s["wall_s"] else 0,
                      "ok": s["ok"]}
    return out


def pool_seconds(n: int) -> float:
    """What one machine's usual tool takes: multiprocessing.Pool(2) over the same points,
    started and warm before the clock starts, like the fleet."""
    import multiprocessing

    from ttg.tasks import cpu

    with multiprocessing.Pool(2) as pool:
        pool.map(cpu, range(2))  # both processes up
        t0 = time.perf_counter()
        pool.map(cpu, range(n), chunksize=1000)
        return time.perf_counter() - t0


def check_targets(results: dict) -> list[dict]:
    rows = []
    for key, (op, goal) in TARGETS.items():
        exp, metric = key[0], key[1]
        backends = [key[2]] if len(key) > 2 else [b for b in results if b != "static"]
        for b in backends:
            value = results.get(b, {}).get(exp, {}).get(metric)
            if value is None:
                continue
            met = value >= goal if op == ">=" else value <= goal
            rows.append({"backend": b, "what": f"{exp}.{metric}", "measured": value,
                         "target": f"{op} {goal}", "met": met})
    return rows


def table(results: dict, targets: list[dict]) -> str:
    lines = [f"{'backend':<9} {'reference wall/ideal':>21} {'util':>5} {'noop ch/s':>10} "
             f"{'ovh p50/p99 ms':>15} {'10M wall':>9} {'rows/s':>10} {'submit':>7} "
             f"{'broker MB':>10} {'ctl RSS':>8} {'reclaim s':>10}"]
    for b, r in results.items():
        ref, noop, ovh = r["reference"], r["noop"], r["overhead"]
        sc, rec = r["scale"], r.get("reclaim", {})
        lines.append(
            f"{b:<9} {ref['wall_s']:>12.2f} / {ref['ideal_s']:<6.2f} {ref['utilization']:>5.2f} "
            f"{noop['chunks_per_s']:>10,} {str(ovh['p50_ms']):>7}/{str(ovh['p99_ms']):<7} "
            f"{sc['wall_s']:>9.1f} {sc.get('rows_per_s', 0):>10,} {str(sc['submit_s']):>7} "
            f"{sc['broker_peak_mb']:>10} "
            f"{str(sc['controller_rss_mb']):>8} {str(rec.get('seconds', '-')):>10}")
    for b, r in results.items():
        if "cpu" in r:
            c = r["cpu"]
            lines.append(f"cpu-bound ({b}): {c['points']:,} points, Pool(2) {c['pool_s']} s, "
                         f"2 workers {c['fleet_s']} s: {c['ratio_to_pool']:.2f} of Pool's "
                         "throughput")
    lines.append("")
    lines.append("targets:")
    for t in targets:
        lines.append(f"  {'MET ' if t['met'] else 'MISS'} {t['backend']:<9} {t['what']:<24} "
                     f"measured {t['measured']}  target {t['target']}")
    return "\n".join(lines)


def main(targets: list[Target], runs_dir: Path, quick: bool = False) -> int:
    bench_dir = runs_dir / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    t0 = time.time()
    for target in targets:
        results[target.backend] = bench_backend(target, bench_dir / "runs", quick)
    met = check_targets(results)
    doc = {"stamp": time.strftime("%Y%m%d-%H%M%S"), "quick": quick, "cpus": os.cpu_count(),
           "duration_s": round(time.time() - t0, 1), "results": results, "targets": met}
    text = json.dumps(doc, indent=2) + "\n"
    (bench_dir / f"{doc['stamp']}.json").write_text(text)
    (bench_dir / "latest.json").write_text(text)
    print(table(results, met))
    print(f"\nwritten: {bench_dir / 'latest.json'} ({doc['duration_s']} s)")
    return 0
