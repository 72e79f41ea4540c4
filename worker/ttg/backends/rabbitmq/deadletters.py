"""RabbitMQ backend: the dead-letter queue, read and replayed (controller side).

The DLQ is a quorum queue: read with basic.get on a channel of its own and handed back
unacked (the channel is closed), so reading it changes nothing; `replay_dead` publishes a
fresh task for each chosen dead letter and acks it. Two kinds of record are in it: the
worker's (`k: dead`: max attempts, malformed message, lost its worker too often) and the
broker's (a task message with its `x-death` history: the delivery limit).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

import pika.exceptions as pex
from pika.adapters.blocking_connection import BlockingChannel

from ttg.backends.base import DeadLetter
from ttg.backends.rabbitmq.messages import Names, _event, _int_or


class DeadLetterSide:
    """Mixin of `RabbitMQBackend`: see the module's docstring."""

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

    def replay_dead(self, run_id: str, chunks: list[int] | None = None) -> list[int]:
        spec = self.submitted_spec(run_id)
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
