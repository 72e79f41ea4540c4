"""Static backend: the first milestone's model, kept as the baseline.

Worker `i` of `W` owns a contiguous range of chunks (the Kubernetes Indexed Job's
`JOB_COMPLETION_INDEX`); there is no queue. Results go to the same Redis result store as the
`redis` backend (first write wins), so aggregation and the summary are the same. A restarted
worker skips the chunks already done and redoes the one it was killed in: that redundant work is
what a fault costs here, and `executions` shows it. Nobody else picks up a dead worker's range:
if it is not restarted, its chunks stay missing and the run ends `ok: false`.
"""

from __future__ import annotations

import collections
import logging
import threading

from ttg.backends import policy
from ttg.backends.base import BrokerConfig, Delivery, Progress
from ttg.backends.redis_store import Keys, RedisStore
from ttg.errors import ConfigError
from ttg.partial import Partial, encode_result
from ttg.sweep import JobSpec, static_range

log = logging.getLogger("ttg.static")


class StaticBackend(RedisStore):
    name = "static"
    hands_back_work = False

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self._todo: collections.deque[int] = collections.deque()
        self._retry_attempt: dict[int, int] = {}
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    # ---- controller -------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> bool:
        k = Keys(spec.run_id)
        created = self._create_meta(spec)
        if not created and self.r.hexists(k.meta, "enqueued"):
            return False
        self.batch(lambda p: (p.hset(k.meta, "enqueued", spec.chunks_total),
                              p.rpush(k.go, *(["go"] * spec.workers))), transaction=True)
        return True

    def progress(self, run_id: str) -> Progress:
        spec = self.submitted_spec(run_id)
        p = self.base_progress(run_id, spec)
        p.in_flight = min(p.workers_alive, spec.chunks_total - p.done - p.dead)
        p.queued = max(spec.chunks_total - p.done - p.dead - p.in_flight, 0)
        return p

    def held_by(self, run_id: str, worker: str) -> list[int] | None:
        """The first unfinished chunk of the worker's range (`worker-<index>` names)."""
        spec = self.load_spec(run_id)
        index = worker.rpartition("-")[2]
        if spec is None or not index.isdigit() or int(index) >= spec.workers:
            return None
        mine = list(static_range(int(index), spec.workers, spec.chunks_total))
        flags = self.r.hmget(Keys(run_id).results, [str(c) for c in mine]) if mine else []
        return [c for c, f in zip(mine, flags, strict=True) if f is None][:1]

    def reconcile(self, run_id: str) -> list[int]:
        """Nothing to re-enqueue: each range belongs to its worker index."""
        return []

    def replay_dead(self, run_id: str, chunks: list[int] | None = None) -> list[int]:
        raise ConfigError("the static backend has no queue to replay into; rerun the index")

    # ---- worker -----------------------------------------------------------------------
    def start_consuming(self, run_id: str, worker_id: str,
                        worker_index: int | None) -> JobSpec | None:
        if worker_index is None:
            raise ConfigError(
                "the static backend needs a worker index (--worker-index, TTG_WORKER_INDEX "
                "or JOB_COMPLETION_INDEX)"
            )
        self.keys = k = Keys(run_id)
        self.worker_id = worker_id
        self.heartbeat()
        self._beater = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._beater.start()
        spec = self.load_spec(run_id)
        while spec is None:  # wait for the submission; restarted workers find it at once
            if self.stop_requested():
                return None
            self.retrying(lambda: self.r.blpop([k.go], timeout=1))
            spec = self.load_spec(run_id)
        self.spec = spec
        mine = list(static_range(worker_index, spec.workers, spec.chunks_total))
        done = set()
        if mine:
            flags = self.retrying(lambda: self.r.hmget(k.results, [str(c) for c in mine]))
            dead = {d.chunk for d in self.dead_letters(run_id)}
            done = {c for c, f in zip(mine, flags, strict=True) if f is not None} | dead
        self._todo.extend(c for c in mine if c not in done)
        if done:
            log.info("resuming: %d of my %d chunks already done", len(done), len(mine))
        return spec

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - best effort
                log.debug("heartbeat failed: %s", exc)

    def next_delivery(self, timeout_s: float) -> Delivery | None:
        assert self.spec is not None and self.keys is not None
        if not self._todo:
            return None
        chunk = self._todo.popleft()
        start, end = self.spec.bounds(chunk)
        # Executions started per chunk survive a restart, so a chunk that kills its worker
        # every time is dead-lettered instead of crash-looping forever.
        started = self.retrying(lambda: self.r.hincrby(self.keys.attempts, str(chunk), 1))
        attempt = self._retry_attempt.get(chunk, 1)
        lost = started - attempt
        reason = policy.lost_too_often(self.spec, attempt, lost)
        if reason is not None:
            self.dead_letter(chunk, reason, started)
            return self.next_delivery(timeout_s)
        if lost > 0:
            self.event("reclaimed", chunk=chunk, attempt=attempt, delivery=started)
        return Delivery(self.spec.run_id, chunk, start, end, attempt, reclaimed=lost > 0)

    def complete(self, delivery: Delivery, partial: Partial, meta: dict,
                 rows: bytes = b"") -> bool:
        new = self.store_result(delivery.chunk, encode_result(partial, **meta),
                                float(meta.get("task_s", 0.0)), rows=rows)
        if self.after_write is not None:
            self.after_write()
        return new

    def fail(self, delivery: Delivery, error: str, task_s: float = 0.0) -> str:
        assert self.spec is not None and self.keys is not None
        if policy.exhausted(self.spec, delivery.attempt):
            self.dead_letter(delivery.chunk, error, delivery.attempt, task_s=task_s)
            return "dead"
        self._retry_attempt[delivery.chunk] = delivery.attempt + 1
        self._todo.appendleft(delivery.chunk)
        self.event("retried", chunk=delivery.chunk, attempt=delivery.attempt + 1,
                   error=error[:500])
        stats = self.keys.stats
        self.batch(lambda p: (p.hincrby(stats, "retried", 1), p.hincrby(stats, "executions", 1),
                              p.hincrbyfloat(stats, "task_s", task_s)), transaction=True)
        return "retried"

    def release(self, delivery: Delivery) -> None:
        self._todo.appendleft(delivery.chunk)

    def finished_for_me(self) -> bool:
        return not self._todo

    def close(self) -> None:
        self._stop.set()
        super().close()
