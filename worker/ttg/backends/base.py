"""The contract every backend implements, controller side and worker side.

A backend object is made per process from a `BrokerConfig`. The worker loop (`ttg.worker`)
and the controller (`ttg.controller`) only talk to this interface, so a new backend gets the
whole CLI, the summary and the shared test-suite.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ttg.errors import ConfigError
from ttg.partial import Partial
from ttg.sweep import JobSpec


@dataclass
class BrokerConfig:
    url: str
    password: str | None = field(default=None, repr=False)  # never in a repr or a log
    # worker tuning
    prefetch: int = 1
    min_idle_ms: int = 3000  # a lease not renewed for this long is reclaimed (Redis)
    connect_timeout_s: float = 10.0  # bounded retries when the broker is not up
    retry_budget_s: float = 60.0  # how long a worker keeps reconnecting before exiting
    options: dict[str, Any] = field(default_factory=dict)
    # TLS (rediss://, amqps://): the CA that signed the broker's certificate (backends/tls.py)
    ca_file: str | None = None

    def __repr__(self) -> str:
        """Without the password, and with any password in the URL masked."""
        from urllib.parse import urlsplit, urlunsplit

        url = self.url
        try:
            parts = urlsplit(url)
            if parts.password is not None:
                host = parts.hostname or ""
                host = f"[{host}]" if ":" in host else host
                netloc = f"{parts.username or ''}:***@{host}"
                netloc += f":{parts.port}" if parts.port else ""
                url = urlunsplit(parts._replace(netloc=netloc))
        except ValueError:
            url = "<unparsable url>"
        shown = "***" if self.password else None
        return (f"BrokerConfig(url={url!r}, password={shown!r}, prefetch={self.prefetch!r}, "
                f"min_idle_ms={self.min_idle_ms!r}, connect_timeout_s={self.connect_timeout_s!r}, "
                f"retry_budget_s={self.retry_budget_s!r}, options={self.options!r}, "
                f"ca_file={self.ca_file!r})")


@dataclass
class Delivery:
    """A chunk in hand. `token` is backend-private (stream entry id, delivery tag...)."""

    run_id: str
    chunk: int
    start: int
    end: int
    attempt: int  # 1 for the first execution
    token: Any = None
    reclaimed: bool = False
    last_error: str | None = None


@dataclass
class Progress:
    chunks_total: int
    done: int
    dead: int
    queued: int = 0
    in_flight: int = 0
    executions: int = 0
    duplicates: int = 0
    reclaimed: int = 0
    retried: int = 0
    task_s: float = 0.0
    workers_alive: int = 0

    @property
    def finished(self) -> bool:
        return self.done + self.dead >= self.chunks_total

    def to_dict(self) -> dict:
        return {
            "chunks_total": self.chunks_total,
            "done": self.done,
            "dead": self.dead,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "executions": self.executions,
            "duplicates": self.duplicates,
            "reclaimed": self.reclaimed,
            "retried": self.retried,
            "task_s": round(self.task_s, 3),
            "workers_alive": self.workers_alive,
        }


@dataclass
class DeadLetter:
    chunk: int
    reason: str
    attempts: int
    worker: str | None = None
    at: float | None = None
    raw: str | None = None  # the message body, when it could not be parsed

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Backend(abc.ABC):
    """One broker connection's worth of operations for one process."""

    name: str = "?"
    # Queue backends hand unfinished work back to the queue; a static worker owns its range,
    # so stopping it early must look like a failure to its supervisor (exit 75: restart me).
    hands_back_work: bool = True

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        # Set by the worker: while it is stopping, broker retries give up at once (the
        # chunk in hand is then simply reclaimed later) instead of holding the exit.
        self.stop_requested: Callable[[], bool] = lambda: False
        # A fault seam (`ttg work --exit-after-first-write`, for `make chaos`): called once a
        # result is durable; before its delivery is acked where the backend acks apart from
        # the write (RabbitMQ), after both where they are one operation (Redis).
        self.after_write: Callable[[], None] | None = None

    # ---- both sides -------------------------------------------------------------------
    @abc.abstractmethod
    def check(self) -> None:
        """Connect and authenticate (bounded retries); raise BrokerUnavailable/AuthError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # ---- controller -------------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, spec: JobSpec) -> bool:
        """Create the job and enqueue every chunk. Idempotent for the same run id and spec
        (returns False when it was already submitted); JobMismatch if the spec differs."""

    @abc.abstractmethod
    def load_spec(self, run_id: str) -> JobSpec | None:
        """The submitted job, or None."""

    def submitted_at(self, run_id: str) -> float | None:
        """When the run was first submitted (epoch seconds), if the backend records it."""
        return None

    def broker_memory_bytes(self) -> int:
        """The broker's memory in use (for `make bench`), 0 if it cannot be read."""
        return 0

    def submitted_spec(self, run_id: str) -> JobSpec:
        """The submitted job; a ConfigError naming the run if there is none."""
        spec = self.load_spec(run_id)
        if spec is None:
            raise ConfigError(f"run {run_id} has not been submitted")
        return spec

    @abc.abstractmethod
    def progress(self, run_id: str) -> Progress:
        """Counts for display. `done` and `dead` come from results and dead letters."""

    @abc.abstractmethod
    def results(self, run_id: str) -> Iterator[tuple[int, Partial, dict]]:
        """Every stored chunk result (chunk, partial, metadata), first write per chunk;
        streamed, so memory stays bounded."""

    @abc.abstractmethod
    def dead_letters(self, run_id: str) -> list[DeadLetter]:
        """The run's dead-lettered chunks with their last error."""

    def events(self, run_id: str) -> list[dict]:
        """Rare events of the run (reclaimed, retried, dead_lettered, reconciled...), each a
        dict with `ts` and `kind`, oldest first. Completions are in `results()` instead."""
        return []

    def held_by(self, run_id: str, worker: str) -> list[int] | None:
        """Chunks the worker holds now (for chaos: what a kill puts at risk); None if the
        backend cannot tell."""
        return None

    def purge(self, run_id: str) -> None:  # noqa: B027 - optional hook
        """Delete the run's data from the broker (after its summary is written)."""

    @abc.abstractmethod
    def take_rows(self, run_id: str, limit: int = 200) -> list[tuple[Any, int, bytes]]:
        """Up to `limit` chunks' rows in transit, oldest first: (token, chunk, Arrow IPC
        rows). Only a winning result write adds rows (a queue backend may carry a
        redelivered chunk's copy too: the reader keeps the first per chunk)."""

    @abc.abstractmethod
    def drop_rows(self, run_id: str, tokens: list[Any]) -> None:
        """Delete rows taken by `take_rows` once they are durable in the results dataset."""

    def worker_errors(self, run_id: str) -> dict[str, str]:
        """Workers that cannot run the job (worker id -> their error): the run stops."""
        return {}

    @abc.abstractmethod
    def reconcile(self, run_id: str) -> list[int]:
        """Re-enqueue chunks neither done, queued, in flight nor dead; return them."""

    @abc.abstractmethod
    def replay_dead(self, run_id: str, chunks: list[int] | None = None) -> list[int]:
        """Move dead-lettered chunks (all, or the given ones) back to the work queue."""

    # ---- worker -----------------------------------------------------------------------
    @abc.abstractmethod
    def start_consuming(self, run_id: str, worker_id: str,
                        worker_index: int | None) -> JobSpec | None:
        """Join the run as a worker; block until the job exists; return its spec (None if
        `stop_requested()` turned true while waiting)."""

    @abc.abstractmethod
    def next_delivery(self, timeout_s: float) -> Delivery | None:
        """The next chunk to run, or None after `timeout_s` with nothing to do. Malformed
        messages are dead-lettered here with the reason, never returned."""

    @abc.abstractmethod
    def complete(self, delivery: Delivery, partial: Partial, meta: dict,
                 rows: bytes = b"") -> bool:
        """Write the result and the chunk's rows (first write wins) and ack, together. True
        if this write won."""

    def report_fatal(self, error: str) -> None:  # noqa: B027 - optional hook
        """This worker cannot run the job (its task does not import...): say why, once."""

    @abc.abstractmethod
    def fail(self, delivery: Delivery, error: str, task_s: float = 0.0) -> str:
        """The task raised: retry later or dead-letter. Returns "retried" or "dead"."""

    @abc.abstractmethod
    def release(self, delivery: Delivery) -> None:
        """Hand an unstarted chunk back (graceful stop)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Write any result a backend batches (results+acks are sent in batches by Redis)."""

    def release_prefetched(self) -> None:  # noqa: B027 - optional hook
        """Hand back every prefetched, unstarted chunk (graceful stop)."""

    @abc.abstractmethod
    def finished_for_me(self) -> bool:
        """True when this worker has nothing left to do in the run (exit-when-done)."""
