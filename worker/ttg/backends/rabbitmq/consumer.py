"""RabbitMQ backend: the worker's connection (`WorkerLink`): deliveries, acks, result batches.

A `Link` (its own thread, pika's asynchronous adapter) that also consumes the run's tasks
queue into `inbox` (read by the worker's main thread), keeps a presence consumer (the number
of live workers is the presence queue's consumer count), applies a new prefetch when the
worker's chunk time changes, and acks deliveries only once the results they produced are
confirmed (`take`: a batch of results published as one stream record).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pika
from pika.channel import Channel

from ttg.backends.rabbitmq.link import Entry, Link
from ttg.backends.rabbitmq.messages import Names, _Raw
from ttg.errors import TTGError


class Out:
    """A batch of the worker's results: filled by the main thread, taken (published) once
    by the link's thread when full, when the worker has nothing else in hand, or 20 ms after
    its first result (so results never wait behind a long chunk)."""

    __slots__ = ("entries", "rows", "tokens", "fut", "taken")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.rows: list[Entry] = []  # published with the results
        self.tokens: list[tuple[int, int]] = []
        self.fut: Future = Future()
        self.taken = False


class WorkerLink(Link):
    """The worker's connection: see the module's docstring."""

    REQUALIFY_S = 0.2
    PASSIVE = True  # the controller declared the run's queues; a worker may not (no configure)

    def __init__(self, params: pika.ConnectionParameters, url: str, budget_s: float,
                 queues: list[tuple[str, dict]], names: Names,
                 auth_error: Callable[[BaseException], TTGError], prefetch: int,
                 accepted: bool = False) -> None:
        super().__init__(params, url, budget_s, queues, auth_error, accepted=accepted)
        self.names = names
        self.inbox: queue.Queue[_Raw] = queue.Queue()
        self.want_consume = True
        self.want_prefetch = prefetch
        self.ctag: str | None = None
        self.unacked: set[int] = set()  # delivery tags of this channel not yet settled
        self.window: set[int] = set()  # ... of them, delivered to the current consumer
        self.qos: int | None = None  # the prefetch the current consumer was made with
        self.before_ack: Callable[[], None] | None = None  # Backend.after_write

    # ---- the loop's thread --------------------------------------------------------------
    def on_ready(self, ch: Channel) -> None:
        self.unacked, self.window, self.qos, self.ctag = set(), set(), None, None
        ch.basic_consume(self.names.presence, on_message_callback=lambda *a: None)
        if self.want_consume:
            self.consume(ch)
        self.later(self.REQUALIFY_S, self._tick)

    def on_lost(self) -> None:
        self.ctag = None

    def _tick(self) -> None:
        if self.ch is None:
            return
        self._requalify(self.ch)
        self.later(self.REQUALIFY_S, self._tick)

    def consume(self, ch: Channel) -> None:
        gen = self.gen
        if self.qos != self.want_prefetch:
            ch.basic_qos(prefetch_count=self.want_prefetch)
            self.qos = self.want_prefetch

        def on_message(_ch: Channel, method: Any, props: Any, body: bytes) -> None:
            self.unacked.add(method.delivery_tag)
            self.window.add(method.delivery_tag)
            self.inbox.put(_Raw(gen, method.delivery_tag, bool(method.redelivered),
                                dict(props.headers or {}), body))

        self.window = set()
        self.ctag = ch.basic_consume(self.names.tasks, on_message_callback=on_message)

    def cancel(self, ch: Channel) -> Future:
        """Stop consuming tasks; resolved once the broker has confirmed (no delivery after)."""
        done: Future = Future()
        self.want_consume = False
        if self.ctag is None:
            done.set_result(None)
        else:
            ch.basic_cancel(self.ctag, callback=lambda _frame: done.set_result(None))
            self.ctag = None
        return done

    def resume(self, ch: Channel) -> None:
        self.want_consume = True
        if self.ctag is None:
            self.consume(ch)

    def _requalify(self, ch: Channel) -> None:
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
        """Ack, one `multiple` ack when the tags are the oldest unsettled."""
        ch = self.ch
        if ch is None:
            return
        tags = sorted(t for t in set(tags) if t in self.unacked)
        if not tags:
            return
        top = tags[-1]
        if sum(1 for t in self.unacked if t <= top) == len(tags):
            ch.basic_ack(top, multiple=True)
        else:
            for t in tags:
                ch.basic_ack(t)
        self.unacked.difference_update(tags)
        self.window.difference_update(tags)

    def nack_tag(self, gen: int, tag: int) -> None:
        if self.ch is not None and gen == self.gen and tag in self.unacked:
            self.ch.basic_nack(tag, requeue=True)
            self.unacked.discard(tag)
            self.window.discard(tag)

    def start_acked(self, entries: list[Entry], tokens: list[tuple[int, int]],
                    fut: Future, results: bool = False) -> None:
        """Publish `entries`; once all are confirmed ack `tokens` (those of this connection)
        and resolve `fut` with the refused indices (acking nothing if there are any).
        `results`: a batch of results (`before_ack` runs between their confirm and ack)."""
        gen = self.gen

        def then(failed: list[int]) -> None:
            if not failed and results and self.before_ack is not None:
                self.before_ack()
            if not failed and self.gen == gen:
                self.ack_tags([tag for g, tag in tokens if g == gen])

        self.start_batch(entries, fut, then)

    def take(self, out: Out) -> None:
        """Publish a batch of results, once."""
        with self.lock:
            if out.taken:
                return
            out.taken = True
        if len(out.entries) > 1:  # one stream record for the batch: one write, one confirm
            out.entries = [(out.entries[0][0], b"[" + b",".join(e[1] for e in out.entries)
                            + b"]", {"k": "results", "n": len(out.entries)})]
        out.entries += out.rows  # refused indices then count over results and rows alike
        out.rows = []
        self.start_acked(out.entries, out.tokens, out.fut, results=True)

    # ---- any thread ---------------------------------------------------------------------
    def publish_acked(self, entries: list[Entry], tokens: list[tuple[int, int]]) -> Future:
        fut: Future = Future()
        self.post(lambda: self.start_acked(entries, tokens, fut), fut)
        return fut

    def open_batch(self) -> Out:
        """A new result batch, tracked (failed if the connection is lost), taken by the
        link 20 ms from now if nothing has taken it before."""
        out = Out()
        self.post(lambda: self.later(0.02, lambda: self.take(out)), out.fut)
        return out

    def send(self, out: Out) -> None:
        """Have `out` published now."""
        self.post(lambda: self.take(out), out.fut)

    def add(self, out: Out | None, entry: Entry, rows: Entry | None,
            tokens: list[tuple[int, int]]) -> Out | None:
        """Add a result to `out` unless the link has taken it already; the batch it went
        into, or None when `out` is taken (the caller opens a new one)."""
        with self.lock:
            if out is None or out.taken or out.fut.done():
                return None
            out.entries.append(entry)
            if rows is not None:
                out.rows.append(rows)
            out.tokens += tokens
            return out
