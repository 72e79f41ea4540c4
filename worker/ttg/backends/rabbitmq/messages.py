"""RabbitMQ backend: the topology, the names and the message formats (no I/O)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingConnection

from ttg.errors import ConfigError, TTGError
from ttg.sweep import JobSpec, strict_float, strict_int

log = logging.getLogger("ttg.rabbitmq")

T = TypeVar("T")

DEFAULT_TIERS_MS = (1000, 5000, 25000)
PERSISTENT = 2
MARK = "ttg-mark"
PUBLISH_BATCH = 500  # controller publishes per confirm batch...
PUBLISH_WINDOW = 4000  # ... and unconfirmed at once


class PublishRejected(TTGError):
    """The broker kept refusing a publish (nack or unroutable) past the retry budget."""

    exit_code = 3


class _Lost(Exception):
    """The worker connection went away while an operation was pending."""


@dataclass
class Names:
    run_id: str
    tiers: int = 3

    def q(self, what: str) -> str:
        return f"ttg.{self.run_id}.{what}"

    @property
    def meta(self) -> str:
        return self.q("meta")

    @property
    def tasks(self) -> str:
        return self.q("tasks")

    @property
    def dlq(self) -> str:
        return self.q("dlq")

    @property
    def results(self) -> str:
        return self.q("results")

    @property
    def rows(self) -> str:
        return self.q("rows")

    @property
    def presence(self) -> str:
        return self.q("presence")

    def tier(self, i: int) -> str:
        return self.q(f"retry.{i}")


@dataclass
class Topology:
    tiers_ms: list[int]
    delivery_limit: int

    def queues(self, n: Names) -> list[tuple[str, dict]]:
        dl = {"x-dead-letter-exchange": "", "x-dead-letter-strategy": "at-least-once",
              "x-overflow": "reject-publish"}
        out = [
            (n.meta, {"x-queue-type": "stream"}),
            (n.results, {"x-queue-type": "stream"}),
            (n.dlq, {"x-queue-type": "quorum"}),
            (n.rows, {"x-queue-type": "quorum"}),
            (n.presence, {"x-queue-type": "classic"}),
            (n.tasks, {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit,
                       "x-dead-letter-routing-key": n.dlq, **dl}),
        ]
        for i, ttl in enumerate(self.tiers_ms):
            out.append((n.tier(i), {"x-queue-type": "quorum", "x-message-ttl": int(ttl),
                                    "x-dead-letter-routing-key": n.tasks, **dl}))
        return out


@dataclass
class _Ledger:
    """What the controller has read of a run's results stream so far."""

    next_offset: int | str = "first"
    done: set[int] = field(default_factory=set)
    results: int = 0
    fails: int = 0
    retried: int = 0
    reclaimed: int = 0
    task_s: float = 0.0
    events: list[dict] = field(default_factory=list)  # reclaimed / retried, as read
    fatal: dict[str, str] = field(default_factory=dict)  # worker -> why it cannot run the job


@dataclass(frozen=True, eq=False)
class Held:
    """A RabbitMQ delivery's token (`Delivery.token`): the generation of the connection it
    came on and its delivery tag (`key`), the worker losses it carries, its parsed body (to
    hand it back as it came)."""

    gen: int
    tag: int
    lost: int = 0
    body: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.gen, self.tag)


@dataclass
class _Raw:
    gen: int
    tag: int
    redelivered: bool
    headers: dict
    body: bytes


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _tiers_from(options: dict) -> list[int]:
    raw: Any = options.get("retry_tiers_ms") or os.environ.get("TTG_RABBITMQ_RETRY_TIERS_MS")
    if not raw:
        return list(DEFAULT_TIERS_MS)
    if isinstance(raw, str):
        raw = [x for x in raw.replace(" ", "").split(",") if x]
    try:
        tiers = [int(x) for x in raw]
    except (TypeError, ValueError):
        raise ConfigError(f"retry tiers must be integers (ms), got {raw!r}") from None
    if not tiers or any(t <= 0 for t in tiers):
        raise ConfigError(f"retry tiers must be positive milliseconds, got {tiers!r}")
    return tiers


def _is_auth(exc: BaseException) -> bool:
    if isinstance(exc, (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError,
                        pex.AuthenticationError)):
        return True
    return isinstance(exc, pex.ConnectionClosedByBroker) and exc.reply_code in (403, 530)


RETRYABLE = (pex.AMQPConnectionError, pex.AMQPChannelError, pex.ConnectionWrongStateError,
             pex.ChannelWrongStateError, pex.StreamLostError, OSError, _Lost, AssertionError)


# pika logs every connection failure at ERROR, several lines each, before raising it; this
# backend reports them itself (one line, classified), so pika is kept quiet unless debugging.
logging.getLogger("pika").setLevel(
    logging.DEBUG if os.environ.get("TTG_PIKA_DEBUG") == "1" else logging.CRITICAL)


def _discard(conn: BlockingConnection) -> None:
    """Close a reader connection. pika rejects the deliveries in flight when it cancels a
    consumer and a stream queue answers with a connection error: readers of streams use a
    connection of their own, closed here, complaint ignored."""
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001 - the connection is gone either way
        pass


def _int_or(value: Any, default: int) -> int:
    """An int field of a record another process wrote, or `default` if it is not one."""
    try:
        return strict_int(value)
    except ValueError:
        return default


def _event(kind: str, ts: Any, data: dict, **extra: Any) -> dict:
    try:
        at = strict_float(ts) if ts is not None else None
    except ValueError:
        at = None
    return {"ts": at, "kind": kind, "chunk": _int_or(data.get("chunk", -1), -1),
            "worker": data.get("worker"), **extra}


class MalformedBody(ValueError):
    """A task message no worker can run; `chunk` is its chunk id when that was readable."""

    def __init__(self, reason: str, chunk: int = -1) -> None:
        super().__init__(reason)
        self.chunk = chunk


def parse_task_body(spec: JobSpec, body: bytes) -> tuple[dict, int, int, int, int, int]:
    """(data, chunk, start, end, attempt, lost) of a task message body `{c, s, e, a[, lost,
    err]}`; MalformedBody with the reason for anything else (pure: fuzzed in the tests)."""
    chunk = -1
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("the body is not a JSON object")
        if "c" not in data:
            raise ValueError("no chunk field 'c'")
        chunk = strict_int(data["c"], "chunk")
        start, end = spec.bounds(chunk)
        attempt = strict_int(data.get("a", 1), "attempt")
        if not 1 <= attempt <= spec.max_attempts:
            raise ValueError(f"attempt {attempt} outside 1..{spec.max_attempts}")
        if "s" in data or "e" in data:
            got = (strict_int(data.get("s"), "start"), strict_int(data.get("e"), "end"))
            if got != (start, end):
                raise ValueError(f"bounds {got[0]}..{got[1]} do not match the job")
        lost = strict_int(data.get("lost", 0) or 0, "lost")
        if not 0 <= lost <= 10**6:
            raise ValueError(f"lost {lost} out of range")
        if data.get("err") is not None and not isinstance(data["err"], str):
            raise ValueError("err is not text")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedBody(f"{exc.__class__.__name__}: {exc}"[:500],
                            max(chunk, -1)) from None
    return data, chunk, start, end, attempt, lost


def _header_int(headers: dict, key: str) -> int:
    try:
        return int(headers.get(key) or 0)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a float inf (make fuzz)
        return 0
