"""RabbitMQ backend: quorum work queue, retry tiers, dead-letter queue, results in a stream.

Topology of a run RUN (vhost from the URL, default exchange "" everywhere, so every publish
is addressed to a queue by name and `mandatory`, and every publish is confirmed; confirms are
tracked by sequence number (`_Confirms`), so publishes are pipelined, not one round trip each):

    ttg.RUN.meta       stream   the job: a `spec` record (JobSpec + retry tiers + delivery
                                limit + submitted_at), then `enqueued` once every chunk is in.
                                Workers that start before submission consume it from `first`
                                and block until the spec arrives.
    ttg.RUN.tasks      quorum   one message per chunk, JSON {c, s, e, a[, err][, lost]}:
                                chunk, bounds, attempt, last error, losses carried over.
                                x-delivery-limit = max_attempts - 1, x-dead-letter-exchange ""
                                -> ttg.RUN.dlq with x-dead-letter-strategy at-least-once
                                (x-overflow reject-publish): a chunk that keeps killing its
                                worker is dead-lettered by the broker, never dropped.
    ttg.RUN.retry.N    quorum   retry tier N (default TTLs 1 s, 5 s, 25 s): a queue-level
                                x-message-ttl, dead-lettering (at-least-once) back to tasks.
                                A failed attempt k goes to tier min(k, tiers) - 1.
    ttg.RUN.dlq        quorum   dead letters: worker records {chunk, reason, attempts, worker,
                                at[, raw]} (max attempts reached, malformed message) and the
                                broker's delivery-limit dead letters (the task body + x-death).
    ttg.RUN.results    stream   the run's ledger: `results` records (a worker's batch of chunk
                                results, a JSON list), `result` records (one), first per chunk
                                wins at read time; `fail` records (failed attempts, with their
                                start time and the reclaimed flag), so executions and task time
                                count every attempt. Readable any number of times; `events()`
                                derives "reclaimed" (at the redelivered chunk's start) and
                                "retried" from it, "dead_lettered" from the DLQ.
    ttg.RUN.rows       quorum   a chunk's rows (Arrow IPC, header `chunk`), published with its
                                result and confirmed before the task's ack; the controller
                                takes them with basic.get and acks each once it is durable in
                                runs/<id>/ (duplicates of a redelivered chunk are dropped there)
    ttg.RUN.presence   classic  never published to; each worker consumes it, so its consumer
                                count is the number of live workers.

Worker: the pika connection lives on its own I/O thread (heartbeats keep flowing during a long
chunk); deliveries reach the main thread through a queue.Queue; operations go back with
`add_callback_threadsafe`. Results of consecutive chunks are batched (`_Out`): a batch is
published as one stream record when it holds `batch_size()` results (about 20 ms of work), when
the worker has nothing else in hand, or 20 ms after its first result (so a result never waits
behind a long chunk); the I/O thread acks the batch's deliveries (one `multiple` ack when they
are the oldest) only once that record is confirmed. The main thread does not wait for it while
it has work; a refused or lost batch is published again (PublishRejected / BrokerUnavailable
past the retry budget), its chunks unacked until then. Prefetch: the configured one, or
(prefetch 0 = auto) two batches' worth, applied by consuming again when the window is full
(nothing then in flight to be rejected). After a reconnect old delivery tags are dead: the
result is still published, the ack is skipped and the broker's redelivery is recognised and
acked without running it again.

Losses: a returned message carries `x-delivery-count`; a worker that takes a redelivered
(suspect) chunk runs it alone (consumer cancelled, other prefetched chunks handed back without
a return), so a chunk that kills its worker is charged for it and its neighbours are not.
`lost` in the body carries the count over a hand-back; attempt + lost > max_attempts is
dead-lettered by the worker, the broker's delivery limit being the backstop.

Controller: submits with PUBLISH_WINDOW publishes unconfirmed at a time (confirmed in
batches, refused ones published again); reads the streams to a marker it publishes itself (a
stream has no "end"), so reads are exact; the results stream is tailed by one long-lived
consumer between polls (acking as it reads: a stream consumer's credit). The dead-letter
queue is read with basic.get and handed back unacked (replay acks what it moves).
Retry tiers come from `options["retry_tiers_ms"]` or TTG_RABBITMQ_RETRY_TIERS_MS ("1000,5000,
25000") of the submitting process and are recorded with the job, so workers agree on them.
`progress().in_flight` is a conservative estimate: the chunks neither done,
dead nor ready in tasks/retry queues, counted as in flight while any worker is connected
(unacked messages only exist on a live connection); 0 when no worker is connected.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import queue
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ttg.backends.base import Backend, BrokerConfig, DeadLetter, Delivery, Progress
from ttg.errors import BrokerAuthError, BrokerUnavailable, ConfigError, JobMismatch, TTGError
from ttg.partial import Partial, decode_result, encode_result
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
    except (TypeError, ValueError):
        return 0


def _table(headers: dict) -> bytes | None:
    """An AMQP field table of str/int values (S, l), or None for anything else."""
    parts = []
    for k, v in headers.items():
        kb = k.encode()
        if len(kb) > 255 or isinstance(v, bool):
            return None
        if isinstance(v, int) and -2**63 <= v < 2**63:
            parts.append(bytes([len(kb)]) + kb + b"l" + struct.pack(">q", v))
        elif isinstance(v, str):
            vb = v.encode()
            parts.append(bytes([len(kb)]) + kb + b"S" + struct.pack(">I", len(vb)) + vb)
        else:
            return None
    t = b"".join(parts)
    return struct.pack(">I", len(t)) + t


class _Batch:
    """Publishes confirmed together: `done(failed indices)` runs on the connection's thread
    once the broker has settled every one of them (ack, nack, or return + ack)."""

    __slots__ = ("remaining", "failed", "done", "sealed")

    def __init__(self, done: Callable[[list[int]], None]) -> None:
        self.remaining = 0
        self.failed: list[int] = []
        self.done = done
        self.sealed = False

    def settle(self, idx: int, ok: bool) -> None:
        if not ok:
            self.failed.append(idx)
        self.remaining -= 1
        if self.sealed and self.remaining == 0:
            self.done(sorted(self.failed))

    def seal(self) -> None:
        self.sealed = True
        if self.remaining == 0:
            self.done(sorted(self.failed))


class _Out:
    """A batch of the worker's results: filled by the main thread, taken (published) once
    by the connection's thread when full, when the worker has nothing else in hand, or
    20 ms after its first result (so results never wait behind a long chunk)."""

    __slots__ = ("entries", "rows", "tokens", "fut", "taken")

    def __init__(self) -> None:
        self.entries: list[tuple[str, bytes, dict]] = []
        self.rows: list[tuple[str, bytes, dict]] = []  # published with the results
        self.tokens: list[tuple[int, int]] = []
        self.fut: Future = Future()
        self.taken = False


class _Confirms:
    """Publisher confirms on one channel without a round trip per publish.

    Every publish on the channel goes through `publish`, which numbers it as the broker does
    (1, 2, ... after confirm.select) and files it under its batch; `Basic.Ack`/`Basic.Nack`
    (single or `multiple`) settle the publishes they cover; a `Basic.Return` (unroutable,
    `mandatory`) marks its publish, found by the sequence number carried in `message_id`, as
    failed when its ack arrives. Callbacks run on the connection's thread.
    """

    def __init__(self, ch: BlockingChannel) -> None:
        self.ch = ch
        self.impl = ch._impl  # noqa: SLF001 - pika's asynchronous channel under the blocking one
        self.seq = 0
        self._methods: dict[str, bytes] = {}
        self.unconfirmed: dict[int, list] = {}  # seq -> [batch, index, returned]; seq order
        ready: list[bool] = []
        self.impl.confirm_delivery(ack_nack_callback=self._on_confirm,
                                   callback=lambda _frame: ready.append(True))
        self.impl.add_on_return_callback(self._on_return)
        ch._flush_output(lambda: bool(ready))  # noqa: SLF001 - wait for Confirm.SelectOk

    def publish(self, q: str, body: bytes, headers: dict, batch: _Batch, idx: int) -> None:
        self.seq += 1
        self.unconfirmed[self.seq] = [batch, idx, False]
        batch.remaining += 1
        self.impl.basic_publish("", q, body, pika.BasicProperties(
            delivery_mode=PERSISTENT, headers=headers, content_type="application/json",
            message_id=str(self.seq)), mandatory=True)

    def publish_all(self, entries: list[tuple[str, bytes, dict]], batch: _Batch) -> None:
        """`publish` each entry, handing their frames to the socket as one buffer.

        pika writes every frame (3 per message) with its own send() and marshals each
        message through its generic encoders, which together cost ~60 us a message: the
        messages of this backend (default exchange, mandatory, persistent, JSON, a small
        table of int/str headers, a message id) are framed here directly (`_frames`),
        falling back to pika for anything else."""
        conn = self.impl.connection
        self.impl._raise_if_not_open()  # noqa: SLF001
        out: list[bytes] = []
        conn._adapter_emit_data = out.append  # noqa: SLF001 - instance override, undone below
        try:
            for i, (q, body, headers) in enumerate(entries):
                frames = self._frames(q, body, headers, self.seq + 1)
                if frames is None:
                    self.publish(q, body, headers, batch, i)
                    continue
                self.seq += 1
                self.unconfirmed[self.seq] = [batch, i, False]
                batch.remaining += 1
                out.append(frames)
                conn.bytes_sent += len(frames)
                conn.frames_sent += 3 if body else 2
        finally:
            del conn._adapter_emit_data  # noqa: SLF001 - back to the class's method
            if out:
                conn._adapter_emit_data(b"".join(out))  # noqa: SLF001

    def _frames(self, q: str, body: bytes, headers: dict, seq: int) -> bytes | None:
        """The method, header and body frames of one publish (AMQP 0-9-1 section 4.2.3),
        or None when pika must do it (a large body or an unusual header)."""
        if len(body) > 65536:
            return None
        ch = self.impl.channel_number
        method = self._methods.get(q)
        if method is None:
            qb = q.encode()
            if len(qb) > 255:
                return None
            # Basic.Publish (60, 40): reserved short, exchange "", routing key, mandatory
            payload = struct.pack(">HHHB", 60, 40, 0, 0) + bytes([len(qb)]) + qb + b"\x01"
            method = self._methods[q] = (struct.pack(">BHI", 1, ch, len(payload)) + payload
                                         + b"\xce")
        table = _table(headers)
        if table is None:
            return None
        mid = str(seq).encode()
        # content type, headers, delivery mode, message id (property flags 15, 13, 12, 7)
        props = b"\x10application/json" + table + b"\x02" + bytes([len(mid)]) + mid
        header = struct.pack(">HHQH", 60, 0, len(body), 0xB080) + props
        parts = [method, struct.pack(">BHI", 2, ch, len(header)), header, b"\xce"]
        if body:
            parts += [struct.pack(">BHI", 3, ch, len(body)), body, b"\xce"]
        return b"".join(parts)

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        ok = isinstance(m, pika.spec.Basic.Ack)
        settled = []
        if m.multiple:
            while self.unconfirmed:
                seq = next(iter(self.unconfirmed))
                if m.delivery_tag and seq > m.delivery_tag:
                    break
                settled.append(self.unconfirmed.pop(seq))
        elif m.delivery_tag in self.unconfirmed:
            settled.append(self.unconfirmed.pop(m.delivery_tag))
        for batch, idx, returned in settled:
            batch.settle(idx, ok and not returned)

    def _on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        try:
            entry = self.unconfirmed.get(int(props.message_id))
        except (TypeError, ValueError):
            return
        if entry is not None:
            entry[2] = True


class _IOThread(threading.Thread):
    """Owns the worker's connection: heartbeats, deliveries, reconnects with backoff,
    publisher confirms (`_Confirms`) and the acks that follow them."""

    def __init__(self, owner: RabbitMQBackend) -> None:
        super().__init__(name="amqp-io", daemon=True)
        self.owner = owner
        self.inbox: queue.Queue[_Raw] = queue.Queue()
        self.gen = 0
        self.conn: BlockingConnection | None = None
        self.ch: BlockingChannel | None = None
        self.conf: _Confirms | None = None
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.fatal: TTGError | None = None
        self.want_consume = True
        self.ctag: str | None = None
        self.unacked: set[int] = set()  # delivery tags of this channel not yet settled
        self.window: set[int] = set()  # ... of them, delivered to the current consumer
        self.qos: int | None = None  # the prefetch the current consumer was made with
        self.want_prefetch = owner.prefetch()
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    # ---- I/O thread ---------------------------------------------------------------------
    def run(self) -> None:
        delay, deadline = 0.1, None
        budget = self.owner.config.retry_budget_s
        while not self.stop.is_set():
            try:
                self._open()
                delay, deadline = 0.1, None
                self.ready.set()
                while not self.stop.is_set():
                    self.conn.process_data_events(time_limit=0.2)  # type: ignore[union-attr]
                    if self.ch is None or not self.ch.is_open:
                        raise _Lost("the channel was closed by the broker")
                    self._requalify(self.ch)
            except Exception as exc:  # noqa: BLE001 - every failure ends in a reconnect
                self.ready.clear()
                self._drop(exc)
                if self.stop.is_set():
                    break
                if _is_auth(exc):
                    self.fatal = self.owner.auth_error(exc)
                    break
                now = time.monotonic()
                deadline = deadline or now + budget
                if now + delay > deadline:
                    self.fatal = BrokerUnavailable(
                        f"rabbitmq at {_redacted(self.owner.config.url)} unreachable for "
                        f"{budget:.0f}s: {exc.__class__.__name__}: {exc}")
                    break
                log.warning("connection lost (%s: %s): reconnecting in %.1fs",
                            exc.__class__.__name__, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)
        self.ready.set()  # wake waiters: they look at `fatal` / `stop`
        self._drop(_Lost("connection closed"))

    def _open(self) -> None:
        o = self.owner
        self.conn = o.connect()
        ch = self.conn.channel()
        o.declare_topology(ch)
        self.conf = _Confirms(ch)
        self.unacked, self.window, self.qos = set(), set(), None
        self.gen += 1
        self.ch = ch
        ch.basic_consume(o.names.presence, on_message_callback=lambda *a: None)
        if self.want_consume:
            self.consume(ch)

    def consume(self, ch: BlockingChannel) -> None:
        gen = self.gen
        if self.qos != self.want_prefetch:
            ch.basic_qos(prefetch_count=self.want_prefetch)
            self.qos = self.want_prefetch

        def on_message(_ch: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
            self.unacked.add(method.delivery_tag)
            self.window.add(method.delivery_tag)
            self.inbox.put(_Raw(gen, method.delivery_tag, bool(method.redelivered),
                                dict(props.headers or {}), body))

        self.window = set()
        self.ctag = ch.basic_consume(self.owner.names.tasks, on_message_callback=on_message)

    def _requalify(self, ch: BlockingChannel) -> None:
        """Apply a new prefetch (a consumer keeps the one it was made with): cancel and
        consume again, but only while the consumer's window is full, so that no delivery
        is in flight to be rejected (a rejection would count as a delivery)."""
        if (self.ctag is None or not self.want_consume or self.qos == self.want_prefetch
                or self.qos is None or len(self.window) < self.qos):
            return
        ch.basic_cancel(self.ctag)
        self.ctag = None
        self.consume(ch)

    def ack_tags(self, tags: list[int]) -> None:
        """Ack on this thread, one `multiple` ack when the tags are the oldest unsettled."""
        if self.ch is None:
            return
        tags = sorted(t for t in set(tags) if t in self.unacked)
        if not tags:
            return
        top = tags[-1]
        impl = self.ch._impl  # noqa: SLF001 - no blocking flush inside a confirm callback
        if sum(1 for t in self.unacked if t <= top) == len(tags):
            impl.basic_ack(top, multiple=True)
        else:
            for t in tags:
                impl.basic_ack(t)
        self.unacked.difference_update(tags)
        self.window.difference_update(tags)

    def nack_tag(self, tag: int) -> None:
        if self.ch is not None and tag in self.unacked:
            self.ch._impl.basic_nack(tag, requeue=True)  # noqa: SLF001
            self.unacked.discard(tag)
            self.window.discard(tag)

    def start_batch(self, entries: list[tuple[str, bytes, dict]],
                    tokens: list[tuple[int, int]], fut: Future) -> None:
        """Publish `entries` (no wait); once all are confirmed ack `tokens` (those of this
        connection), then resolve `fut` with the indices of refused entries (acking
        nothing if there are any). Runs on this thread."""
        assert self.conf is not None
        gen = self.gen
        with self._lock:
            self._pending.add(fut)

        def done(failed: list[int]) -> None:
            if not failed and self.gen == gen:
                self.ack_tags([tag for g, tag in tokens if g == gen])
            with self._lock:
                self._pending.discard(fut)
            if not fut.done():
                fut.set_result(failed)

        batch = _Batch(done)
        self.conf.publish_all(entries, batch)
        batch.seal()

    def take(self, out: _Out) -> None:
        """Publish a batch of results (on this thread), once."""
        with self._lock:
            if out.taken:
                return
            out.taken = True
        if self.conf is None:
            if not out.fut.done():
                out.fut.set_exception(_Lost("not connected"))
            return
        if len(out.entries) > 1:  # one stream record for the batch: one write, one confirm
            out.entries = [(out.entries[0][0], b"[" + b",".join(e[1] for e in out.entries)
                            + b"]", {"k": "results", "n": len(out.entries)})]
        out.entries += out.rows  # refused indices then count over results and rows alike
        out.rows = []
        self.start_batch(out.entries, out.tokens, out.fut)

    def post(self, fn: Callable[[], None], out: _Out) -> None:
        """Run fn on this thread soon; a batch that cannot be posted fails (it is retried)."""
        conn = self.conn
        try:
            if conn is None:
                raise _Lost("not connected")
            conn.add_callback_threadsafe(fn)
        except Exception as exc:  # noqa: BLE001 - the connection is gone: publish again later
            with self._lock:
                out.taken = True
                self._pending.discard(out.fut)
            if not out.fut.done():
                out.fut.set_exception(_Lost(f"{exc.__class__.__name__}: {exc}"))

    def _drop(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, set()
        for fut in pending:
            if not fut.done():
                fut.set_exception(_Lost(f"{exc.__class__.__name__}: {exc}"))
        conn, self.conn, self.ch, self.ctag, self.conf = self.conn, None, None, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    # ---- any thread ---------------------------------------------------------------------
    def call(self, fn: Callable[[BlockingChannel], T], timeout: float) -> T:
        """Run fn(channel) on the I/O thread and wait for it."""
        conn, ch = self.conn, self.ch
        if conn is None or ch is None or not self.ready.is_set():
            raise _Lost("not connected")
        fut: Future = Future()

        def run() -> None:
            if fut.done():
                return
            try:
                result = fn(ch)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)

        with self._lock:
            self._pending.add(fut)
        try:
            conn.add_callback_threadsafe(run)
            return fut.result(timeout)
        except FutureTimeout:
            raise _Lost(f"no answer from the connection thread in {timeout:.0f}s") from None
        finally:
            with self._lock:
                self._pending.discard(fut)


class _Tail:
    """A long-lived consumer of one stream, read up to a fresh marker on demand.

    The controller polls progress several times a second: one consumer that stays open (and
    is never cancelled, see `_discard`) instead of a connection per poll.
    """

    def __init__(self, owner: RabbitMQBackend, q: str) -> None:
        self.owner = owner
        self.q = q
        self.conn: BlockingConnection | None = None
        self.buffer: deque[tuple[int, dict, bytes]] = deque()
        self.last_tag = 0

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.buffer.clear()
        if conn is not None:
            _discard(conn)

    def _open(self, start: int | str) -> None:
        self.conn = self.owner.connect()
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=2000)

        unacked = [0]

        def on_message(_ch: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
            headers = dict(props.headers or {})
            self.last_tag = method.delivery_tag
            self.buffer.append((_header_int(headers, "x-stream-offset"), headers, body))
            # a stream consumer gets credit back only by acking: ack as records come, or a
            # read of more records than the prefetch never reaches its marker
            unacked[0] += 1
            if unacked[0] >= 500:
                ch.basic_ack(method.delivery_tag, multiple=True)
                unacked[0] = 0
                self.last_tag = 0

        ch.basic_consume(self.q, on_message_callback=on_message,
                         arguments={"x-stream-offset": start})
        self.ch = ch

    def read(self, start: int | str) -> list[tuple[int, dict, bytes]]:
        """Every record from `start` (the caller's next offset) up to now."""
        if self.conn is None or not self.conn.is_open:
            self.close()
            self._open(start)
        mark = uuid.uuid4().hex
        self.owner._ctl(lambda ch: self.owner._publish(ch, self.q, b"", {MARK: mark}),
                        f"mark {self.q}")
        deadline = time.monotonic() + self.owner.config.retry_budget_s
        out: list[tuple[int, dict, bytes]] = []
        assert self.conn is not None
        while True:
            while self.buffer:
                offset, headers, body = self.buffer.popleft()
                if isinstance(start, int) and offset < start:
                    continue
                if MARK in headers:
                    if headers[MARK] == mark:
                        if self.last_tag:
                            self.ch.basic_ack(self.last_tag, multiple=True)
                            self.last_tag = 0
                        return out
                    continue
                out.append((offset, headers, body))
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"reading {self.q}: the marker did not come back")
            self.conn.process_data_events(time_limit=0.2)


