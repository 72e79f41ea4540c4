"""The worker loop: take a chunk, run it, write the result and ack together; repeat.

Two-stage shutdown (SIGTERM or SIGINT): the first signal finishes the chunk in hand, hands
back anything prefetched and exits 0; a second signal exits at once (the chunk in hand is
then reclaimed by another worker). Broker outages are retried inside the backend for a
bounded time; past it the worker exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from types import FrameType

from ttg import log as tlog
from ttg import metrics
from ttg.backends import policy
from ttg.backends.base import Backend, Delivery
from ttg.errors import ConfigError
from ttg.rows import encode, run_chunk
from ttg.spaces import Space
from ttg.sweep import JobSpec
from ttg.tasks import BUILTINS, Task, load_task

log = logging.getLogger("ttg.worker")
EXIT_UNFINISHED = 75  # EX_TEMPFAIL: a static worker stopped before its range was done
EXIT_CONFIG = 2  # the job cannot run here (task refused or not importable): no restart helps


def allowed(task: str, allow: str | None) -> bool:
    """Whether a worker started for `allow` (a comma-separated list of tasks; unset: the
    built-ins only) may run `task`. The spec comes from the broker; what runs is ours."""
    if not allow:
        return task in BUILTINS
    return task in {t.strip() for t in allow.split(",") if t.strip()}


class Worker:
    def __init__(
        self,
        backend: Backend,
        run_id: str,
        worker_id: str,
        worker_index: int | None = None,
        exit_when_done: bool = False,
        poll_s: float = 1.0,
        allow_tasks: str | None = None,
    ) -> None:
        self.backend = backend
        self.run_id = run_id
        self.worker_id = worker_id
        self.worker_index = worker_index
        self.exit_when_done = exit_when_done
        self.poll_s = poll_s
        self.stopping = False
        backend.stop_requested = lambda: self.stopping
        self.allow_tasks = allow_tasks
        self.chunks_done = 0
        # Test hook for chaos: die right after the result write, before anything else.

    def _prepare(self, spec: object) -> tuple[Task, Space]:
        """The job's task and space, or ConfigError: refused, not importable, bad space."""
        task_name = spec.task  # type: ignore[attr-defined]
        if not allowed(task_name, self.allow_tasks):
            raise ConfigError(
                f"refusing task {task_name!r}: this worker was started for "
                f"{self.allow_tasks or 'the built-in tasks'} (TTG_TASK)")
        spec.validate()  # type: ignore[attr-defined]
        space = spec.get_space()  # type: ignore[attr-defined]
        return load_task(task_name, space.names, space.kind), space

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            log.warning("second signal %d: exiting now", signum)
            os._exit(128 + signum)
        self.stopping = True
        log.info("signal %d: finishing the chunk in hand, then exiting", signum)

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def run(self) -> int:
        tlog.bind(run_id=self.run_id, worker=self.worker_id)
        spec = self.backend.start_consuming(self.run_id, self.worker_id, self.worker_index)
        if spec is None:
            log.info("stopped before the run was submitted")
            self.backend.close()
            return 0
        try:
            task, space = self._prepare(spec)
        except ConfigError as exc:
            log.error("cannot run this job: %s", exc)
            try:
                self.backend.report_fatal(str(exc))
            finally:
                self.backend.close()
            return EXIT_CONFIG
        log.info("joined run: %d chunks of %d, task %s over a %s space, work_ms %s",
                 spec.chunks_total, spec.chunk_size, spec.task, space.kind, spec.work_ms)
        try:
            while not self.stopping:
                d = self.backend.next_delivery(self.poll_s)
                metrics.HEARTBEAT.set_to_current_time()
                if d is None:
                    if self.exit_when_done and self.backend.finished_for_me():
                        log.info("run complete: exiting (%d chunks done here)", self.chunks_done)
                        break
                    continue
                if self.stopping:
                    self.backend.release(d)
                    break
                self._execute(d, task, space, spec)
            unfinished = (self.stopping and not self.backend.hands_back_work
                          and not self.backend.finished_for_me())
        finally:
            self.backend.release_prefetched()
            self.backend.close()
        if unfinished:
            log.warning("stopped with my range unfinished: exit %d so I am restarted",
                        EXIT_UNFINISHED)
            return EXIT_UNFINISHED
        return 0

    def _execute(self, d: Delivery, task: Task, space: Space, spec: JobSpec) -> None:
        """Run the chunk. A point that raises fails the attempt (retried, as a transient
        error may be); on the last attempt the chunk is stored with those points' errors."""
        extra = {"chunk": d.chunk, "attempt": d.attempt}
        if d.reclaimed:
            metrics.RECLAIMS.inc()
        metrics.IN_FLIGHT.inc()
        t0 = time.time()
        try:
            run = run_chunk(task, space, d.start, d.end, spec.work_ms, d.attempt)
            if run.failed and not policy.exhausted(spec, d.attempt):
                raise _PointsFailed(f"{run.failed} point(s) failed, first: {run.first_error()}")
            rows = encode(run.table())
        except Exception as exc:  # noqa: BLE001 - any task error is the chunk's failure
            task_s = time.time() - t0
            error = str(exc) if isinstance(exc, _PointsFailed) else (
                f"{exc.__class__.__name__}: {exc}")
            outcome = self.backend.fail(d, error, task_s)
            metrics.CHUNKS_FAILED.labels(outcome).inc()
            (metrics.CHUNKS_DEAD if outcome == "dead" else metrics.CHUNKS_RETRIED).inc()
            log.warning("task failed (%s): %s", outcome, error, extra=extra)
            log.debug("%s", traceback.format_exc(), extra=extra)
            return
        finally:
            metrics.IN_FLIGHT.dec()
        t1 = time.time()
        meta = {"worker": self.worker_id, "started": round(t0, 6), "finished": round(t1, 6),
                "task_s": round(t1 - t0, 6), "attempt": d.attempt}
        if run.failed:
            meta["failed"] = run.failed
            metrics.POINTS_FAILED.inc(run.failed)
            log.warning("stored with %d failed point(s) after %d attempts: %s", run.failed,
                        d.attempt, run.first_error(), extra=extra)
        partial = run.partial(spec.objective or "value")
        new = self.backend.complete(d, partial, meta, rows)
        self.chunks_done += 1
        metrics.CHUNKS_DONE.inc()
        metrics.CHUNK_SECONDS.observe(t1 - t0)
        log.debug("chunk done%s", "" if new else " (duplicate: first write kept)", extra=extra)


class _PointsFailed(Exception):
    """Some points of the chunk raised: the attempt fails as a whole (it is retried)."""
