"""Fault injection for `make chaos`: one fault per run, measured, recorded in the summary.

A fault runs in a thread beside the controller (`controller.run_sweep(during=...)`), against
a *platform* (`ttg.chaos_platforms`: `LocalPlatform` for supervisord, `KubePlatform` for the
Kubernetes API) that knows how to find, kill and add workers and how to kill the broker.

Each fault returns records `{type, target, at, at_progress, recovered_s, ...}`. `recovered_s`
is measured from the fault until the affected work was running again: a `reclaimed` event for
the chunk the victim held (queue backends: another worker or the restarted one took it; static:
the restarted index started it again), or, for the broker, the first new result after it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ttg.backends.base import Backend, Progress
from ttg.errors import ConfigError
from ttg.progress import note_fault
from ttg.sweep import JobSpec

if TYPE_CHECKING:
    from ttg.chaos_platforms import Platform

log = logging.getLogger("ttg.chaos")
T = TypeVar("T")

FAULTS = (
    "worker-kill",
    "worker-kill-repeat",
    "kill-after-write",
    "graceful-stop",
    "broker-kill",
    "poison",
    "slow-chunk",
    "scale",
)

# Static has no queue: nothing to add workers to, and no ack to die before.
NOT_FOR = {"static": ("scale", "kill-after-write")}


def faults_for(backend: str, requested: str | None = None) -> list[str]:
    """The faults `make chaos` runs: FAULT= (comma-separated) or all that apply."""
    applicable = [f for f in FAULTS if f not in NOT_FOR.get(backend, ())]
    if not requested or requested == "all":
        return applicable
    chosen = [f.strip() for f in requested.split(",") if f.strip()]
    for f in chosen:
        if f not in FAULTS:
            raise ConfigError(f"unknown fault {f!r}: valid faults are {', '.join(FAULTS)}")
        if f not in applicable:
            raise ConfigError(f"fault {f!r} does not apply to the {backend} backend")
    return chosen


# Faults whose setup is in the job itself (task + worker environment), not in a kill.
TASK_FOR_FAULT = {"poison": "poison", "slow-chunk": "slow"}


def worker_env_for(fault: str, spec_chunk_size: int, min_idle_ms: int) -> dict[str, str]:
    """The extra worker environment a fault needs (the fleet is started with it), with the
    hooked task the fault runs as the workers' only task (TTG_TASK)."""
    if fault == "poison":
        return {"TTG_POISON_PARAM": str(poison_param(spec_chunk_size)), "TTG_TASK": "poison"}
    if fault == "slow-chunk":
        return {"TTG_SLOW_PARAM": "0", "TTG_SLOW_S": f"{3 * min_idle_ms / 1000:.1f}",
                "TTG_TASK": "slow"}
    return {}


def poison_param(chunk_size: int) -> int:
    """The poisoned parameter: the first of chunk 3 (any fixed chunk would do)."""
    return 3 * chunk_size


