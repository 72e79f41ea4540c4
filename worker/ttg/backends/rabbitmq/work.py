"""RabbitMQ backend: the worker side (consume, complete, fail, hand back).

The connection lives on its own thread (`consumer.WorkerLink`: heartbeats keep flowing
during a long chunk); deliveries reach the main thread through a queue.Queue; operations go
back with `call`/`post`. Results of consecutive chunks are batched (`Out`): a batch is
published as one stream record when it holds `batch_size()` results (about 20 ms of work),
when the worker has nothing else in hand, or 20 ms after its first result; the link acks the
batch's deliveries (one `multiple` ack when they are the oldest) only once that record is
confirmed. A refused or lost batch is published again, its chunks unacked until then.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from pika.channel import Channel

from ttg.backends import policy
from ttg.backends.backoff import Backoff
from ttg.backends.base import Delivery
from ttg.backends.rabbitmq.consumer import WorkerLink
from ttg.backends.rabbitmq.messages import (
    RETRYABLE,
    Held,
    MalformedBody,
    Names,
    PublishRejected,
    _header_int,
    _Raw,
    parse_task_body,
)
from ttg.backends.rabbitmq.streams import wait_stream
from ttg.errors import BrokerUnavailable, TTGError
from ttg.partial import Partial, encode_result
from ttg.sweep import JobSpec

log = logging.getLogger("ttg.rabbitmq")


class WorkerSide:
    """Mixin of `RabbitMQBackend`: see the module's docstring."""

    WAIT_FOR_RUN_S = 0.5  # how often a worker started before the submission looks for it

    def start_consuming(self, run_id: str, worker_id: str,
                        worker_index: int | None) -> JobSpec | None:
        self.worker_id = worker_id
        meta = Names(run_id).meta
        # The controller creates the run's queues: a worker's user may not (no configure
        # permission), so a worker started first waits for the job's stream to exist.
        while self._count(meta) is None:
            if self.stop_requested():
                return None
            time.sleep(self.WAIT_FOR_RUN_S)
        rec = None
        for _o, headers, body in wait_stream(
                lambda: self.connect(self.config.retry_budget_s), meta, self.stop_requested):
            if headers.get("k") == "spec":
                rec = json.loads(body)
                break
        if rec is None:  # stopped while waiting for the submission
            return None
        self.spec = self._adopt(rec)
        self._reset()  # the main-thread connection would miss heartbeats during a chunk
        self.io = WorkerLink(self.params, self.config.url, self.config.retry_budget_s,
                             self.topology.queues(self.names), self.names, self.auth_error,
                             self.prefetch(), accepted=self._connected_once)
        self.io.before_ack = self.after_write
        self.io.start()
        self.io.wait_ready(self.config.connect_timeout_s + 5)
        return self.spec

    def _io(self) -> WorkerLink:
        assert self.io is not None, "start_consuming first"
        if self.io.fatal:
            raise self.io.fatal
        return self.io

    def _op(self, fn: Callable[[Channel], object], what: str) -> None:
        """fn(channel) on the link's thread; waits through reconnects (retry_budget_s)."""
        io = self._io()
        backoff = Backoff(self.config.retry_budget_s)
        while True:
            io.ready.wait(backoff.remaining())
            if io.fatal:
                raise io.fatal
            try:
                io.call(fn, timeout=max(backoff.remaining(), 1.0))
                return
            except RETRYABLE as exc:
                log.info("%s: %s: waiting for the reconnect", what, exc.__class__.__name__)
            if not backoff.wait():
                raise BrokerUnavailable(f"{what}: broker unavailable for "
                                        f"{self.config.retry_budget_s:.0f}s")

    # Results of consecutive short chunks are published together and confirmed together;
    # their deliveries are acked (one `multiple` ack) by the connection's thread once every
    # result of the batch is confirmed, never before. One batch is in flight while the
    # next one runs; `flush()` waits for both.

    def _confirmed(self, entries: list[tuple[str, bytes, dict]],
                   tokens: list[tuple[int, int]], what: str, fut: Future | None = None,
                   ) -> None:
        """Publish `entries` (or await `fut`, their batch already started) until every one
        is confirmed, then ack `tokens`. Refused publishes are published again until the
        retry budget is spent (PublishRejected); publishes whose confirm was lost with the
        connection are published again once reconnected (BrokerUnavailable past the
        budget). Nothing is acked unless all of `entries` are confirmed."""
        io = self._io()
        backoff = Backoff(self.config.retry_budget_s)
        todo = entries
        while True:
            try:
                if fut is None:
                    io.ready.wait(backoff.remaining())
                    if io.fatal:
                        raise io.fatal
                    fut = io.publish_acked(todo, tokens)
                failed = fut.result(timeout=max(backoff.remaining(), 1.0))
                if not failed:
                    return
                todo = [todo[i] for i in failed]
                log.warning("%s: %d publish(es) refused: retrying", what, len(todo))
                if not backoff.wait():
                    raise PublishRejected(f"{what}: the broker refused {len(todo)} publish(es) "
                                          f"for {self.config.retry_budget_s:.0f}s")
            except FutureTimeout:
                raise BrokerUnavailable(f"{what}: no publisher confirm for "
                                        f"{self.config.retry_budget_s:.0f}s") from None
            except RETRYABLE as exc:
                log.info("%s: %s: waiting for the reconnect", what, exc.__class__.__name__)
                if not backoff.wait():
                    raise BrokerUnavailable(f"{what}: broker unavailable for "
                                            f"{self.config.retry_budget_s:.0f}s") from None
            fut = None

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
        out = io.add(self._open_out, entry, rows, tokens)
        if out is None:
            out = io.open_batch()
            io.add(out, entry, rows, tokens)
            self._open_out = out
            self._unsettled.append(out)
        if send_now or len(out.entries) >= self.batch_size():
            self._send_open()
        while len(self._unsettled) > 16:  # bounded (the prefetch bounds it already)
            self._settle_one()

    def _send_open(self) -> None:
        """Have the open batch published now (its acks follow its confirms, on the
        connection's thread: nobody waits here)."""
        out, self._open_out = self._open_out, None
        if out is not None:
            self._io().send(out)

    def _reap(self) -> None:
        """Settle the batches already confirmed (or refused, or lost: published again)."""
        while self._unsettled and self._unsettled[0].fut.done():
            self._settle_one()

    def _settle_one(self) -> None:
        """Wait for the oldest batch: confirmed and acked, or published again."""
        out = self._unsettled.popleft()
        if out is self._open_out:
            self._open_out = None
            self._io().send(out)
        self._confirmed(out.entries, out.tokens, "write the results", fut=out.fut)

    def flush(self) -> None:
        if self.io is None:
            return
        while self._unsettled:
            self._settle_one()

    def _ack(self, d: Delivery) -> None:
        tokens = self._token(d.token.key)
        if not tokens:
            return
        if d.token.gen != self._io().gen:
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
        return Delivery(self.spec.run_id, chunk, start, end, attempt,
                        token=Held(raw.gen, raw.tag, lost, data),
                        reclaimed=lost > 0 or raw.redelivered, last_error=data.get("err"))

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
            lost = d.token.lost
            if d.reclaimed and (d.chunk in self._completed
                                or (d.chunk, d.attempt) in self._handled):
                log.info("redelivered copy of a chunk handled here: acked, not run",
                         extra={"chunk": d.chunk})
                self.flush()  # its result is confirmed before the copy is acked
                self._ack(d)
                continue
            reason = policy.lost_too_often(self.spec, d.attempt, lost, d.last_error)
            if reason is not None:
                log.error("dead-lettering: %s", reason, extra={"chunk": d.chunk})
                self._dead_letter(d.chunk, reason, d.attempt + lost, token=d.token.key)
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
                io.call(lambda _ch, g=gen, t=tag: io.nack_tag(g, t), timeout=10)

    def _cancel(self, what: str) -> None:
        self._op(self._io().cancel, what)

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
                 d.token.lost, extra={"chunk": d.chunk})

    def _resume(self) -> None:
        if not self._isolated:
            return
        self.flush()  # the suspect's result is confirmed and acked before consuming again
        self._isolated = False
        self._op(self._io().resume, "resume consuming")

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
        io = self._io()
        if self.config.prefetch == 0:
            io.want_prefetch = self.prefetch()
        self._add_result(entry, self._token(d.token.key),
                         send_now=self._isolated or not (self._held or io.inbox.qsize()),
                         rows=rows_entry)
        if self._isolated:
            self._resume()
        return new

    def fail(self, delivery: Delivery, error: str, task_s: float = 0.0) -> str:
        assert self.spec is not None
        d = delivery
        self.flush()
        lost = d.token.lost
        dead = policy.exhausted(self.spec, d.attempt)
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
        tokens = self._token(d.token.key) if d.token.gen == self._io().gen else []
        self._confirmed(entries, tokens, "record the failure")
        self._handled.add((d.chunk, d.attempt))
        self._resume()
        return outcome

    def release(self, delivery: Delivery) -> None:
        held = delivery.token
        raw = _Raw(held.gen, held.tag, delivery.reclaimed, {"chunk": delivery.chunk},
                   json.dumps({**held.body, "lost": held.lost}).encode())
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

