"""RabbitMQ backend: one AMQP connection on a thread of its own, with publisher confirms.

`Link` runs pika's asynchronous adapter (`SelectConnection` and its I/O loop) on its own
thread, on pika's public API only: it opens the connection and a channel, declares the
queues it is given, enables publisher confirms (`confirm_delivery` with an ack/nack
callback, `add_on_return_callback`) and then serves the other threads, which hand it work
with `call` (run a function on the loop, wait for its result) and `publish` (publish a batch,
a Future of the refused indices). Heartbeats keep flowing however long the caller is busy.

A lost connection is reopened with backoff until the retry budget is spent (then `fatal` is
set and every waiter wakes); whatever was pending on the lost connection fails with `_Lost`
(the caller publishes it again). The controller uses a `Link` to submit; the worker's
`WorkerLink` (`consumer.py`) adds consuming and acking.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pika
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed
from pika.channel import Channel

from ttg.backends.backoff import Backoff
from ttg.backends.rabbitmq.messages import PERSISTENT, T, _is_auth, _Lost, _redacted
from ttg.errors import BrokerUnavailable, TTGError

log = logging.getLogger("ttg.rabbitmq")

Entry = tuple[str, bytes, dict]  # (queue, body, headers) of one publish


class Batch:
    """Publishes confirmed together: `done(failed indices)` runs on the link's thread once
    the broker has settled every one of them (ack, nack, or return + ack)."""

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


class Confirms:
    """Publisher confirms on one channel without a round trip per publish.

    Every publish on the channel goes through `publish`, which numbers it as the broker does
    (1, 2, ... after confirm.select) and files it under its batch; `Basic.Ack`/`Basic.Nack`
    (single or `multiple`) settle the publishes they cover (`on_confirm`); a `Basic.Return`
    (unroutable, `mandatory`) marks its publish, found by the sequence number carried in
    `message_id`, as failed when its ack arrives (`on_return`). Runs on the link's thread.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.unconfirmed: dict[int, list] = {}  # seq -> [batch, index, returned]; seq order

    def publish(self, ch: Channel, entries: list[Entry], batch: Batch) -> None:
        for idx, (q, body, headers) in enumerate(entries):
            self.seq += 1
            self.unconfirmed[self.seq] = [batch, idx, False]
            batch.remaining += 1
            ch.basic_publish("", q, body, pika.BasicProperties(
                delivery_mode=PERSISTENT, headers=headers, content_type="application/json",
                message_id=str(self.seq)), mandatory=True)

    def on_confirm(self, frame: Any) -> None:
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

    def on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        try:
            entry = self.unconfirmed.get(int(props.message_id))
        except (TypeError, ValueError):
            return
        if entry is not None:
            entry[2] = True