@dataclass
class Chaos:
    """One fault against one run. `make_backend` gives a fresh backend for this thread."""

    fault: str
    spec: JobSpec
    platform: Platform
    make_backend: Callable[[], Backend]
    at: float = 0.3
    interval_s: float = 1.0
    max_kills: int = 5
    worker_env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ConfigError(f"unknown fault {self.fault!r}: valid faults are {', '.join(FAULTS)}")
        if not 0.0 <= self.at < 1.0:
            raise ConfigError(f"AT must be in [0, 1), got {self.at}")
        self.b: Backend | None = None
        self.deadline = time.monotonic() + self.timeout_s

    # ---- helpers ----------------------------------------------------------------------
    def progress(self) -> Progress | None:
        try:
            assert self.b is not None
            return self.b.progress(self.spec.run_id)
        except Exception as exc:  # noqa: BLE001 - the broker may be down on purpose
            log.debug("progress unavailable: %s", exc)
            return None

    def fraction(self, p: Progress | None) -> float:
        return (p.done + p.dead) / p.chunks_total if p and p.chunks_total else 0.0

    def finished(self) -> bool:
        p = self.progress()
        return bool(p and p.finished)

    def wait_until(self, frac: float) -> float:
        while time.monotonic() < self.deadline:
            p = self.progress()
            if p and (self.fraction(p) >= frac or p.finished):
                return self.fraction(p)
            time.sleep(0.02)
        raise TimeoutError(f"run did not reach {frac:.0%} in time")

    def busy_victim(self) -> tuple[str | None, list[int]]:
        """A worker holding a chunk right now (so the kill costs something), and its chunks."""
        assert self.b is not None
        for _ in range(200):
            names = sorted(self.platform.workers())
            for name in names:
                held = self.b.held_by(self.spec.run_id, name)
                if held is None:  # the backend cannot tell: any worker will do
                    return name, []
                if held:
                    return name, held
            if self.finished():
                break
            time.sleep(0.01)
        names = sorted(self.platform.workers())
        return (names[0] if names else None), []

    def await_reclaim(self, since: float, chunks: list[int]) -> float | None:
        """Seconds from `since` to the first reclaim of one of `chunks` (any if unknown)."""
        assert self.b is not None
        while time.monotonic() < self.deadline:
            done = self.finished()  # before the scan: a reclaim recorded by then is seen
            for e in self.b.events(self.spec.run_id):
                if e.get("kind") != "reclaimed" or float(e["ts"]) < since:
                    continue
                if not chunks or e.get("chunk") in chunks:
                    return round(float(e["ts"]) - since, 3)
            if done:
                return None
            time.sleep(0.05)
        return None

    def record(self, kind: str, target: str, at: float, frac: float, **extra: object) -> dict:
        rec = {"type": kind, "target": target, "at": round(at, 3),
               "at_progress": round(frac, 3), **extra}
        log.warning("fault injected: %s", rec)
        note_fault()
        return rec

    # ---- faults -----------------------------------------------------------------------
    def run(self) -> list[dict]:
        self.b = self.make_backend()
        try:
            self.platform.workers()  # warm the worker list before the strike point
            return getattr(self, "fault_" + self.fault.replace("-", "_"))()
        except Exception as exc:  # noqa: BLE001 - a failed injection is reported, not hidden
            log.error("fault %s could not be injected: %s", self.fault, exc)
            return [{"type": self.fault, "error": str(exc), "recovered_s": None}]
        finally:
            self.b.close()

    def _kill_one(self, frac: float | None = None) -> dict | None:
        frac = self.wait_until(self.at) if frac is None else frac
        victim, _ = self.busy_victim()
        if victim is None:  # every worker already finished: nothing left to hurt
            return None
        t = time.time()
        self.platform.kill_worker(victim, signal.SIGKILL)
        # what it held at the moment of death (its lease is frozen now), not a moment before
        assert self.b is not None
        held = self.b.held_by(self.spec.run_id, victim)
        frac = self.fraction(self.progress()) or frac
        rec = self.record("worker-kill", victim, t, frac, held=held)
        # held [] = it held nothing at death: nothing had to be recovered
        recovered = 0.0 if held == [] else self.await_reclaim(t, held or [])
        if recovered is None and held is None and self.finished():
            # the backend cannot tell what a dead consumer held (RabbitMQ), and the run
            # ended with no chunk redelivered since the kill: it held none
            recovered = 0.0
            rec["held"] = []
        rec["recovered_s"] = recovered
        return rec

    def fault_worker_kill(self) -> list[dict]:
        rec = self._kill_one()
        if rec is None:
            raise ConfigError("no running worker to kill: the run ended before the fault")
        return [rec]

    def fault_worker_kill_repeat(self) -> list[dict]:
        recs: list[dict] = []
        self.wait_until(min(self.at, 0.1))
        while len(recs) < self.max_kills and not self.finished():
            frac = self.fraction(self.progress())
            if frac >= 0.9:  # the tail: too late for a kill to cost anything measurable
                break
            rec = self._kill_one(frac)
            if rec is None:
                break
            rec["type"] = "worker-kill-repeat"
            recs.append(rec)
            time.sleep(self.interval_s)
        if not recs:
            raise ConfigError("no running worker to kill: the run ended before the fault")
        return recs

    def fault_kill_after_write(self) -> list[dict]:
        """An extra worker armed to die right after its first result write (before the ack
        on RabbitMQ; Redis writes and acks in one script, so there the kill follows both)."""
        frac = self.wait_until(self.at)
        env = {"TTG_EXIT_AFTER_FIRST_WRITE": "1"}
        t = time.time()
        handle = self.platform.add_worker("armed-0", env)
        rc = self.platform.wait_added(handle)
        rec = self.record("kill-after-write", "armed-0", t, frac, exit_code=rc)
        # no reclaim at all = nothing was left un-acked (Redis writes and acks together)
        rec["recovered_s"] = self.await_reclaim(t, []) or 0.0
        return [rec]

    def fault_graceful_stop(self) -> list[dict]:
        frac = self.wait_until(self.at)
        victim, held = self.busy_victim()
        if victim is None:
            raise ConfigError("no running worker to stop: the run ended before the fault")
        t = time.time()
        self.platform.kill_worker(victim, signal.SIGTERM)
        rec = self.record("graceful-stop", victim, t, frac, held=held)
        # finished in hand: the chunk is done without anybody reclaiming it
        rec["recovered_s"] = 0.0
        return [rec]

    def fault_broker_kill(self) -> list[dict]:
        frac = self.wait_until(self.at)
        p = self.progress()
        done_before = p.done if p else 0
        t = time.time()
        self.platform.kill_broker()
        rec = self.record("broker-kill", "broker", t, frac)
        rec["recovered_s"] = None
        while time.monotonic() < self.deadline:
            p = self.progress()
            if p and (p.done > done_before or p.finished):
                rec["recovered_s"] = round(time.time() - t, 3)
                break
            time.sleep(0.05)
        return [rec]

    def fault_poison(self) -> list[dict]:
        """recovered_s: from the chunk's first failure to its result (stored on its last
        attempt with the poisoned point's error), i.e. how long the poison kept
        circulating before it was set aside."""
        t = time.time()
        param = int(self.worker_env.get("TTG_POISON_PARAM", poison_param(self.spec.chunk_size)))
        chunk = param // self.spec.chunk_size
        assert self.b is not None

        def stored_at() -> float | None:
            for c, _partial, meta in self.b.results(self.spec.run_id):  # type: ignore[union-attr]
                if c == chunk:
                    return float(meta.get("finished", time.time()))
            return None

        done_at = None
        while time.monotonic() < self.deadline and not self.finished():
            done_at = stored_at()
            if done_at is not None:
                break
            time.sleep(0.1)
        done_at = done_at or stored_at()
        mine = [e for e in self.b.events(self.spec.run_id) if e.get("chunk") == chunk]
        first_fail = min((float(e["ts"]) for e in mine if e.get("kind") == "retried"),
                         default=None)
        recovered = round(done_at - first_fail, 3) if first_fail and done_at else None
        return [self.record("poison", f"chunk-{chunk}", first_fail or t, 0.0,
                            expected_failed=[param], recovered_s=recovered)]

    def fault_slow_chunk(self) -> list[dict]:
        t = time.time()
        slow_s = float(self.worker_env.get("TTG_SLOW_S", "9"))
        while time.monotonic() < self.deadline and not self.finished():
            time.sleep(0.1)
        assert self.b is not None
        stolen = [e for e in self.b.events(self.spec.run_id)
                  if e.get("kind") == "reclaimed" and e.get("chunk") == 0]
        # nothing was lost, so there is nothing to recover: 0 unless the chunk was stolen
        return [self.record("slow-chunk", "chunk-0", t, 0.0, slow_s=slow_s,
                            stolen=len(stolen), recovered_s=0.0 if not stolen else None)]

    def fault_scale(self) -> list[dict]:
        frac = self.wait_until(min(self.at, 0.5))
        t_up = time.time()
        added = [self.platform.add_worker(f"extra-{i}", {}) for i in range(2)]
        recs = [self.record("scale-up", "+2 workers", t_up, frac, recovered_s=0.0,
                            workers_delta=len(added))]
        frac = self.wait_until(min(self.at + 0.3, 0.9))
        t_down = time.time()
        codes = [self.platform.stop_added(h, signal.SIGTERM) for h in added]
        recs.append(self.record("scale-down", "-2 workers", t_down, frac, exit_codes=codes,
                                recovered_s=0.0, workers_delta=-len(added),
                                stopped_at=round(time.time(), 3)))
        return recs


