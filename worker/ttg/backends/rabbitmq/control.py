"""RabbitMQ backend: the controller side (submit, the results ledger, progress, rows).

Submits with PUBLISH_WINDOW publishes unconfirmed at a time (confirmed in batches, refused
ones published again) on a `Link`; reads the streams to a marker it publishes itself (a
stream has no "end"), so reads are exact; the results stream is tailed by one long-lived
consumer between polls (`StreamReader`). Rows are taken from their quorum queue with basic.get and
acked once they are durable in runs/<id>/.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from ttg.backends.backoff import Backoff
from ttg.backends.base import Progress
from ttg.backends.rabbitmq.link import Entry, Link
from ttg.backends.rabbitmq.management import broker_memory_bytes
from ttg.backends.rabbitmq.messages import (
    PUBLISH_BATCH,
    PUBLISH_WINDOW,
    RETRYABLE,
    Names,
    PublishRejected,
    _event,
    _header_int,
    _Ledger,
    _Lost,
)
from ttg.errors import BrokerUnavailable, JobMismatch
from ttg.partial import Partial, decode_result
from ttg.sweep import JobSpec

log = logging.getLogger("ttg.rabbitmq")


class ControllerSide:
    """Mixin of `RabbitMQBackend`: see the module's docstring."""

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

    def _publish_many(self, items: Iterator[Entry], what: str) -> int:
        """Publish with confirms, PUBLISH_WINDOW unconfirmed at a time in batches of
        PUBLISH_BATCH, on a `Link` of its own (its thread, its connection, reconnecting within
        the retry budget) instead of a round trip per message. Refused (nacked or returned)
        publishes are published again until the retry budget is spent (PublishRejected);
        those whose confirm was lost with the connection are published again on the next
        one (a duplicate task only costs a redundant execution)."""
        link = Link(self.params, self.config.url, self.config.retry_budget_s, [],
                    self.auth_error, name="amqp-publish", accepted=self._connected_once)
        link.start()
        try:
            return self._publish_window(link, iter(items), what)
        finally:
            link.close()

    def _publish_window(self, link: Link, source: Iterator[Entry], what: str) -> int:
        todo: deque[Entry] = deque()
        inflight: deque[tuple[list[Entry], Future]] = deque()
        backoff = Backoff(self.config.retry_budget_s)
        sent = 0
        while True:
            while len(inflight) * PUBLISH_BATCH < PUBLISH_WINDOW:
                part = [todo.popleft() for _ in range(min(len(todo), PUBLISH_BATCH))]
                part += [x for _, x in zip(range(PUBLISH_BATCH - len(part)), source,
                                           strict=False)]
                if not part:
                    break
                link.wait_ready(self.config.retry_budget_s + 5)
                inflight.append((part, link.publish(part)))
            if not inflight:
                return sent
            part, fut = inflight.popleft()
            try:
                failed = fut.result(timeout=max(backoff.remaining(), 1.0))
            except FutureTimeout:
                raise BrokerUnavailable(f"{what}: no publisher confirm for "
                                        f"{self.config.retry_budget_s:.0f}s") from None
            except _Lost as exc:  # the link reconnects (or gives up: `fatal`)
                log.info("%s: %s: publishing %d again", what, exc, len(part))
                todo.extend(part)
                continue
            sent += len(part) - len(failed)
            if not failed:
                backoff.reset()
                continue
            log.warning("%s: %d publish(es) refused, publishing them again", what,
                        len(failed))
            if not backoff.wait():
                raise PublishRejected(f"{what}: the broker refused {len(failed)} "
                                      "publish(es) past the retry budget")
            todo.extend(part[i] for i in failed)
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
        return broker_memory_bytes(self.params, self.config.options)

    def _tail_records(self, run_id: str, start: int | str) -> list[tuple[int, dict, bytes]]:
        q = Names(run_id).results
        if self._count(q) is None:
            return []
        tail = self._tails.get(run_id)
        if tail is None:
            tail = self._tails[run_id] = self._reader(q)
        backoff = Backoff(self.config.retry_budget_s)
        while True:
            try:
                return list(tail.read(start))
            except (pex.ChannelClosedByBroker, *RETRYABLE) as exc:
                tail.close()
                if not backoff.wait():
                    raise BrokerUnavailable(f"reading {q}: {exc}") from None

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
        spec = self.submitted_spec(run_id)
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
        spec = self.submitted_spec(run_id)
        if self._ready(run_id) > 0:
            return []
        missing = self._not_done_nor_dead(spec)
        if missing and self._ready(run_id) == 0:
            self._enqueue(spec, missing)
            log.warning("reconcile re-enqueued %d chunk(s): %s", len(missing), missing[:20])
            return missing
        return []

