"""RabbitMQ backend: publish batches, the confirm tracker, the I/O thread, the stream tail."""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ttg.backends.rabbitmq.messages import (
    MARK,
    PERSISTENT,
    T,
    _discard,
    _header_int,
    _is_auth,
    _Lost,
    _Raw,
    _redacted,
    _table,
)
from ttg.errors import BrokerUnavailable, TTGError

log = logging.getLogger("ttg.rabbitmq")

if TYPE_CHECKING:
    from ttg.backends.rabbitmq.backend import RabbitMQBackend


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
        self.conn = self.owner.connect(self.owner.config.retry_budget_s)
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


