"""Prometheus metrics of a worker and of the controller. Exported on a port only when one is given.

Without a port the metric objects are cheap no-op stand-ins, so the hot loop pays nothing
and `prometheus_client` is not even imported.

Worker (`ttg work --metrics-port P`, `TTG_METRICS_PORT`):

    ttg_chunks_done_total                    chunks this worker completed (result written)
    ttg_chunks_failed_total{outcome}         executions that raised: outcome retried|dead
    ttg_chunks_retried_total                 failed chunks put back for another attempt
    ttg_chunks_dead_lettered_total           failed chunks sent to the dead-letter queue
    ttg_chunks_reclaimed_total               chunks taken over from a lost worker
    ttg_chunk_duration_seconds               histogram of the time inside the task per chunk
    ttg_chunks_in_flight                     chunks being executed now (0 or 1)
    ttg_worker_last_heartbeat_timestamp_seconds   last time the worker loop was alive
    ttg_worker_heartbeat_age_seconds         now minus the above, computed at scrape time
    ttg_worker_info{run_id,worker,backend}   1, labels identify the process

Controller (`ttg sweep|wait --metrics-port P`):

    ttg_run_chunks, ttg_run_chunks_done, ttg_run_chunks_dead, ttg_run_chunks_in_flight,
    ttg_run_chunks_queued, ttg_run_executions, ttg_run_reclaimed, ttg_run_retried,
    ttg_run_workers_alive, ttg_run_params_per_second, ttg_run_finished   (all {run_id})

Addresses: 127.0.0.1 by default; `TTG_METRICS_ADDR` (e.g. 0.0.0.0 inside a pod) to change.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

DEFAULT_ADDR = "127.0.0.1"


class _Noop:
    def labels(self, *_a: Any, **_k: Any) -> _Noop:
        return self

    def inc(self, *_a: Any) -> None: ...

    def dec(self, *_a: Any) -> None: ...

    def set(self, *_a: Any) -> None: ...

    def observe(self, *_a: Any) -> None: ...

    def set_to_current_time(self) -> None: ...


class _Beat:
    """The worker loop's last sign of life; read by two gauges at scrape time."""

    def __init__(self) -> None:
        self.t = time.time()

    def set_to_current_time(self) -> None:
        self.t = time.time()


NOOP: Any = _Noop()

# worker
CHUNKS_DONE: Any = NOOP
CHUNKS_FAILED: Any = NOOP
CHUNKS_RETRIED: Any = NOOP
CHUNKS_DEAD: Any = NOOP
POINTS_FAILED: Any = NOOP
CHUNK_SECONDS: Any = NOOP
RECLAIMS: Any = NOOP
IN_FLIGHT: Any = NOOP
HEARTBEAT: Any = NOOP
WORKER_INFO: Any = NOOP

# controller
_run: RunGauges | None = None

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def enabled() -> bool:
    """True once real metrics exist in this process."""
    return CHUNKS_DONE is not NOOP or _run is not None


def metrics_addr(addr: str | None = None) -> str:
    return addr or os.environ.get("TTG_METRICS_ADDR") or DEFAULT_ADDR


def setup_worker(registry: Any = None, **labels: str) -> None:
    """Create the worker's real metrics in `registry` (default: the global one)."""
    global CHUNKS_DONE, CHUNKS_FAILED, CHUNKS_RETRIED, CHUNKS_DEAD, CHUNK_SECONDS
    global RECLAIMS, IN_FLIGHT, HEARTBEAT, WORKER_INFO, POINTS_FAILED
    import prometheus_client as pc

    reg = registry if registry is not None else pc.REGISTRY
    CHUNKS_DONE = pc.Counter("ttg_chunks_done_total", "Chunks completed by this worker",
                             registry=reg)
    CHUNKS_FAILED = pc.Counter("ttg_chunks_failed_total", "Chunk executions that raised",
                               ["outcome"], registry=reg)
    for outcome in ("retried", "dead"):  # export both series at 0 from the start
        CHUNKS_FAILED.labels(outcome)
    CHUNKS_RETRIED = pc.Counter("ttg_chunks_retried_total",
                                "Failed chunks put back for another attempt", registry=reg)
    CHUNKS_DEAD = pc.Counter("ttg_chunks_dead_lettered_total",
                             "Failed chunks sent to the dead-letter queue by this worker",
                             registry=reg)
    POINTS_FAILED = pc.Counter("ttg_points_failed_total",
                               "Points stored with their error after the chunk's last attempt",
                               registry=reg)
    CHUNK_SECONDS = pc.Histogram("ttg_chunk_duration_seconds", "Time inside the task per chunk",
                                 buckets=DURATION_BUCKETS, registry=reg)
    RECLAIMS = pc.Counter("ttg_chunks_reclaimed_total", "Chunks taken over from a lost worker",
                          registry=reg)
    IN_FLIGHT = pc.Gauge("ttg_chunks_in_flight", "Chunks being executed now", registry=reg)
    HEARTBEAT = beat = _Beat()
    pc.Gauge("ttg_worker_last_heartbeat_timestamp_seconds",
             "Last time the worker loop was alive (epoch seconds)",
             registry=reg).set_function(lambda: beat.t)
    pc.Gauge("ttg_worker_heartbeat_age_seconds", "Seconds since the worker loop was last alive",
             registry=reg).set_function(lambda: max(time.time() - beat.t, 0.0))
    WORKER_INFO = pc.Gauge("ttg_worker_info", "Identifies this worker process",
                           sorted(labels) or ["worker"], registry=reg)
    WORKER_INFO.labels(**(labels or {"worker": "?"})).set(1)