class RabbitMQBackend(Backend):
    name = "rabbitmq"

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self.params = self._parameters()
        self.tiers_ms = _tiers_from(config.options)
        self._conn: BlockingConnection | None = None
        self._ch: BlockingChannel | None = None
        self._pconf: _Confirms | None = None
        self._ledgers: dict[str, _Ledger] = {}
        self._recs: dict[str, dict] = {}
        self._tails: dict[str, _Tail] = {}
        self._dlq_cache: dict[str, tuple[int, list[DeadLetter]]] = {}
        # worker state
        self.worker_id = "controller"
        self.spec: JobSpec | None = None
        self.names = Names("-")
        self.topology = Topology(self.tiers_ms, 4)
        self.io: _IOThread | None = None
        self._held: deque[_Raw] = deque()
        self._completed: set[int] = set()
        self._handled: set[tuple[int, int]] = set()
        self._acked: set[tuple[int, int]] = set()
        self._isolated = False
        self._open_out: _Out | None = None
        self._unsettled: deque[_Out] = deque()
        self._ewma_task_s: float | None = None
        self._kill_between = os.environ.get("TTG_TEST_KILL_BETWEEN_WRITE_AND_ACK") == "1"

    # ---- connections --------------------------------------------------------------------
    def _parameters(self) -> pika.URLParameters:
        parts = urlsplit(self.config.url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError(f"bad AMQP URL {_redacted(self.config.url)}: use "
                              "amqp://user[:password]@host:port/vhost")
        # pika cannot parse a user without a password: credentials are set apart
        hostport = parts.netloc.rpartition("@")[2]
        bare = parts._replace(netloc=hostport).geturl()
        try:
            params = pika.URLParameters(bare)
        except ValueError as exc:
            raise ConfigError(f"bad AMQP URL {_redacted(self.config.url)}: {exc}") from exc
        user = unquote(parts.username) if parts.username else "guest"
        password = self.config.password or (unquote(parts.password) if parts.password else "")
        params.credentials = pika.PlainCredentials(user, password)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = max(self.config.retry_budget_s, 10)
        params.client_properties = {"connection_name": f"ttg {os.getpid()}"}
        return params

    def auth_error(self, exc: BaseException) -> BrokerAuthError:
        user = getattr(self.params.credentials, "username", "?")
        return BrokerAuthError(
            f"rabbitmq at {_redacted(self.config.url)} refused user {user!r} on vhost "
            f"{self.params.virtual_host!r} (wrong password or no permission)")

    def connect(self, budget_s: float | None = None) -> BlockingConnection:
        """A new connection; bounded retries while the broker is not up."""
        budget = self.config.connect_timeout_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        delay = 0.1
        while True:
            try:
                return BlockingConnection(self.params)
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth(exc):
                    raise self.auth_error(exc) from None
                if not isinstance(exc, RETRYABLE):
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"rabbitmq at {_redacted(self.config.url)} unreachable after "
                        f"{budget:.0f}s: {exc.__class__.__name__}: {exc}") from None
                log.warning("broker unavailable, retrying in %.1fs: %s",
                            min(delay, remaining), exc.__class__.__name__)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 2.0)

    def _channel(self) -> BlockingChannel:
        if self._conn is None or not self._conn.is_open:
            self._conn = self.connect()
            self._ch = None
        if self._ch is None or not self._ch.is_open:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        return self._ch

    def _reset(self) -> None:
        conn, self._conn, self._ch, self._pconf = self._conn, None, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    def purge(self, run_id: str) -> None:
        rec = self._rec(run_id)
        tiers = len(rec["tiers_ms"]) if rec else len(self.tiers_ms)
        n = Names(run_id, tiers)
        for q in [n.tasks, n.dlq, n.results, n.rows, n.presence, n.meta,
                  *(n.tier(i) for i in range(tiers))]:
            self._ctl(lambda ch, q=q: ch.queue_delete(q), f"delete {q}")
        for cache in (self._ledgers, self._recs, self._tails, self._dlq_cache):
            cache.pop(run_id, None)

    def _ctl(self, fn: Callable[[BlockingChannel], T], what: str = "operation") -> T:
        """Run fn on the controller-side connection (this thread), reconnecting on failure."""
        deadline = time.monotonic() + self.config.retry_budget_s
        delay = 0.1
        while True:
            try:
                return fn(self._channel())
            except (pex.NackError, pex.UnroutableError) as exc:
                if time.monotonic() + delay > deadline:
                    raise PublishRejected(f"{what}: the broker refused the publish: {exc}") \
                        from None
                log.warning("%s: publish refused (%s), retrying", what, exc)
            except (TTGError, pex.ChannelClosedByBroker) as exc:
                if isinstance(exc, pex.ChannelClosedByBroker):
                    self._ch = None
                    # 404 "down or inaccessible": a queue still recovering after a restart
                    transient = exc.reply_code != 404 or "down or inaccessible" in str(exc)
                    if transient and time.monotonic() + delay <= deadline:
                        log.warning("%s: channel closed by the broker: %s", what, exc)
                        time.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth(exc):
                    raise self.auth_error(exc) from None
                if not isinstance(exc, RETRYABLE):
                    raise
                self._reconnect_within(deadline - delay, what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _reconnect_within(self, last_start: float, what: str, exc: Exception) -> None:
        """After a lost connection on the controller side: drop it (the next call opens a
        new one), or give up when the next attempt would start after `last_start`."""
        self._reset()
        if time.monotonic() > last_start:
            raise BrokerUnavailable(
                f"rabbitmq at {_redacted(self.config.url)}: {what} failed for "
                f"{self.config.retry_budget_s:.0f}s: {exc}") from None
        log.warning("%s failed (%s), reconnecting", what, exc.__class__.__name__)

    def check(self) -> None:
        self._channel()

    def close(self) -> None:
        if self.io is not None:
            if not self.io.fatal and self._unsettled:
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - unacked chunks are redelivered
                    log.warning("could not write the last results at exit: %s", exc)
            self.io.stop.set()
            self.io.join(timeout=5)
            self.io = None
        for tail in self._tails.values():
            tail.close()
        self._reset()

    # ---- small helpers ------------------------------------------------------------------
    @staticmethod
    def _publish(ch: BlockingChannel, q: str, body: bytes | str, headers: dict | None = None,
                 ) -> None:
        """A persistent, mandatory publish; returns once confirmed (raises on nack/return)."""
        ch.basic_publish("", q, body.encode() if isinstance(body, str) else body,
                         pika.BasicProperties(delivery_mode=PERSISTENT, headers=headers or {},
                                              content_type="application/json"),
                         mandatory=True)

    def declare_topology(self, ch: BlockingChannel) -> None:
        for q, args in self.topology.queues(self.names):
            ch.queue_declare(q, durable=True, arguments=args)

    def _count(self, q: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None if it does not exist."""
        def fn(ch: BlockingChannel) -> tuple[int, int]:
            ok = ch.queue_declare(q, passive=True)
            return ok.method.message_count, ok.method.consumer_count
        try:
            return self._ctl(fn, f"inspect {q}")
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise

    def _read_stream(self, q: str, start: int | str) -> Iterator[tuple[int, dict, bytes]]:
        """Every record of stream `q` from `start` up to now: (offset, headers, body).

        A stream has no end marker, so a unique marker is published first (confirmed) and
        the read stops when it comes back: everything confirmed before it has been seen.
        """
        mark = uuid.uuid4().hex
        self._ctl(lambda ch: self._publish(ch, q, b"", {MARK: mark}), f"mark {q}")
        conn = self.connect()
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=2000)
            deadline = time.monotonic() + self.config.retry_budget_s
            unacked = 0
            for method, props, body in ch.consume(q, arguments={"x-stream-offset": start},
                                                  inactivity_timeout=1.0):
                if method is None:
                    if time.monotonic() > deadline:
                        raise BrokerUnavailable(f"reading {q}: no end after "
                                                f"{self.config.retry_budget_s:.0f}s")
                    continue
                unacked += 1
                if unacked >= 500:
                    ch.basic_ack(method.delivery_tag, multiple=True)
                    unacked = 0
                headers = dict(props.headers or {})
                if MARK in headers:
                    if headers[MARK] == mark:
                        return
                    continue
                yield _header_int(headers, "x-stream-offset"), headers, body
        finally:
            _discard(conn)

    def _stream_records(self, q: str, start: int | str = "first"
                        ) -> Iterator[tuple[int, dict, bytes]]:
        """`_read_stream` with reconnects: resumes after the last offset seen."""
        pos: int | str = start
        attempts = 0
        if self._count(q) is None:
            return  # no such stream: nothing to read
        while True:
            try:
                for offset, headers, body in self._read_stream(q, pos):
                    pos = offset + 1
                    yield offset, headers, body
                return
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == 404 and "down or inaccessible" not in str(exc):
                    return  # no such stream: nothing to read
                attempts += 1
                self._reset()
                if attempts > 20:
                    raise BrokerUnavailable(f"reading {q}: {exc}") from None
                time.sleep(min(0.1 * 2 ** attempts, 2.0))
            except RETRYABLE as exc:
                attempts += 1
                self._reset()
                if attempts > 20:
                    raise BrokerUnavailable(f"reading {q}: {exc}") from None
                time.sleep(min(0.1 * 2 ** attempts, 2.0))

    # ---- job metadata -------------------------------------------------------------------
    def _meta(self, run_id: str) -> tuple[dict | None, bool]:
        """(the spec record, enqueued?) of a run."""
        rec, enqueued = None, False
        for _o, headers, body in self._stream_records(Names(run_id).meta):
            kind = headers.get("k")
            try:
                data = json.loads(body)
            except ValueError:
                continue
            if kind == "spec" and rec is None:
                rec = data
            elif kind == "enqueued":
                enqueued = True
        return rec, enqueued

    def _adopt(self, rec: dict) -> JobSpec:
        spec = JobSpec.from_fields(rec["spec"])
        self.names = Names(spec.run_id, len(rec["tiers_ms"]))
        self.topology = Topology([int(t) for t in rec["tiers_ms"]], int(rec["delivery_limit"]))
        return spec

    def _rec(self, run_id: str) -> dict | None:
        """The run's spec record (cached once found: it never changes)."""
        if run_id not in self._recs:
            if self._count(Names(run_id).meta) is None:
                return None
            rec, _ = self._meta(run_id)
            if rec is None:
                return None
            self._recs[run_id] = rec
        return self._recs[run_id]

    def load_spec(self, run_id: str) -> JobSpec | None:
        rec = self._rec(run_id)
        return JobSpec.from_fields(rec["spec"]) if rec else None

    def submitted_at(self, run_id: str) -> float | None:
        rec = self._rec(run_id)
        return float(rec["submitted_at"]) if rec else None

    # ---- controller ---------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> bool:
        n = Names(spec.run_id, len(self.tiers_ms))
        self._ctl(lambda ch: ch.queue_declare(n.meta, durable=True,
                                               arguments={"x-queue-type": "stream"}))
        rec, enqueued = self._meta(spec.run_id)
        if rec is not None:
            existing = JobSpec.from_fields(rec["spec"])
            if not existing.same_job(spec):
                raise JobMismatch(f"run {spec.run_id} exists with a different job "
                                  f"({existing}); use a new run id")
            if not enqueued:  # an earlier submit died half-way: finish it
                self._adopt(rec)
                self._ctl(self.declare_topology, "declare queues")
                self._enqueue(spec, self._not_done_nor_dead(spec))
                self._mark_enqueued(spec)
            return False
        rec = {"spec": spec.to_fields(), "tiers_ms": self.tiers_ms,
               "delivery_limit": max(spec.max_attempts - 1, 0),
               "submitted_at": f"{time.time():.6f}"}
        self._adopt(rec)
        self._ctl(self.declare_topology, "declare queues")
        self._ctl(lambda ch: self._publish(ch, n.meta, json.dumps(rec), {"k": "spec"}),
                  "publish the job")
        rec2, _ = self._meta(spec.run_id)  # two concurrent submits: the first record wins
        if rec2 is not None and rec2.get("submitted_at") != rec["submitted_at"]:
            if not JobSpec.from_fields(rec2["spec"]).same_job(spec):
                raise JobMismatch(f"run {spec.run_id} was submitted concurrently with a "
                                  "different job")
            return False
        self._enqueue(spec, range(spec.chunks_total))
        self._mark_enqueued(spec)
        return True

    def _mark_enqueued(self, spec: JobSpec) -> None:
        n = Names(spec.run_id)
        body = json.dumps({"chunks": spec.chunks_total, "at": time.time()})
        self._ctl(lambda ch: self._publish(ch, n.meta, body, {"k": "enqueued"}), "enqueued")

    def _enqueue(self, spec: JobSpec, chunks: Any) -> None:
        n = Names(spec.run_id)

        def items() -> Iterator[tuple[str, bytes, dict]]:
            for chunk in chunks:
                s, e = spec.bounds(chunk)
                yield (n.tasks, json.dumps({"c": chunk, "s": s, "e": e, "a": 1}).encode(),
                       {"chunk": chunk})

        self._publish_many(items(), "enqueue chunks")

    def _publish_many(self, items: Iterator[tuple[str, bytes, dict]], what: str) -> int:
        """Publish on the controller connection with confirms, WINDOW messages in flight
        (batches of BATCH), instead of a round trip per message. Refused (nacked or
        returned) publishes are published again until the retry budget is spent
        (PublishRejected); after a lost connection every unconfirmed one is published
        again on a new one (a duplicate task only costs a redundant execution)."""
        source = iter(items)
        todo: deque[tuple[str, bytes, dict]] = deque()
        outstanding: dict[int, list] = {}
        settled: list[tuple[int, list[int]]] = []
        deadline = time.monotonic() + self.config.retry_budget_s
        delay, refused_since, sent, bid = 0.1, None, 0, 0
        conf: _Confirms | None = None
        while True:
            try:
                if conf is None:
                    conf = self._confirm_channel()
                while len(outstanding) * PUBLISH_BATCH < PUBLISH_WINDOW:
                    part = [todo.popleft() for _ in range(min(len(todo), PUBLISH_BATCH))]
                    part += [x for _, x in zip(range(PUBLISH_BATCH - len(part)), source,
                                               strict=False)]
                    if not part:
                        break
                    bid += 1
                    batch = _Batch(lambda failed, b=bid: settled.append((b, failed)))
                    outstanding[bid] = part
                    conf.publish_all(part, batch)
                    batch.seal()
                if not outstanding:
                    return sent
                timer = self._conn.call_later(  # type: ignore[union-attr]
                    max(deadline - time.monotonic(), 0.5), lambda: settled.append((0, [])))
                conf.ch._flush_output(lambda: bool(settled))  # noqa: SLF001
                self._conn.remove_timeout(timer)  # type: ignore[union-attr]
                for b, failed in settled:
                    if b == 0:
                        raise BrokerUnavailable(f"{what}: no publisher confirm for "
                                                f"{self.config.retry_budget_s:.0f}s")
                    part = outstanding.pop(b)
                    sent += len(part) - len(failed)
                    if failed:
                        now = time.monotonic()
                        refused_since = refused_since or now
                        if now - refused_since > self.config.retry_budget_s:
                            raise PublishRejected(f"{what}: the broker refused {len(failed)} "
                                                  "publish(es) past the retry budget")
                        log.warning("%s: %d publish(es) refused, publishing them again",
                                    what, len(failed))
                        time.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        todo.extend(part[i] for i in failed)
                    else:
                        refused_since, delay = None, 0.1
                settled.clear()
            except (TTGError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth(exc):
                    raise self.auth_error(exc) from None
                if not isinstance(exc, (*RETRYABLE, pex.ChannelClosedByBroker)):
                    raise
                for b in sorted(outstanding):
                    todo.extend(outstanding[b])
                outstanding.clear()
                settled.clear()
                conf = None
                self._reconnect_within(deadline - delay, what, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _confirm_channel(self) -> _Confirms:
        """A channel of the controller connection with tracked (windowed) confirms."""
        self._channel()
        if self._pconf is None or not self._pconf.ch.is_open:
            self._pconf = _Confirms(self._conn.channel())  # type: ignore[union-attr]
        return self._pconf

    def _ledger(self, run_id: str) -> _Ledger:
        led = self._ledgers.setdefault(run_id, _Ledger())
        for offset, headers, body in self._tail_records(run_id, led.next_offset):
            led.next_offset = offset + 1
            kind = headers.get("k")
            try:
                data = json.loads(body)
            except ValueError:
                continue
            if kind in ("result", "results"):
                for rec in (data if kind == "results" else [data]):
                    led.results += 1
                    led.done.add(int(rec.get("chunk", -1)))
                    led.task_s += float(rec.get("task_s", 0.0))
                    if rec.get("reclaimed"):
                        led.reclaimed += 1
                        led.events.append(_event("reclaimed", rec.get("started"), rec))
            elif kind == "fatal" and isinstance(data, dict):
                led.fatal[str(data.get("worker"))] = str(data.get("error"))[:2000]
            elif kind == "fail":
                led.fails += 1
                led.task_s += float(data.get("task_s", 0.0))
                led.retried += 1 if data.get("outcome") == "retried" else 0
                if data.get("reclaimed"):
                    led.events.append(_event("reclaimed", data.get("started"), data))
                if data.get("outcome") == "retried":
                    led.events.append(_event("retried", data.get("at"), data,
                                             attempt=data.get("attempt"),
                                             error=data.get("err")))
        return led

    def events(self, run_id: str) -> list[dict]:
        """Reclaimed chunks (a redelivered chunk's result or failure record, at the time it
        started running again), retries (at the failure) and dead letters (at the time
        they were dead-lettered, when known), oldest first."""
        if self._rec(run_id) is None:
            return []
        led = self._ledger(run_id)
        out = [e for e in led.events if e["ts"] is not None]
        for d in self._dead_cached(run_id):
            if d.at is not None:
                out.append({"ts": float(d.at), "kind": "dead_lettered", "chunk": d.chunk,
                            "worker": d.worker, "attempts": d.attempts, "reason": d.reason})
        return sorted(out, key=lambda e: e["ts"])

    def broker_memory_bytes(self) -> int:
        """The node's memory (`mem_used` of /api/nodes, management API), or, for a user
        without the `monitoring` tag, the memory of the vhost's queues (a lower bound);
        0 if the management API cannot be reached. Its URL: options["management_url"] or
        TTG_RABBITMQ_MANAGEMENT_URL, else http://<AMQP host>:<AMQP port + 10000>."""
        base = (self.config.options.get("management_url")
                or os.environ.get("TTG_RABBITMQ_MANAGEMENT_URL"))
        if not base:
            host = self.params.host
            base = f"http://{host}:{(self.params.port or 5672) + 10000}"
        base = base.rstrip("/")
        creds = self.params.credentials
        auth = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()

        def get(path: str) -> Any:
            req = urllib.request.Request(base + path,
                                         headers={"Authorization": f"Basic {auth}"})
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - http(s) only
                return json.load(resp)

        if not base.startswith(("http://", "https://")):
            return 0
        try:
            nodes = get("/api/nodes?columns=name,mem_used")
            return int(sum(int(n.get("mem_used") or 0) for n in nodes))
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):
                return 0
        except (OSError, ValueError):
            return 0
        try:  # a `management` user may not read the nodes: its vhost's queues instead
            vhost = urllib.parse.quote(self.params.virtual_host, safe="")
            queues = get(f"/api/queues/{vhost}?columns=name,memory")
            return int(sum(int(q.get("memory") or 0) for q in queues))
        except (OSError, ValueError):
            return 0

    def _tail_records(self, run_id: str, start: int | str) -> list[tuple[int, dict, bytes]]:
        q = Names(run_id).results
        if self._count(q) is None:
            return []
        tail = self._tails.get(run_id)
        if tail is None:
            tail = self._tails[run_id] = _Tail(self, q)
        for attempt in range(20):
            try:
                return tail.read(start)
            except (pex.ChannelClosedByBroker, *RETRYABLE) as exc:
                tail.close()
                if attempt == 19:
                    raise BrokerUnavailable(f"reading {q}: {exc}") from None
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
        return []

    def results(self, run_id: str) -> Iterator[tuple[int, Partial, dict]]:
        seen: set[int] = set()
        for _o, headers, body in self._stream_records(Names(run_id).results):
            kind = headers.get("k")
            if kind == "result":
                chunk = _header_int(headers, "chunk")
                if chunk in seen:
                    continue
                seen.add(chunk)
                partial, meta = decode_result(body)
                yield chunk, partial, meta
            elif kind == "results":  # a batch: one record per chunk, in order
                for meta in json.loads(body):
                    chunk = int(meta.get("chunk", -1))
                    if chunk in seen:
                        continue
                    seen.add(chunk)
                    yield chunk, Partial.from_dict(meta), meta

    def report_fatal(self, error: str) -> None:
        """A worker that cannot run the job says why (a record of the results stream)."""
        body = json.dumps({"worker": self.worker_id, "error": error[:2000]}).encode()
        self._ctl(lambda ch: self._publish(ch, self.names.results, body, {"k": "fatal"}),
                  "report the worker's error")

    def worker_errors(self, run_id: str) -> dict[str, str]:
        return dict(self._ledger(run_id).fatal)

    def take_rows(self, run_id: str, limit: int = 200) -> list[tuple[Any, int, bytes]]:
        """Up to `limit` chunks' rows, unacked (basic.get): (token, chunk, rows). They stay in
        the queue until `drop_rows`; if this channel is lost first, the broker requeues them."""
        q = Names(run_id).rows

        def fn(ch: BlockingChannel) -> list[tuple[Any, int, bytes]]:
            out = []
            for _ in range(limit):
                method, props, body = ch.basic_get(q, auto_ack=False)
                if method is None:
                    break
                chunk = _header_int(props.headers or {}, "chunk")
                out.append(((ch, method.delivery_tag), chunk, body))
            return out

        try:
            return self._ctl(fn, f"read {q}")
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # not submitted yet, or purged
                return []
            raise

    def drop_rows(self, run_id: str, tokens: list[Any]) -> None:
        """Ack rows now durable elsewhere (those of a lost channel were requeued: their copies
        are recognised by chunk and dropped again)."""
        live = [tag for ch, tag in tokens if ch is self._ch and ch.is_open]
        if live:
            try:
                self._ch.basic_ack(max(live), multiple=True)  # type: ignore[union-attr]
            except RETRYABLE as exc:
                log.info("rows ack lost with the channel (%s): they are read again",
                         exc.__class__.__name__)

    def _read_dlq(self, run_id: str, take: Callable[[DeadLetter, BlockingChannel, int], bool]
                  | None = None) -> list[DeadLetter]:
        """Every dead letter, by basic.get; unless `take` says so each one is handed back
        (the channel is closed unacked) so the queue is unchanged."""
        q = Names(run_id).dlq

        def read(_ch: BlockingChannel) -> list[DeadLetter]:
            ch = self._conn.channel()  # type: ignore[union-attr]
            out: list[DeadLetter] = []
            try:
                while True:
                    method, props, body = ch.basic_get(q, auto_ack=False)
                    if method is None:
                        break
                    d = self._parse_dead(props.headers or {}, body)
                    if take is not None and take(d, ch, method.delivery_tag):
                        continue
                    out.append(d)
            finally:
                try:
                    ch.close()
                except Exception:  # noqa: BLE001 - unacked messages go back either way
                    pass
            return out

        try:
            return self._ctl(read, f"read {q}")
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return []
            raise

    @staticmethod
    def _parse_dead(headers: dict, body: bytes) -> DeadLetter:
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            return DeadLetter(chunk=-1, reason="malformed message", attempts=0,
                              raw=body[:2000].decode("utf-8", "replace"))
        if headers.get("k") == "dead":
            at = data.get("at")
            return DeadLetter(chunk=_int_or(data.get("chunk", -1), -1),
                              reason=str(data.get("reason")),
                              attempts=max(_int_or(data.get("attempts", 0), 0), 0),
                              worker=str(data["worker"]) if data.get("worker") else None,
                              at=_event("", at, {})["ts"],
                              raw=str(data["raw"]) if data.get("raw") else None)
        # the broker's dead letter: a task message and its x-death history
        deaths = [d for d in headers.get("x-death") or [] if isinstance(d, dict)] or [{}]
        reason = str(deaths[0].get("reason", "dead-lettered by the broker"))
        lost = max(_int_or(data.get("lost", 0) or 0, 0), 0) + sum(
            max(_int_or(d.get("count", 0) or 0, 0), 0)
            for d in deaths if d.get("reason") == "delivery_limit")
        if reason == "delivery_limit":
            text = "delivery limit: the chunk lost its worker (x-delivery-limit reached)"
        else:
            text = f"dead-lettered by the broker: {reason}"
        if data.get("err"):
            text += f"; last error: {data['err']}"
        chunk = _int_or(data.get("c", -1), -1)
        at = deaths[0].get("time")
        if isinstance(at, datetime.datetime):
            at = at.replace(tzinfo=at.tzinfo or datetime.timezone.utc).timestamp()
        return DeadLetter(chunk=chunk, reason=text,
                          attempts=max(_int_or(data.get("a", 1) or 1, 1), 0) + max(lost, 0),
                          at=float(at) if isinstance(at, (int, float)) else None,
                          raw=None if chunk >= 0 else body[:2000].decode("utf-8", "replace"))

    def dead_letters(self, run_id: str) -> list[DeadLetter]:
        out: dict[int, DeadLetter] = {}
        for d in self._read_dlq(run_id):
            out[d.chunk] = d
        return sorted(out.values(), key=lambda d: d.chunk)

    def _dead_cached(self, run_id: str) -> list[DeadLetter]:
        """The dead letters, re-read only when the DLQ's message count changes."""
        counts = self._count(Names(run_id).dlq)
        n = counts[0] if counts else 0
        cached = self._dlq_cache.get(run_id)
        if cached is None or cached[0] != n:
            cached = (n, self.dead_letters(run_id) if n else [])
            self._dlq_cache[run_id] = cached
        return cached[1]

    def _ready(self, run_id: str) -> int:
        """Messages ready in the work queue and waiting in the retry tiers."""
        n = Names(run_id)
        rec = self._rec(run_id)
        tiers = len(rec["tiers_ms"]) if rec else len(self.tiers_ms)
        total = 0
        for q in [n.tasks] + [n.tier(i) for i in range(tiers)]:
            c = self._count(q)
            total += c[0] if c else 0
        return total

    def progress(self, run_id: str) -> Progress:
        spec = self.load_spec(run_id)
        if spec is None:
            raise ConfigError(f"run {run_id} has not been submitted")
        n = Names(run_id)
        led = self._ledger(run_id)
        dead = {d.chunk for d in self._dead_cached(run_id)} - led.done
        done = len(led.done)
        queued = self._ready(run_id)
        presence = self._count(n.presence)
        workers = presence[1] if presence else 0
        missing = max(spec.chunks_total - done - len(dead), 0)
        in_flight = max(missing - queued, 0) if workers else 0
        return Progress(
            chunks_total=spec.chunks_total, done=done, dead=len(dead), queued=queued,
            in_flight=in_flight, executions=led.results + led.fails,
            duplicates=led.results - done, reclaimed=led.reclaimed, retried=led.retried,
            task_s=led.task_s, workers_alive=workers,
        )

    def _not_done_nor_dead(self, spec: JobSpec) -> list[int]:
        done = self._ledger(spec.run_id).done
        dead = {d.chunk for d in self.dead_letters(spec.run_id)}
        return sorted(set(range(spec.chunks_total)) - done - dead)

    def reconcile(self, run_id: str) -> list[int]:
        """Re-enqueue every chunk neither done nor dead, but only when nothing is ready in
        the work and retry queues: a quorum queue cannot be listed, so "queued" is only
        known to be empty then. In-flight chunks may be duplicated (first write wins)."""
        spec = self.load_spec(run_id)
        if spec is None:
            raise ConfigError(f"run {run_id} has not been submitted")
        if self._ready(run_id) > 0:
            return []
        missing = self._not_done_nor_dead(spec)
        if missing and self._ready(run_id) == 0:
            self._enqueue(spec, missing)
            log.warning("reconcile re-enqueued %d chunk(s): %s", len(missing), missing[:20])
            return missing
        return []

    def replay_dead(self, run_id: str, chunks: list[int] | None = None) -> list[int]:
        spec = self.load_spec(run_id)
        if spec is None:
            raise ConfigError(f"run {run_id} has not been submitted")
        n = Names(run_id)
        replayed: list[int] = []

        def take(d: DeadLetter, ch: BlockingChannel, tag: int) -> bool:
            if not 0 <= d.chunk < spec.chunks_total:
                return False  # a malformed message stays: there is nothing to replay
            if chunks is not None and d.chunk not in chunks:
                return False
            s, e = spec.bounds(d.chunk)
            self._publish(ch, n.tasks, json.dumps({"c": d.chunk, "s": s, "e": e, "a": 1}),
                          {"chunk": d.chunk})
            ch.basic_ack(tag)
            replayed.append(d.chunk)
            return True

        self._read_dlq(run_id, take)
        self._dlq_cache.pop(run_id, None)
        return sorted(set(replayed))

    # ---- worker -------------------------------------------------------------------------
    def start_consuming(self, run_id: str, worker_id: str,
                        worker_index: int | None) -> JobSpec | None:
        self.worker_id = worker_id
        meta = Names(run_id).meta
        self._ctl(lambda ch: ch.queue_declare(meta, durable=True,
                                               arguments={"x-queue-type": "stream"}))
        rec = None
        for _o, headers, body in self._wait_stream(meta):
            if headers.get("k") == "spec":
                rec = json.loads(body)
                break
        if rec is None:  # stopped while waiting for the submission
            return None
        self.spec = self._adopt(rec)
        self._reset()  # the main-thread connection would miss heartbeats during a chunk
        self.io = _IOThread(self)
        self.io.start()
        if not self.io.ready.wait(self.config.connect_timeout_s + 5) or self.io.fatal:
            raise self.io.fatal or BrokerUnavailable("could not start consuming")
        return self.spec

    def _wait_stream(self, q: str) -> Iterator[tuple[int, dict, bytes]]:
        """Records of stream `q` from the first, blocking for new ones (never ends)."""
        pos: int | str = "first"
        while True:
            conn = self.connect()  # bounded by connect_timeout_s
            try:
                ch = conn.channel()
                ch.basic_qos(prefetch_count=100)
                for method, props, body in ch.consume(q, arguments={"x-stream-offset": pos},
                                                      inactivity_timeout=1.0):
                    if method is None:
                        if self.stop_requested():
                            return
                        continue
                    ch.basic_ack(method.delivery_tag)
                    headers = dict(props.headers or {})
                    pos = _header_int(headers, "x-stream-offset") + 1
                    if MARK in headers:
                        continue
                    yield pos - 1, headers, body
            except RETRYABLE as exc:
                log.warning("waiting for the job: %s", exc.__class__.__name__)
            finally:
                _discard(conn)

    def _io(self) -> _IOThread:
        assert self.io is not None, "start_consuming first"
        if self.io.fatal:
            raise self.io.fatal
        return self.io

    def _op(self, fn: Callable[[BlockingChannel], T], what: str) -> T:
        """fn(channel) on the I/O thread; waits through reconnects (retry_budget_s)."""
        io = self._io()
        deadline = time.monotonic() + self.config.retry_budget_s
        delay = 0.1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(f"{what}: broker unavailable for "
                                        f"{self.config.retry_budget_s:.0f}s")
            io.ready.wait(remaining)
            if io.fatal:
                raise io.fatal
            try:
                return io.call(fn, timeout=max(remaining, 1.0))
            except (pex.NackError, pex.UnroutableError) as exc:
                if time.monotonic() + delay > deadline:
                    raise PublishRejected(f"{what}: the broker refused the publish for "
                                          f"{self.config.retry_budget_s:.0f}s: {exc}") from None
                log.warning("%s: publish refused (%s): retrying in %.1fs", what, exc, delay)
            except RETRYABLE as exc:
                log.info("%s: %s: waiting for the reconnect", what, exc.__class__.__name__)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # Results of consecutive short chunks are published together and confirmed together;
    # their deliveries are acked (one `multiple` ack) by the connection's thread once every
    # result of the batch is confirmed, never before. One batch is in flight while the
    # next one runs; `flush()` waits for both.

    def _begin(self, entries: list[tuple[str, bytes, dict]], tokens: list[tuple[int, int]]
               ) -> Future:
        io = self._io()
        fut: Future = Future()
        io.call(lambda _ch: io.start_batch(entries, tokens, fut), timeout=10)
        return fut

    def _confirmed(self, entries: list[tuple[str, bytes, dict]],
                   tokens: list[tuple[int, int]], what: str, fut: Future | None = None,
                   ) -> None:
        """Publish `entries` (or await `fut`, their batch already started) until every one
        is confirmed, then ack `tokens`. Refused publishes are published again until the
        retry budget is spent (PublishRejected); publishes whose confirm was lost with the
        connection are published again once reconnected (BrokerUnavailable past the
        budget). Nothing is acked unless all of `entries` are confirmed."""
        io = self._io()
        deadline = time.monotonic() + self.config.retry_budget_s
        delay = 0.1
        todo = entries
        while True:
            remaining = deadline - time.monotonic()
            try:
                if fut is None:
                    if remaining <= 0:
                        raise BrokerUnavailable(f"{what}: broker unavailable for "
                                                f"{self.config.retry_budget_s:.0f}s")
                    io.ready.wait(remaining)
                    if io.fatal:
                        raise io.fatal
                    fut = self._begin(todo, tokens)
                failed = fut.result(timeout=max(remaining, 1.0))
                if not failed:
                    return
                todo = [todo[i] for i in failed]
                if time.monotonic() + delay > deadline:
                    raise PublishRejected(f"{what}: the broker refused {len(todo)} publish(es) "
                                          f"for {self.config.retry_budget_s:.0f}s")
                log.warning("%s: %d publish(es) refused: retrying in %.1fs", what, len(todo),
                            delay)
            except FutureTimeout:
                raise BrokerUnavailable(f"{what}: no publisher confirm for "
                                        f"{self.config.retry_budget_s:.0f}s") from None
            except RETRYABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(f"{what}: broker unavailable for "
                                            f"{self.config.retry_budget_s:.0f}s") from None
                log.info("%s: %s: waiting for the reconnect", what, exc.__class__.__name__)
            fut = None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _token(self, token: tuple[int, int]) -> list[tuple[int, int]]:
        """[token] the first time a delivery is acked, [] after (never acked twice)."""
        if token in self._acked:
            return []
        self._acked.add(token)
        return [token]

    def _add_result(self, entry: tuple[str, bytes, dict], tokens: list[tuple[int, int]],
                    send_now: bool, rows: tuple[str, bytes, dict] | None = None) -> None:
        io = self._io()
        self._reap()
        out, new = self._open_out, False
        with io._lock:  # noqa: SLF001 - shared with `take` on the connection's thread
            if out is None or out.taken:
                out, new = _Out(), True
                io._pending.add(out.fut)  # noqa: SLF001 - failed by a reconnect
            out.entries.append(entry)
            if rows is not None:
                out.rows.append(rows)
            out.tokens += tokens
        if new:
            self._open_out = out
            self._unsettled.append(out)
            conn = io.conn
            io.post(lambda: conn.call_later(0.02, lambda: io.take(out)), out)  # type: ignore[union-attr]
        if send_now or len(out.entries) >= self.batch_size():
            self._send_open()
        while len(self._unsettled) > 16:  # bounded (the prefetch bounds it already)
            self._settle_one()

    def _send_open(self) -> None:
        """Have the open batch published now (its acks follow its confirms, on the
        connection's thread: nobody waits here)."""
        out, self._open_out = self._open_out, None
        if out is not None:
            io = self._io()
            io.post(lambda: io.take(out), out)

    def _reap(self) -> None:
        """Settle the batches already confirmed (or refused, or lost: published again)."""
        while self._unsettled and self._unsettled[0].fut.done():
            self._settle_one()

    def _settle_one(self) -> None:
        """Wait for the oldest batch: confirmed and acked, or published again."""
        out = self._unsettled.popleft()
        if out is self._open_out:
            self._open_out = None
            self._io().post(lambda: self._io().take(out), out)
        self._confirmed(out.entries, out.tokens, "write the results", fut=out.fut)

    def flush(self) -> None:
        if self.io is None:
            return
        while self._unsettled:
            self._settle_one()

    def _ack(self, d: Delivery) -> None:
        tokens = self._token(d.token)
        if not tokens:
            return
        if d.token[0] != self._io().gen:
            log.info("delivery from before a reconnect: not acked (the broker requeued it; "
                     "the copy will be recognised)", extra={"chunk": d.chunk})
            return
        try:
            self._confirmed([], tokens, "ack")
        except TTGError:
            log.info("ack lost with the connection: the copy will be recognised",
                     extra={"chunk": d.chunk})

    def _dead_letter(self, chunk: int, reason: str, attempts: int, raw: str = "",
                     token: tuple[int, int] | None = None) -> None:
        """Publish a dead-letter record, then (confirmed) ack `token`."""
        rec = {"chunk": chunk, "reason": reason[:2000], "attempts": attempts,
               "worker": self.worker_id, "at": round(time.time(), 3)}
        if raw:
            rec["raw"] = raw[:2000]
        self._confirmed([(self.names.dlq, json.dumps(rec).encode(),
                          {"k": "dead", "chunk": chunk})],
                        self._token(token) if token else [], "dead-letter")

    def _parse(self, raw: _Raw) -> Delivery | None:
        """A Delivery, or None after dead-lettering a malformed message."""
        assert self.spec is not None
        try:
            data, chunk, start, end, attempt, lost = parse_task_body(self.spec, raw.body)
        except MalformedBody as exc:
            reason = f"malformed message: {exc}"
            text = raw.body[:2000].decode("utf-8", "replace")
            chunk = exc.chunk
            log.error("dead-lettering a message: %s", reason)
            token = (raw.gen, raw.tag) if raw.gen == self._io().gen else None
            self._dead_letter(chunk, reason, 0, raw=text, token=token)
            return None
        lost += _header_int(raw.headers, "x-delivery-count")
        d = Delivery(self.spec.run_id, chunk, start, end, attempt, token=(raw.gen, raw.tag),
                     reclaimed=lost > 0 or raw.redelivered, last_error=data.get("err"))
        d.lost = lost  # type: ignore[attr-defined]
        d.body = data  # type: ignore[attr-defined]
        return d

    def _fill(self, timeout_s: float) -> bool:
        io = self._io()
        try:
            if timeout_s <= 0:
                self._held.append(io.inbox.get_nowait())
            else:
                self._held.append(io.inbox.get(timeout=timeout_s))
        except queue.Empty:
            return False
        while True:
            try:
                self._held.append(io.inbox.get_nowait())
            except queue.Empty:
                return True

    def next_delivery(self, timeout_s: float) -> Delivery | None:
        assert self.spec is not None
        deadline = time.monotonic() + timeout_s
        while True:
            io = self._io()
            if not self._held and not self._fill(0.0):
                self._send_open()  # results out before waiting: their acks free the window
                self._reap()
                if not self._fill(deadline - time.monotonic()):
                    self.flush()  # idle: every result confirmed and acked
                    if io.fatal:
                        raise io.fatal
                    return None
            raw = self._held.popleft()
            if raw.gen != io.gen:
                continue  # its channel is gone: the broker has requeued it
            d = self._parse(raw)
            if d is None:
                continue
            lost = d.lost  # type: ignore[attr-defined]
            if d.reclaimed and (d.chunk in self._completed
                                or (d.chunk, d.attempt) in self._handled):
                log.info("redelivered copy of a chunk handled here: acked, not run",
                         extra={"chunk": d.chunk})
                self.flush()  # its result is confirmed before the copy is acked
                self._ack(d)
                continue
            if d.attempt + lost > self.spec.max_attempts:
                reason = f"delivery limit: the chunk lost its worker {lost} time(s)"
                if d.last_error:
                    reason += f"; last error: {d.last_error}"
                log.error("dead-lettering: %s", reason, extra={"chunk": d.chunk})
                self._dead_letter(d.chunk, reason, d.attempt + lost, token=d.token)
                continue
            if lost > 0:
                self._isolate(d)
            return d

    def _hand_back(self, raws: list[_Raw]) -> None:
        """Give held, unstarted messages back without counting a return: republish them
        (their losses carried in `lost`), then ack the originals once confirmed."""
        io = self._io()
        entries, tokens = [], []
        for raw in raws:
            if raw.gen != io.gen:
                continue  # the broker has requeued it with its channel
            try:
                data = json.loads(raw.body)
                if not isinstance(data, dict):
                    raise ValueError
                data["lost"] = int(data.get("lost", 0) or 0) + _header_int(
                    raw.headers, "x-delivery-count")
                body = json.dumps(data).encode()
            except (ValueError, TypeError):
                body = raw.body
            headers = {"chunk": raw.headers["chunk"]} if "chunk" in raw.headers else {}
            entries.append((self.names.tasks, body, headers))
            tokens += self._token((raw.gen, raw.tag))
        if not entries:
            return
        try:
            self._confirmed(entries, tokens, "hand back")
        except PublishRejected:
            for gen, tag in tokens:
                self._acked.discard((gen, tag))
                io.call(lambda _ch, g=gen, t=tag: io.nack_tag(t) if io.gen == g else None,
                        timeout=10)

    def _cancel(self, what: str) -> None:
        io = self._io()
        io.want_consume = False

        def cancel(ch: BlockingChannel) -> None:
            if io.ctag is not None:
                ch.basic_cancel(io.ctag)
                io.ctag = None

        self._op(cancel, what)

    def _isolate(self, d: Delivery) -> None:
        """Run a redelivered chunk alone: stop consuming, hand the rest back."""
        self.flush()
        try:
            self._cancel("pause consuming")
        except RETRYABLE:
            pass
        self._fill(0.0)
        held, self._held = list(self._held), deque()
        self._hand_back(held)
        self._isolated = True
        log.info("redelivered chunk (lost its worker %d time(s)): running it alone",
                 d.lost, extra={"chunk": d.chunk})  # type: ignore[attr-defined]

    def _resume(self) -> None:
        if not self._isolated:
            return
        self.flush()  # the suspect's result is confirmed and acked before consuming again
        self._isolated = False
        io = self._io()
        io.want_consume = True

        def consume(ch: BlockingChannel) -> None:
            if io.ctag is None:
                io.consume(ch)

        self._op(consume, "resume consuming")

    # ---- prefetch and batch sizes -------------------------------------------------------
    def batch_size(self) -> int:
        """Results per confirm round trip: half the configured prefetch, or (prefetch 0 =
        auto) as many chunks as take about 20 ms of work, 1 to 64."""
        if self.config.prefetch > 0:
            return max(1, self.config.prefetch // 2)
        if self._ewma_task_s is None:
            return 1
        return max(1, min(64, int(0.02 / max(self._ewma_task_s, 1e-6))))

    def prefetch(self) -> int:
        """The prefetch: configured, or (0 = auto) two batches, so that the next batch is
        already here while one is being confirmed; chunks of 20 ms and more come two at a
        time (one running, one waiting), so a kill strands little work."""
        if self.config.prefetch > 0:
            return self.config.prefetch
        if self._ewma_task_s is None and self.spec is not None and self.spec.work_ms > 0:
            guess = self.spec.chunk_size * self.spec.work_ms / 1000.0
            return 2 * max(1, min(64, int(0.02 / guess)))
        if self._ewma_task_s is None:
            return 4
        return 2 * self.batch_size()

    def complete(self, delivery: Delivery, partial: Partial, meta: dict,
                 rows: bytes = b"") -> bool:
        d = delivery
        task_s = float(meta.get("task_s", 0.0))
        self._ewma_task_s = task_s if self._ewma_task_s is None else (
            0.8 * self._ewma_task_s + 0.2 * task_s)
        extra = {"reclaimed": True} if d.reclaimed else {}
        body = encode_result(partial, chunk=d.chunk, **meta, **extra)
        entry = (self.names.results, body.encode() if isinstance(body, str) else body,
                 {"k": "result", "chunk": d.chunk})
        rows_entry = (self.names.rows, rows, {"k": "rows", "chunk": d.chunk})
        new = d.chunk not in self._completed
        self._completed.add(d.chunk)
        if self._kill_between:  # test hook: die once the result is confirmed, before the ack
            self.flush()
            self._confirmed([entry, rows_entry], [], "write the result")
            os._exit(137)
        io = self._io()
        if self.config.prefetch == 0:
            io.want_prefetch = self.prefetch()
        self._add_result(entry, self._token(d.token),
                         send_now=self._isolated or not (self._held or io.inbox.qsize()),
                         rows=rows_entry)
        if self._isolated:
            self._resume()
        return new

    def fail(self, delivery: Delivery, error: str, task_s: float = 0.0) -> str:
        assert self.spec is not None
        d = delivery
        self.flush()
        lost = getattr(d, "lost", 0)
        dead = d.attempt >= self.spec.max_attempts
        outcome = "dead" if dead else "retried"
        now = time.time()
        rec = {"chunk": d.chunk, "attempt": d.attempt, "task_s": round(task_s, 6),
               "err": error[:2000], "outcome": outcome, "worker": self.worker_id,
               "started": round(now - task_s, 6), "at": round(now, 6)}
        if d.reclaimed:
            rec["reclaimed"] = True
        entries = [(self.names.results, json.dumps(rec).encode(),
                    {"k": "fail", "chunk": d.chunk})]
        if dead:
            drec = {"chunk": d.chunk, "reason": error[:2000], "attempts": d.attempt + lost,
                    "worker": self.worker_id, "at": round(now, 3)}
            entries.append((self.names.dlq, json.dumps(drec).encode(),
                            {"k": "dead", "chunk": d.chunk}))
        else:
            tiers = self.topology.tiers_ms
            tier = self.names.tier(min(d.attempt, len(tiers)) - 1)
            body = json.dumps({"c": d.chunk, "s": d.start, "e": d.end, "a": d.attempt + 1,
                               "err": error[:2000], "lost": lost})
            entries.append((tier, body.encode(), {"chunk": d.chunk}))
        tokens = self._token(d.token) if d.token[0] == self._io().gen else []
        self._confirmed(entries, tokens, "record the failure")
        self._handled.add((d.chunk, d.attempt))
        self._resume()
        return outcome

    def release(self, delivery: Delivery) -> None:
        gen, tag = delivery.token
        body = getattr(delivery, "body", None)
        raw = _Raw(gen, tag, delivery.reclaimed, {"chunk": delivery.chunk},
                   json.dumps({**(body or {}), "lost": getattr(delivery, "lost", 0)}).encode())
        self._hand_back([raw])
        self._isolated = False

    def release_prefetched(self) -> None:
        if self.io is None or self.io.fatal:
            return
        try:
            self.flush()
            self._cancel("stop consuming")
            self._fill(0.0)
            held, self._held = list(self._held), deque()
            self._hand_back(held)
        except TTGError as exc:
            log.warning("could not hand back prefetched chunks (%s): the broker will", exc)

    def finished_for_me(self) -> bool:
        assert self.spec is not None
        self.flush()
        if not self._io().ready.is_set():
            return False  # reconnecting: the connection's thread decides when to give up
        try:
            led = self._ledger(self.spec.run_id)
            dead = {d.chunk for d in self._dead_cached(self.spec.run_id)} - led.done
        except BrokerUnavailable as exc:
            log.warning("could not read the run's progress (%s): not finished yet", exc)
            return False
        finally:  # no idle main-thread connection while chunks run (missed heartbeats)
            for tail in self._tails.values():
                tail.close()
            self._reset()
        return len(led.done) + len(dead) >= self.spec.chunks_total