def experiment_spec(spec: JobSpec, fault: str) -> tuple[JobSpec, list[int]]:
    """The job a fault runs (poison/slow swap in their hooked task) and the points that are
    expected to end in failures.parquet (the poisoned one)."""
    task = TASK_FOR_FAULT.get(fault)
    if task and spec.task != "reference":
        raise ConfigError(f"fault {fault} is built on the reference task, not {spec.task!r}")
    if task:
        spec = JobSpec(**{**spec.__dict__, "task": task})
    expect_failed = [poison_param(spec.chunk_size)] if fault == "poison" else []
    if expect_failed and expect_failed[0] >= spec.params:
        raise ConfigError("the poison experiment needs at least 4 chunks")
    return spec, expect_failed


def table(summaries: list[dict]) -> str:
    """fault × backend → lost, redundant executions, duplicate effects, recovered_s, verdict.

    `lost` counts chunks missing or dead-lettered beyond what the experiment expected;
    `redone` the chunks a kill interrupted (done again from the start; `?` when the backend
    cannot tell what the victim held); `redundant` the
    executions beyond one per chunk (duplicates and failed attempts); `dup effects` is 0 when
    the sum is exact (a chunk counted twice would change it) and the stored results hold no
    index twice; `lost` also counts the points without a stored row."""
    rows = [("fault", "backend", "platform", "lost", "redone", "redundant", "dup effects",
             "recovered_s", "ok")]
    for s in summaries:
        faults = [f for f in s.get("faults", []) if "type" in f]
        if not faults:
            continue
        kinds = sorted({f["type"] for f in faults})
        rec = [f["recovered_s"] for f in faults if f.get("recovered_s") is not None]
        expected_dead = set(s.get("expected_dead_lettered", []))
        lost = s["chunks_missing"] + len(set(s.get("dead_lettered", [])) - expected_dead)
        res = s.get("results") or {}
        exact = s.get("expected_sum") is None or s["result"]["sum"] == s["expected_sum"]
        dups = res.get("duplicate_rows", 0)
        # chunks a kill interrupted (their partial work is lost and done again); "?" where
        # the backend cannot tell what the victim held (RabbitMQ: the broker does not say)
        held = [f.get("held") for f in faults if f["type"].startswith("worker-kill")]
        redone = "?" if any(h is None for h in held) else str(sum(len(h) for h in held))
        rows.append((
            "+".join(kinds), s["backend"], s["platform"],
            str(lost) + (f" (+{res['missing_indices']} points)" if res.get("missing_indices")
                         else ""), redone,
            str(s["executions"] - s["chunks_done"] - s["chunks_dead_lettered"]),
            (str(dups) + (" rows" if dups else "")) if exact else "SUM WRONG",
            "/".join(f"{r:.2f}" for r in rec) if rec else "-",
            "yes" if s["ok"] else "NO",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