class Link(threading.Thread):
    """One connection, its loop on this thread; see the module's docstring."""

    # True: only check that the queues exist (a passive declare), never create or redeclare
    # them; a worker's broker user has no configure permission (roles/rabbitmq).
    PASSIVE = False

    def __init__(self, params: pika.ConnectionParameters, url: str, budget_s: float,
                 queues: list[tuple[str, dict]],
                 auth_error: Callable[[BaseException], TTGError], name: str = "amqp-io",
                 accepted: bool = False) -> None:
        super().__init__(name=name, daemon=True)
        self.params = params
        self.url = url
        self.budget_s = budget_s
        self.queues = queues
        self.auth_error = auth_error
        self.gen = 0  # connections opened so far: delivery tags belong to one of them
        # the broker has accepted these credentials before (here or on the caller's own
        # connection): a refusal now is a node still starting its vhosts, retried in the budget
        self.accepted = accepted
        self.conn: pika.SelectConnection | None = None
        self.ch: Channel | None = None
        self.conf = Confirms()
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.fatal: TTGError | None = None
        self.lock = threading.Lock()  # guards `pending` and the ready state it is read with
        self.pending: set[Future] = set()  # failed when the connection is lost
        self._error: BaseException | None = None

    # ---- the loop's thread --------------------------------------------------------------
    def run(self) -> None:
        backoff: Backoff | None = None  # from the first failure after a connection
        while not self.stop.is_set():
            opened = self.gen
            exc = self._session()
            if self.gen != opened:
                backoff = None
            if self.stop.is_set():
                break
            if _is_auth(exc) and not self.accepted:
                self.fatal = self.auth_error(exc)
                break
            backoff = backoff or Backoff(self.budget_s, cap_s=5.0, sleep=self.stop.wait)
            log.warning("connection lost (%s: %s): reconnecting in %.1fs",
                        exc.__class__.__name__, exc, backoff.delay)
            if not backoff.wait():
                self.fatal = BrokerUnavailable(
                    f"rabbitmq at {_redacted(self.url)} unreachable for {self.budget_s:.0f}s: "
                    f"{exc.__class__.__name__}: {exc}")
                break
        self.ready.set()  # wake waiters: they look at `fatal` / `stop`

    def _session(self) -> BaseException:
        """One connection, from open to close; the reason it closed."""
        self._error = None
        conn = pika.SelectConnection(self.params, on_open_callback=self._on_open,
                                     on_open_error_callback=self._on_open_error,
                                     on_close_callback=self._on_closed)
        self.conn = conn
        try:
            conn.ioloop.start()
        finally:
            self._error = self._error or _Lost("connection closed")
            self._lost(self._error)
            conn.ioloop.close()
        return self._error

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn: pika.SelectConnection, exc: BaseException) -> None:
        if isinstance(exc, AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        self._error = exc
        conn.ioloop.stop()

    def _on_closed(self, conn: pika.SelectConnection, reason: BaseException) -> None:
        self._error = self._error or reason
        conn.ioloop.stop()

    def _on_channel_closed(self, _ch: Channel, reason: BaseException) -> None:
        self._error = self._error or reason
        conn = self.conn
        if conn is not None and conn.is_open:
            conn.close()

    def _on_channel(self, ch: Channel) -> None:
        ch.add_on_close_callback(self._on_channel_closed)
        todo = list(self.queues)

        def declare_next(_frame: Any = None) -> None:
            if todo:
                q, args = todo.pop(0)
                if self.PASSIVE:  # exists? (needs no configure permission)
                    ch.queue_declare(q, passive=True, callback=declare_next)
                else:
                    ch.queue_declare(q, durable=True, arguments=args, callback=declare_next)
            else:
                self.conf = Confirms()
                ch.add_on_return_callback(self.conf.on_return)
                ch.confirm_delivery(ack_nack_callback=self.conf.on_confirm,
                                    callback=lambda _frame: self._on_confirming(ch))

        declare_next()

    def _on_confirming(self, ch: Channel) -> None:
        self.gen += 1
        self.accepted = True
        self.ch = ch
        self.on_ready(ch)
        with self.lock:
            self.ready.set()

    def on_ready(self, ch: Channel) -> None:
        """Hook: the channel is open, its queues declared, confirms on (loop's thread)."""

    def _lost(self, exc: BaseException) -> None:
        with self.lock:
            self.ready.clear()
            pending, self.pending = self.pending, set()
        self.ch = None
        self.on_lost()
        for fut in pending:
            if not fut.done():
                fut.set_exception(_Lost(f"{exc.__class__.__name__}: {exc}"))

    def on_lost(self) -> None:
        """Hook: the connection is gone (loop's thread)."""

    def later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run fn on the loop after delay_s (call on the loop's thread)."""
        if self.conn is not None:
            self.conn.ioloop.call_later(delay_s, fn)

    def start_batch(self, entries: list[Entry], fut: Future,
                    then: Callable[[list[int]], None] | None = None) -> None:
        """Publish `entries` (no wait); once all are settled run `then(failed)` and resolve
        `fut` with the indices of the refused ones. On the loop's thread, `fut` tracked."""
        ch = self.ch
        if ch is None:
            if not fut.done():
                fut.set_exception(_Lost("not connected"))
            return

        def done(failed: list[int]) -> None:
            if then is not None:
                then(failed)
            with self.lock:
                self.pending.discard(fut)
            if not fut.done():
                fut.set_result(failed)

        batch = Batch(done)
        self.conf.publish(ch, entries, batch)
        batch.seal()

    # ---- any thread ---------------------------------------------------------------------
    def track(self, fut: Future) -> bool:
        """Have `fut` failed if the connection is lost; False (untracked) if it is not up."""
        with self.lock:
            if not self.ready.is_set() or self.conn is None:
                return False
            self.pending.add(fut)
            return True

    def post(self, fn: Callable[[], None], fut: Future) -> None:
        """Run fn on the loop soon; `fut` (tracked first) fails if that cannot be."""
        conn = self.conn
        try:
            if conn is None or not self.track(fut):
                raise _Lost("not connected")
            conn.ioloop.add_callback_threadsafe(fn)
        except Exception as exc:  # noqa: BLE001 - the connection is gone: try again later
            with self.lock:
                self.pending.discard(fut)
            if not fut.done():
                fut.set_exception(_Lost(f"{exc.__class__.__name__}: {exc}"))

    def call(self, fn: Callable[[Channel], T | Future], timeout: float) -> T:
        """Run fn(channel) on the loop and wait for its result (or, if fn returns a Future,
        for that: an operation that completes in a broker callback)."""
        fut: Future = Future()

        def run() -> None:
            if fut.done() or self.ch is None:
                return
            try:
                result = fn(self.ch)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                if not fut.done():
                    fut.set_exception(exc)
                return
            if isinstance(result, Future):
                result.add_done_callback(lambda r: _chain(r, fut))
            elif not fut.done():
                fut.set_result(result)

        self.post(run, fut)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise _Lost(f"no answer from the connection thread in {timeout:.0f}s") from None
        finally:
            with self.lock:
                self.pending.discard(fut)

    def publish(self, entries: list[Entry]) -> Future:
        """Publish `entries` on the loop; a Future of the indices the broker refused."""
        fut: Future = Future()
        self.post(lambda: self.start_batch(entries, fut), fut)
        return fut

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the connection (or its loss past the budget: `fatal` is raised)."""
        if not self.ready.wait(timeout_s) and self.fatal is None:
            raise BrokerUnavailable(f"rabbitmq at {_redacted(self.url)}: not connected "
                                    f"after {timeout_s:.0f}s")
        if self.fatal is not None:
            raise self.fatal

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the connection and end the thread."""
        self.stop.set()
        conn = self.conn
        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(lambda: _close(conn))
            except Exception:  # noqa: BLE001 - its loop is closed already
                pass
        if self.is_alive():
            self.join(timeout_s)


def _chain(src: Future, dst: Future) -> None:
    if dst.done():
        return
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())


def _close(conn: pika.SelectConnection) -> None:
    if conn.is_closing or conn.is_closed:
        conn.ioloop.stop()
        return
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a connection still opening: stop its loop instead
        conn.ioloop.stop()
