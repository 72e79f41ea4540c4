"""RabbitMQ backend: readers of streams: up to now (`StreamReader`: the controller's), and
from the first record on, blocking for new ones (`wait_stream`: a worker waiting for the
job)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from ttg.backends.rabbitmq.messages import MARK, RETRYABLE, _discard, _header_int
from ttg.errors import BrokerUnavailable

log = logging.getLogger("ttg.rabbitmq")


class StreamReader:
    """A consumer of one stream, read up to a fresh marker on demand.

    A stream has no end: `read` publishes a unique marker (confirmed) and reads until it comes
    back, so everything confirmed before the read is seen. The controller keeps one reader of
    the results stream open between its polls (several a second: one consumer that stays
    open, never cancelled, see `_discard`, instead of a connection per poll); other reads
    use one reader each and close it.
    """

    def __init__(self, q: str, connect: Callable[[], BlockingConnection],
                 mark: Callable[[str], None], budget_s: float) -> None:
        self.q = q
        self.connect = connect
        self.mark = mark  # publishes a marker record (confirmed) to the stream
        self.budget_s = budget_s
        self.conn: BlockingConnection | None = None
        self.buffer: deque[tuple[int, dict, bytes]] = deque()
        self.last_tag = 0

    def close(self) -> None:
        conn, self.conn = self.conn, None
        self.buffer.clear()
        if conn is not None:
            _discard(conn)

    def _open(self, start: int | str) -> None:
        self.conn = self.connect()
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

    def read(self, start: int | str) -> Iterator[tuple[int, dict, bytes]]:
        """Every record from `start` (the caller's next offset) up to now: (offset, headers,
        body). BrokerUnavailable when no record comes for the budget."""
        if self.conn is None or not self.conn.is_open:
            self.close()
            self._open(start)
        mark = uuid.uuid4().hex
        self.mark(mark)
        deadline = time.monotonic() + self.budget_s
        assert self.conn is not None
        while True:
            if self.buffer:
                deadline = time.monotonic() + self.budget_s  # still coming
            while self.buffer:
                offset, headers, body = self.buffer.popleft()
                if isinstance(start, int) and offset < start:
                    continue
                if MARK in headers:
                    if headers[MARK] == mark:
                        if self.last_tag:
                            self.ch.basic_ack(self.last_tag, multiple=True)
                            self.last_tag = 0
                        return
                    continue
                yield offset, headers, body
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"reading {self.q}: the marker did not come back")
            self.conn.process_data_events(time_limit=0.2)




def wait_stream(connect: Callable[[], BlockingConnection], q: str,
                stop_requested: Callable[[], bool]) -> Iterator[tuple[int, dict, bytes]]:
    """Records of stream `q` from the first, blocking for new ones (ends only when
    `stop_requested()`): how a worker that starts before the submission waits for the job."""
    pos: int | str = "first"
    while True:
        conn = connect()
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=100)
            for method, props, body in ch.consume(q, arguments={"x-stream-offset": pos},
                                                  inactivity_timeout=1.0):
                if method is None:
                    if stop_requested():
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
