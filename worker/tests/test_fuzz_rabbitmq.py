"""Hostile task messages on a real RabbitMQ node: each is dead-lettered with its reason and
the worker finishes the run (the parser's properties are in test_fuzz_records.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from conftest import Env, spec

from ttg.backends.rabbitmq import Names
from ttg.controller import aggregate
from ttg.sweep import reference_expected_sum

# Each was a crash (uncaught exception in the worker's parser) or a silent misreading
# before; the first two are the fuzzer's finds in the RabbitMQ body parser.
HOSTILE = [
    b'{"c": 1e400}',                       # inf: int() raised OverflowError (a crash loop)
    b'{"c": ' * 3000 + b"1" + b"}" * 3000,  # nested too deep: RecursionError
    b'{"c": true}',                        # a bool taken as chunk 1
    b'{"c": 1.5}',                         # a float taken as chunk 1
    '{"c": "²"}'.encode(),
    b'{"c": 2, "a": 0}',                    # attempt outside 1..max_attempts
    b'{"c": 3, "lost": [1]}',
    b'{"c": 4, "s": 40}',                   # bounds half given
    b"\xff\xfe not utf-8",
    b"[1, 2]",
]


@pytest.fixture
def rmq(tmp_path: Path) -> Iterator[Env]:
    from conftest import _env

    yield from _env("rabbitmq", tmp_path)


@pytest.mark.timeout(120)
def test_hostile_task_messages_are_dead_lettered_and_the_run_completes(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("hostile", params=100, chunk=10, work_ms=0, workers=1))
    ch = pika.BlockingConnection(pika.URLParameters(rmq.broker.url_with_password)).channel()
    ch.confirm_delivery()
    for body in HOSTILE:
        ch.basic_publish("", Names("hostile").tasks, body, mandatory=True)
    ch.connection.close()
    w = rmq.worker("hostile", 0, "--exit-when-done")
    assert w.wait(timeout=60) == 0, open(w.logfile).read()[-2000:]  # type: ignore[attr-defined]
    records = list(ctl._read_dlq("hostile"))
    assert len(records) == len(HOSTILE)
    assert all(d.reason.startswith("malformed message") for d in records)
    agg = aggregate(rmq.make(), "hostile")
    assert len(agg.seen) == 10 and agg.result()["sum"] == reference_expected_sum(100)
    assert json.loads(json.dumps([d.to_dict() for d in records]))  # all readable back
