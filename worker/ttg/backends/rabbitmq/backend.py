"""RabbitMQ backend: the Backend implementation (controller and worker sides)."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import queue
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ttg.backends.base import Backend, BrokerConfig, DeadLetter, Delivery, Progress
from ttg.backends.rabbitmq.connection import (
    _Batch,
    _Confirms,
    _IOThread,
    _Out,
    _Tail,
)
from ttg.backends.rabbitmq.messages import (
    MARK,
    PERSISTENT,
    PUBLISH_BATCH,
    PUBLISH_WINDOW,
    RETRYABLE,
    MalformedBody,
    Names,
    PublishRejected,
    T,
    Topology,
    _discard,
    _event,
    _header_int,
    _int_or,
    _is_auth,
    _Ledger,
    _Raw,
    _redacted,
    _tiers_from,
    parse_task_body,
)
from ttg.errors import BrokerAuthError, BrokerUnavailable, ConfigError, JobMismatch, TTGError
from ttg.partial import Partial, decode_result, encode_result
from ttg.sweep import JobSpec

log = logging.getLogger("ttg.rabbitmq")

class RabbitMQBackend(Backend):
    name = "rabbitmq"

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self.params = self._parameters()
        self.tiers_ms = _tiers_from(config.options)
        self._conn: BlockingConnection | None = None
        self._connected_once = False  # these credentials have been accepted by the broker
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
        """A new connection; bounded retries while the broker is not up: for budget_s, or
        connect_timeout_s for a first connection (a broker that is not there at all). A
        reconnect after a lost connection passes the retry budget (retry_budget_s)."""
        budget = self.config.connect_timeout_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        delay = 0.1
        while True:
            try:
                conn = BlockingConnection(self.params)
                self._connected_once = True
                return conn
            except Exception as exc:  # noqa: BLE001 - classified below
                remaining = deadline - time.monotonic()
                if _is_auth(exc):
                    # refused credentials that worked before: a node that has just restarted
                    # opens its listener before its vhosts run ("vhost ... is not running");
                    # transient within the budget, an auth error after it or on a first try
                    if not self._connected_once or remaining <= 0:
                        raise self.auth_error(exc) from None
                elif not isinstance(exc, RETRYABLE):
                    raise
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"rabbitmq at {_redacted(self.config.url)} unreachable after "
                        f"{budget:.0f}s: {exc.__class__.__name__}: {exc}") from None
                log.warning("broker unavailable, retrying in %.1fs: %s",
                            min(delay, remaining), exc.__class__.__name__)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 2.0)

    def _channel(self, budget_s: float | None = None) -> BlockingChannel:
        """The controller-side channel, (re)connecting within budget_s (connect_timeout_s
        by default)."""
        if self._conn is None or not self._conn.is_open:
            self._conn = self.connect(budget_s)
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
                # a reconnect may use what is left of the budget: a broker that restarts
                # takes longer than connect_timeout_s to boot on a busy machine
                return fn(self._channel(max(0.1, deadline - time.monotonic())))
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
        conn = self.connect(self.config.retry_budget_s)
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
            conn = self.connect(self.config.retry_budget_s)
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
