"""RabbitMQ backend: the Backend implementation.

`RabbitMQBackend` holds what both sides share (the URL and its parameters, the controller's
blocking connection and its retries, the stream reader, the job's record) and takes each
side's methods from a mixin: `control.ControllerSide` (submit, ledger, progress, rows),
`deadletters.DeadLetterSide` (the DLQ) and `work.WorkerSide` (consume, complete, fail).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ttg.backends.backoff import Backoff
from ttg.backends.base import Backend, BrokerConfig, DeadLetter
from ttg.backends.rabbitmq.consumer import Out, WorkerLink
from ttg.backends.rabbitmq.control import ControllerSide
from ttg.backends.rabbitmq.deadletters import DeadLetterSide
from ttg.backends.rabbitmq.messages import (
    MARK,
    PERSISTENT,
    RETRYABLE,
    Names,
    PublishRejected,
    T,
    Topology,
    _is_auth,
    _Ledger,
    _Raw,
    _redacted,
    _tiers_from,
)
from ttg.backends.rabbitmq.streams import StreamReader
from ttg.backends.rabbitmq.work import WorkerSide
from ttg.backends.tls import client_context, refusal, unreachable_hint
from ttg.errors import BrokerAuthError, BrokerUnavailable, ConfigError, TTGError
from ttg.sweep import JobSpec

log = logging.getLogger("ttg.rabbitmq")


class RabbitMQBackend(ControllerSide, DeadLetterSide, WorkerSide, Backend):
    """See the package's docstring: the topology, the worker, the controller."""

    name = "rabbitmq"

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self.params = self._parameters()
        self.tiers_ms = _tiers_from(config.options)
        self._conn: BlockingConnection | None = None
        self._connected_once = False  # these credentials have been accepted by the broker
        self._ch: BlockingChannel | None = None
        self._ledgers: dict[str, _Ledger] = {}
        self._recs: dict[str, dict] = {}
        self._tails: dict[str, StreamReader] = {}
        self._dlq_cache: dict[str, tuple[int, list[DeadLetter]]] = {}
        # worker state
        self.worker_id = "controller"
        self.spec: JobSpec | None = None
        self.names = Names("-")
        self.topology = Topology(self.tiers_ms, 4)
        self.io: WorkerLink | None = None
        self._held: deque[_Raw] = deque()
        self._completed: set[int] = set()
        self._handled: set[tuple[int, int]] = set()
        self._acked: set[tuple[int, int]] = set()
        self._isolated = False
        self._open_out: Out | None = None
        self._unsettled: deque[Out] = deque()
        self._ewma_task_s: float | None = None

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
        if parts.scheme == "amqps":  # verify the node's certificate and name (backends/tls.py)
            params.ssl_options = pika.SSLOptions(client_context(self.config.ca_file),
                                                 server_hostname=params.host)
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
        backoff = Backoff(budget)
        while True:
            try:
                conn = BlockingConnection(self.params)
                self._connected_once = True
                return conn
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth(exc):
                    # refused credentials that worked before: a node that has just restarted
                    # opens its listener before its vhosts run ("vhost ... is not running");
                    # transient within the budget, an auth error after it or on a first try
                    if not self._connected_once or backoff.remaining() <= 0:
                        raise self.auth_error(exc) from None
                elif not isinstance(exc, RETRYABLE):
                    raise
                tls = refusal(exc, f"rabbitmq at {_redacted(self.config.url)}",
                              self.config.ca_file)
                if tls is not None:
                    raise tls from None
                log.warning("broker unavailable (%s), retrying", exc.__class__.__name__)
                if not backoff.wait():
                    raise BrokerUnavailable(
                        f"rabbitmq at {_redacted(self.config.url)} unreachable after "
                        f"{budget:.0f}s: {exc.__class__.__name__}: {exc}"
                        f"{unreachable_hint(self.config.url)}") from None

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
        conn, self._conn, self._ch = self._conn, None, None
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
        backoff = Backoff(self.config.retry_budget_s)
        while True:
            try:
                # a reconnect may use what is left of the budget: a broker that restarts
                # takes longer than connect_timeout_s to boot on a busy machine
                return fn(self._channel(max(0.1, backoff.remaining())))
            except (pex.NackError, pex.UnroutableError) as exc:
                log.warning("%s: publish refused (%s), retrying", what, exc)
                if not backoff.wait():
                    raise PublishRejected(f"{what}: the broker refused the publish: {exc}") \
                        from None
            except (TTGError, pex.ChannelClosedByBroker) as exc:
                if not isinstance(exc, pex.ChannelClosedByBroker):
                    raise
                self._ch = None
                # 404 "down or inaccessible": a queue still recovering after a restart;
                # 403 (access refused: this user may not) never passes with time
                transient = (exc.reply_code not in (403, 404)
                             or "down or inaccessible" in str(exc))
                if not transient:
                    raise
                log.warning("%s: channel closed by the broker: %s", what, exc)
                if not backoff.wait():
                    raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_auth(exc):
                    raise self.auth_error(exc) from None
                if not isinstance(exc, RETRYABLE):
                    raise
                self._reset()  # the next try opens a new connection
                log.warning("%s failed (%s), reconnecting", what, exc.__class__.__name__)
                if not backoff.wait():
                    raise BrokerUnavailable(
                        f"rabbitmq at {_redacted(self.config.url)}: {what} failed for "
                        f"{self.config.retry_budget_s:.0f}s: {exc}") from None

    def check(self) -> None:
        self._channel()

    def close(self) -> None:
        if self.io is not None:
            if not self.io.fatal and self._unsettled:
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - unacked chunks are redelivered
                    log.warning("could not write the last results at exit: %s", exc)
            self.io.close()
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

    def _mark(self, q: str) -> Callable[[str], None]:
        """A function that publishes a marker record `mark` to stream `q` (confirmed)."""
        return lambda mark: self._ctl(lambda ch: self._publish(ch, q, b"", {MARK: mark}),
                                      f"mark {q}")

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

    def _reader(self, q: str) -> StreamReader:
        """A reader of stream `q` (its own connection; reconnects get the retry budget)."""
        return StreamReader(q, lambda: self.connect(self.config.retry_budget_s),
                            self._mark(q), self.config.retry_budget_s)

    def _read_stream(self, q: str, start: int | str) -> Iterator[tuple[int, dict, bytes]]:
        """Every record of stream `q` from `start` up to now: (offset, headers, body)."""
        reader = self._reader(q)
        try:
            yield from reader.read(start)
        finally:
            reader.close()

    def _stream_records(self, q: str, start: int | str = "first"
                        ) -> Iterator[tuple[int, dict, bytes]]:
        """`_read_stream` with reconnects: resumes after the last offset seen."""
        pos: int | str = start
        backoff = Backoff(self.config.retry_budget_s)
        if self._count(q) is None:
            return  # no such stream: nothing to read
        while True:
            try:
                for offset, headers, body in self._read_stream(q, pos):
                    pos = offset + 1
                    yield offset, headers, body
                return
            except (pex.ChannelClosedByBroker, *RETRYABLE) as exc:
                if (isinstance(exc, pex.ChannelClosedByBroker) and exc.reply_code == 404
                        and "down or inaccessible" not in str(exc)):
                    return  # no such stream: nothing to read
                self._reset()
                if not backoff.wait():
                    raise BrokerUnavailable(f"reading {q}: {exc}") from None

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

