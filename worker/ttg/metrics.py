"""Prometheus metrics of a worker. Exported on a port only when one is given.

Without a port the metric objects are cheap no-op stand-ins, so the hot loop pays nothing
and `prometheus_client` is not even imported.
"""

from __future__ import annotations

from typing import Any


class _Noop:
    def labels(self, *_a: Any, **_k: Any) -> _Noop:
        return self

    def inc(self, *_a: Any) -> None: ...

    def dec(self, *_a: Any) -> None: ...

    def set(self, *_a: Any) -> None: ...

    def observe(self, *_a: Any) -> None: ...


CHUNKS_DONE: Any = _Noop()
CHUNKS_FAILED: Any = _Noop()
CHUNK_SECONDS: Any = _Noop()
RECLAIMS: Any = _Noop()
IN_FLIGHT: Any = _Noop()


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Create the real metrics and serve them on `addr:port`."""
    global CHUNKS_DONE, CHUNKS_FAILED, CHUNK_SECONDS, RECLAIMS, IN_FLIGHT
    import prometheus_client as pc

    CHUNKS_DONE = pc.Counter("ttg_chunks_done_total", "Chunks completed by this worker")
    CHUNKS_FAILED = pc.Counter("ttg_chunks_failed_total", "Chunk executions that raised",
                               ["outcome"])
    CHUNK_SECONDS = pc.Histogram(
        "ttg_chunk_duration_seconds", "Time inside the task per chunk",
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
    RECLAIMS = pc.Counter("ttg_chunks_reclaimed_total", "Chunks taken over from a lost worker")
    IN_FLIGHT = pc.Gauge("ttg_chunks_in_flight", "Chunks being executed now")
    pc.start_http_server(port, addr=addr)