class RunGauges:
    """The controller's view of a run; params/s over a sliding window of samples."""

    def __init__(self, registry: Any, window_s: float = 15.0) -> None:
        import prometheus_client as pc

        def g(name: str, doc: str) -> Any:
            return pc.Gauge(name, doc, ["run_id"], registry=registry)

        self.gauges = {
            "chunks_total": g("ttg_run_chunks", "Chunks in the run"),
            "done": g("ttg_run_chunks_done", "Chunks with a stored result"),
            "dead": g("ttg_run_chunks_dead", "Chunks dead-lettered"),
            "in_flight": g("ttg_run_chunks_in_flight", "Chunks leased to a worker now"),
            "queued": g("ttg_run_chunks_queued", "Chunks waiting in the queue"),
            "executions": g("ttg_run_executions", "Chunk executions so far (>= done)"),
            "reclaimed": g("ttg_run_reclaimed", "Chunks reclaimed from lost workers so far"),
            "retried": g("ttg_run_retried", "Chunk retries after a task error so far"),
            "workers_alive": g("ttg_run_workers_alive", "Workers with a recent heartbeat"),
        }
        self.rate = g("ttg_run_params_per_second", "Parameters completed per second (window)")
        self.finished = g("ttg_run_finished", "1 once every chunk is done or dead-lettered")
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def record(self, run_id: str, p: Any, params: int | None = None,
               chunk_size: int | None = None) -> None:
        d = p.to_dict()
        for key, gauge in self.gauges.items():
            gauge.labels(run_id).set(d[key])
        done_params = p.done * chunk_size if chunk_size else p.done
        if params is not None:
            done_params = min(done_params, params)
        now = time.monotonic()
        self.samples.append((now, done_params))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        self.rate.labels(run_id).set((done_params - n0) / (now - t0) if now > t0 else 0.0)
        self.finished.labels(run_id).set(1 if p.finished else 0)


def setup_controller(registry: Any = None) -> RunGauges:
    """Create the controller's run gauges in `registry` (default: the global one)."""
    global _run
    import prometheus_client as pc

    _run = RunGauges(registry if registry is not None else pc.REGISTRY)
    return _run


def record_progress(run_id: str, p: Any, params: int | None = None,
                    chunk_size: int | None = None) -> None:
    """Controller: publish a progress sample (no-op unless the controller serves metrics)."""
    if _run is not None:
        _run.record(run_id, p, params, chunk_size)


def _start(port: int, addr: str | None) -> int:
    import prometheus_client as pc

    from ttg.errors import ConfigError

    where = metrics_addr(addr)
    try:
        server, _thread = pc.start_http_server(port, addr=where)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {where}:{port}: {exc.strerror or exc}") from exc
    return int(server.server_address[1])


def serve(port: int, addr: str | None = None, **labels: str) -> int:
    """Worker: create the real metrics and serve them on `addr:port`; return the bound port."""
    setup_worker(**labels)
    return _start(port, addr)


def serve_controller(port: int, addr: str | None = None) -> int:
    """Controller: create the run gauges and serve them on `addr:port`; return the port."""
    setup_controller()
    return _start(port, addr)


def reset() -> None:
    """Back to the no-op stand-ins (tests)."""
    global CHUNKS_DONE, CHUNKS_FAILED, CHUNKS_RETRIED, CHUNKS_DEAD, CHUNK_SECONDS
    global RECLAIMS, IN_FLIGHT, HEARTBEAT, WORKER_INFO, _run, POINTS_FAILED
    CHUNKS_DONE = CHUNKS_FAILED = CHUNKS_RETRIED = CHUNKS_DEAD = CHUNK_SECONDS = NOOP
    POINTS_FAILED = NOOP
    RECLAIMS = IN_FLIGHT = HEARTBEAT = WORKER_INFO = NOOP
    _run = None


def exported_names(registry: Any) -> set[str]:
    """Every series name a scrape of `registry` can show (counter `_total`, histogram
    `_bucket/_sum/_count`...), read from the registry itself."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(family.name + sfx for sfx in ("_bucket", "_sum", "_count", "_created"))
    return names
