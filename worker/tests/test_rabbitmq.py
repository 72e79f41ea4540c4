"""RabbitMQ-specific behaviour, against real nodes of our own (never the shared 5672).

Workers are real `python -m ttg.cli work` processes; the controller side is a backend object
in the test process. Retry tiers are shortened through `options["retry_tiers_ms"]` on the
submitting backend: the tiers are recorded with the job, so workers use them too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from brokers import RabbitNode, free_port
from conftest import Env, spec, wait_for

from ttg.backends.base import BrokerConfig
from ttg.backends.rabbitmq import Names, PublishRejected, RabbitMQBackend
from ttg.controller import aggregate, run_sweep, wait
from ttg.errors import BrokerAuthError, BrokerUnavailable, JobMismatch
from ttg.partial import Partial
from ttg.sweep import reference_expected_sum

FAST_TIERS = {"retry_tiers_ms": [200, 400]}


@pytest.fixture
def rmq(tmp_path: Path) -> Iterator[Env]:
    from conftest import _env

    yield from _env("rabbitmq", tmp_path)


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[Env]:
    """A node of this test's own (it will be restarted)."""
    node = RabbitNode(tmp_path / "own-rabbit")
    env = Env("rabbitmq", node, tmp_path)
    try:
        yield env
    finally:
        env.stop_all()
        node.stop()


def channel(env: Env) -> pika.adapters.blocking_connection.BlockingChannel:
    params = pika.URLParameters(env.broker.url_with_password)
    return pika.BlockingConnection(params).channel()


def exact(env: Env, run_id: str, params: int) -> dict:
    agg = aggregate(env.make(), run_id)
    return {"chunks": len(agg.seen), **agg.result(), "expected": reference_expected_sum(params)}


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.mark.timeout(60)
def test_sweep_exact_and_submit_idempotent(rmq: Env) -> None:
    ctl = rmq.make()
    rmq.fleet("r1", 3)  # the fleet starts before the job exists: it blocks on the job
    time.sleep(0.5)
    job = spec("r1", params=1000, chunk=50, task="reference", work_ms=1)
    summary = run_sweep(ctl, job, "local", rmq.tmp / "runs", timeout_s=45)
    assert summary["ok"], summary
    assert summary["result"]["sum"] == 500035.5
    assert summary["chunks_missing"] == 0 and summary["executions"] >= 20
    assert ctl.submit(job) is False  # same run, same job: nothing new
    with pytest.raises(JobMismatch):
        ctl.submit(spec("r1", params=2000, chunk=50))
    p = ctl.progress("r1")
    assert (p.done, p.dead, p.queued) == (20, 0, 0)
    assert exact(rmq, "r1", 1000)["sum"] == 500035.5  # the results read again, same answer
    assert finish(rmq.procs) == [0, 0, 0]


@pytest.mark.timeout(60)
def test_sigkill_mid_chunk_is_redelivered_and_counted_once(rmq: Env) -> None:
    ctl = rmq.make()
    job = spec("kill", params=400, chunk=20, task="slow", work_ms=2)
    ctl.submit(job)
    victim = rmq.worker("kill", 0, TTG_SLOW_PARAM="100", TTG_SLOW_S="30")
    # chunk 5 holds parameter 100: wait until the victim is inside it, then SIGKILL it
    wait_for(lambda: ctl.progress("kill").done >= 5, timeout=30, what="chunks 0-4 done")
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    rmq.fleet("kill", 2, TTG_SLOW_PARAM="100", TTG_SLOW_S="0")
    p = wait(ctl, "kill", timeout_s=45, stall_s=10)
    assert p.finished and p.dead == 0
    r = exact(rmq, "kill", 400)
    assert r["chunks"] == 20 and r["count"] == 400 and r["sum"] == r["expected"]
    assert p.reclaimed >= 1  # chunk 5 (and its prefetched neighbours) came back


@pytest.mark.timeout(60)
def test_kill_between_write_and_ack_counts_once(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("wack", params=300, chunk=10, task="reference", work_ms=1))
    first = rmq.worker("wack", 0, TTG_EXIT_AFTER_FIRST_WRITE="1")
    assert first.wait(timeout=30) == 137  # died after its first confirmed result
    rmq.fleet("wack", 2)
    p = wait(ctl, "wack", timeout_s=45, stall_s=10)
    assert p.finished and p.duplicates >= 1  # the result was written twice...
    r = exact(rmq, "wack", 300)
    assert r["chunks"] == 30 and r["sum"] == r["expected"]  # ...and counted once


@pytest.mark.timeout(90)
def test_poison_goes_through_the_retry_tiers_then_is_stored_as_failures(rmq: Env) -> None:
    ctl = rmq.make(options=FAST_TIERS)
    ctl.submit(spec("poison", params=200, chunk=10, task="poison", max_attempts=3, work_ms=0))
    w = rmq.worker("poison", 0, "--exit-when-done", TTG_POISON_PARAM="42")
    assert w.wait(timeout=40) == 0
    assert ctl.dead_letters("poison") == []  # a raising point is data, not a lost chunk
    p = ctl.progress("poison")
    assert (p.done, p.dead, p.retried) == (20, 0, 2)  # chunk 4 retried twice, then stored
    assert p.executions == 20 + 2  # every failed attempt is an execution
    text = Path(w.logfile).read_text()  # type: ignore[attr-defined]
    assert "stored with 1 failed point(s) after 3 attempts" in text
    assert "poisoned parameter 42" in text


@pytest.mark.timeout(120)
def test_crash_every_time_ends_in_dlq_after_the_delivery_limit_then_replay(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("crash", params=200, chunk=10, task="crash", max_attempts=3, work_ms=2))
    crashes = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # a supervisor: restart the worker when it dies
        w = rmq.worker("crash", 0, "--exit-when-done", TTG_CRASH_PARAM="77")
        code = w.wait(timeout=60)
        if code == 0:
            break
        assert code == 137
        crashes += 1
    assert crashes == 3  # max_attempts = 3: the broker dead-letters on the third loss
    dead = ctl.dead_letters("crash")
    assert [d.chunk for d in dead] == [7]
    assert "delivery limit" in dead[0].reason
    p = ctl.progress("crash")
    assert (p.done, p.dead) == (19, 1)
    out = rmq.ttg("dlq", "list", "--json", run_id="crash")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["chunk"] == 7
    out = rmq.ttg("dlq", "replay", run_id="crash")
    assert out.returncode == 0 and "replayed 1 chunk(s): [7]" in out.stdout
    assert ctl.dead_letters("crash") == []
    w = rmq.worker("crash", 1, "--exit-when-done", TTG_CRASH_PARAM="-1")  # the fixed task
    assert w.wait(timeout=30) == 0
    r = exact(rmq, "crash", 200)
    assert r["chunks"] == 20 and r["sum"] == r["expected"]


@pytest.mark.timeout(60)
def test_chunk_longer_than_two_heartbeats_is_not_redelivered(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("hb", params=40, chunk=10, task="slow", work_ms=0))
    url = rmq.broker.url + "?heartbeat=2"
    w = rmq.worker("hb", 0, "--exit-when-done", TTG_BROKER_URL=url, TTG_SLOW_PARAM="15",
                   TTG_SLOW_S="7")
    assert w.wait(timeout=45) == 0
    p = ctl.progress("hb")
    assert (p.done, p.executions, p.duplicates, p.reclaimed) == (4, 4, 0, 0)
    text = Path(w.logfile).read_text()  # type: ignore[attr-defined]
    assert "connection lost" not in text and "redelivered" not in text


@pytest.mark.timeout(120)
def test_broker_restart_mid_run_loses_nothing(own_node: Env) -> None:
    env = own_node
    ctl = env.make(retry_budget_s=60)
    # 60 chunks of 10 x 40 ms: ~12 s for 2 workers, so the kill lands mid-run even on a
    # loaded CI machine (at 5 ms the run once finished before the kill and nothing reconnected)
    ctl.submit(spec("rs", params=600, chunk=10, task="reference", work_ms=40))
    env.fleet("rs", 2)
    wait_for(lambda: ctl.progress("rs").done >= 10, timeout=30, what="some progress")
    before = ctl.progress("rs")
    assert not before.finished, "the run finished before the broker was killed"
    env.broker.restart()
    ctl = env.make(retry_budget_s=60)
    p = wait(ctl, "rs", timeout_s=90, stall_s=10)
    assert p.finished and p.dead == 0
    r = exact(env, "rs", 600)
    assert r["chunks"] == 60 and r["count"] == 600 and r["sum"] == r["expected"]
    assert finish(env.procs) == [0, 0]
    logs = "".join(Path(w.logfile).read_text() for w in env.procs)  # type: ignore[attr-defined]
    assert "reconnecting" in logs


@pytest.mark.timeout(60)
def test_publish_refused_is_retried_then_raised_and_nothing_acked(rmq: Env) -> None:
    ctl = rmq.make(options={"retry_tiers_ms": [60000]})
    ctl.submit(spec("nack", params=20, chunk=10, task="poison", max_attempts=3))
    n = Names("nack")
    # the retry tier refuses publishes (max-length 0, reject-publish; a quorum queue takes
    # one message over its limit, so it is filled first): the retry publish is nacked
    rmq.broker.ctl("set_policy", "-p", rmq.broker.vhost, "--apply-to", "queues", "full",
                   r"^ttg\.nack\.retry\.0$", '{"max-length": 0}')
    # a policy reaches the queue asynchronously (CI once published before it had)
    wait_for(lambda: "full" in rmq.broker.ctl("list_queues", "-p", rmq.broker.vhost,
                                              "name", "policy").split(n.tier(0), 1)[-1]
             .split("\n", 1)[0], timeout=20, what="the max-length policy on the retry tier")
    ch = channel(rmq)
    ch.confirm_delivery()
    ch.basic_publish("", n.tier(0), b'{"c": 1, "s": 10, "e": 20, "a": 2}', mandatory=True)
    with pytest.raises(pika.exceptions.NackError):  # the refusal, as a bare client sees it
        ch.basic_publish("", n.tier(0), b"{}", mandatory=True)
    ch.connection.close()
    worker = RabbitMQBackend(rmq.config(retry_budget_s=2))
    worker.start_consuming("nack", "in-test", None)
    d = worker.next_delivery(5)
    assert d is not None
    t0 = time.monotonic()
    with pytest.raises(PublishRejected):
        worker.fail(d, "ValueError: boom", 0.01)
    assert 1.5 < time.monotonic() - t0 < 10  # retried for the budget, then raised
    worker.close()  # nothing was acked: the broker gives both chunks back
    wait_for(lambda: ctl._count(n.tasks)[0] == 2, timeout=10, what="both chunks ready")
    assert ctl._count(n.tier(0))[0] == 1  # only the filler


@pytest.mark.timeout(60)
def test_malformed_messages_are_dead_lettered_with_a_reason(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("bad", params=100, chunk=10, task="reference", work_ms=0))
    ch = channel(rmq)
    ch.confirm_delivery()
    ch.basic_publish("", Names("bad").tasks, b"not json at all", mandatory=True)
    ch.basic_publish("", Names("bad").tasks, b'{"c": 999}', mandatory=True)
    ch.connection.close()
    w = rmq.worker("bad", 0, "--exit-when-done")
    assert w.wait(timeout=30) == 0
    dead = ctl.dead_letters("bad")
    reasons = {d.chunk: d.reason for d in dead}
    assert set(reasons) == {-1, 999}
    assert all(r.startswith("malformed message") for r in reasons.values())
    assert "outside" in reasons[999]
    r = exact(rmq, "bad", 100)
    assert r["chunks"] == 10 and r["sum"] == r["expected"]


@pytest.mark.timeout(30)
def test_wrong_password_is_one_clear_error(rmq: Env) -> None:
    bad = rmq.tmp / "wrong.pass"
    bad.write_text("not-the-password")
    t0 = time.monotonic()
    out = rmq.ttg("check", TTG_BROKER_PASSWORD_FILE=str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused user 'ttg'" in lines[0], out.stderr
    assert time.monotonic() - t0 < 10
    with pytest.raises(BrokerAuthError):
        RabbitMQBackend(BrokerConfig(url=rmq.broker.url, password="nope")).check()
    w = rmq.worker("any", 0, TTG_BROKER_PASSWORD_FILE=str(bad))
    assert w.wait(timeout=15) == 2


@pytest.mark.timeout(30)
def test_broker_not_up_is_bounded(tmp_path: Path) -> None:
    url = f"amqp://ttg@127.0.0.1:{free_port()}/ttg"
    backend = RabbitMQBackend(BrokerConfig(url=url, password="x", connect_timeout_s=1.5))
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        backend.check()
    assert 1.0 < time.monotonic() - t0 < 6
    out = subprocess.run([sys.executable, "-m", "ttg.cli", "check", "--backend", "rabbitmq",
                          "--broker-url", url, "--connect-timeout", "1"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and "unreachable" in out.stderr


@pytest.mark.timeout(30)
def test_results_are_first_write_wins(rmq: Env) -> None:
    """Two results for one chunk (a redelivered copy): the first is kept, both executed."""
    ctl = rmq.make()
    ctl.submit(spec("fw", params=20, chunk=10, task="reference"))
    worker = RabbitMQBackend(rmq.config())
    worker.start_consuming("fw", "in-test", None)
    a = worker.next_delivery(5)
    assert a is not None
    worker.complete(a, Partial.of([1.0]), {"task_s": 0.1})
    worker.complete(a, Partial.of([2.0]), {"task_s": 0.1})  # a duplicate write (no 2nd ack)
    worker.close()
    got = {c: p.sum for c, p, _m in ctl.results("fw")}
    assert got == {a.chunk: 1.0}
    p = ctl.progress("fw")
    assert (p.done, p.executions, p.duplicates) == (1, 2, 1)


# ---- batched publisher confirms ------------------------------------------------------------


class _Frame:
    def __init__(self, method: object) -> None:
        self.method = method


class _Props:
    def __init__(self, message_id: str) -> None:
        self.message_id = message_id


def test_confirm_tracking_multiple_nack_and_return() -> None:
    """`Confirms` settles publishes by sequence number: single and `multiple` acks, nacks,
    and a returned (unroutable) publish that the broker then acks counts as refused."""
    from ttg.backends.rabbitmq import Batch, Confirms

    conf = Confirms()  # no channel: feed it the broker's answers
    got: list[list[int]] = []
    batch = Batch(got.append)
    for i in range(6):
        conf.seq += 1
        conf.unconfirmed[conf.seq] = [batch, i, False]
        batch.remaining += 1
    batch.seal()
    conf.on_confirm(_Frame(pika.spec.Basic.Ack(delivery_tag=2, multiple=True)))  # 1, 2
    conf.on_confirm(_Frame(pika.spec.Basic.Nack(delivery_tag=3, multiple=False)))  # 3
    conf.on_return(None, None, _Props("5"), b"")  # 5 unroutable...
    conf.on_confirm(_Frame(pika.spec.Basic.Ack(delivery_tag=5, multiple=True)))  # ...4, 5
    assert got == []  # publish 6 is not settled yet: nothing decided
    conf.on_confirm(_Frame(pika.spec.Basic.Ack(delivery_tag=6, multiple=False)))
    assert got == [[2, 4]] and conf.unconfirmed == {}  # indices of publishes 3 and 5


def _refusing_sink(env: Env, q: str, limit: int) -> None:
    """A quorum queue that refuses publishes (reject-publish) once `limit` is reached; a
    quorum queue takes one message over its limit, so it is filled to refuse at once."""
    ch = channel(env)
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum",
                                                 "x-max-length": limit,
                                                 "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    for _ in range(limit + 1):
        ch.basic_publish("", q, b"filler", mandatory=True)
    ch.connection.close()


def _worker_writing_results_to(env: Env, run_id: str, sink: str, **kw: object
                               ) -> RabbitMQBackend:
    worker = RabbitMQBackend(env.config(prefetch=8, **kw))
    worker.start_consuming(run_id, "in-test", None)

    class Redirected(Names):
        @property
        def results(self) -> str:
            return sink

    worker.names = Redirected(run_id, worker.names.tiers)
    return worker


def _three_results_into_a_full_sink(rmq: Env, run_id: str, room: int, retry_budget_s: float
                                    ) -> tuple[RabbitMQBackend, RabbitMQBackend, list]:
    """A 4-chunk run; a worker completes 3 chunks (one batch: nothing waits) whose results go
    to a sink queue that refuses publishes (it holds `room` + 1 fillers).
    (controller, worker, the 3 deliveries)"""
    ctl = rmq.make()
    ctl.submit(spec(run_id, params=40, chunk=10))
    sink = f"ttg.{run_id}.sink"
    _refusing_sink(rmq, sink, room)
    worker = _worker_writing_results_to(rmq, run_id, sink, retry_budget_s=retry_budget_s)
    held = [worker.next_delivery(5) for _ in range(3)]
    assert all(d is not None for d in held)
    for d in held:
        worker.complete(d, Partial.of([1.0]), {"task_s": 0.0})  # type: ignore[arg-type]
    return ctl, worker, held


@pytest.mark.timeout(60)
def test_batched_results_refused_raise_and_nothing_is_acked(rmq: Env) -> None:
    ctl, worker, _ = _three_results_into_a_full_sink(rmq, "bnack", 0, retry_budget_s=2)
    t0 = time.monotonic()
    with pytest.raises(PublishRejected):
        worker.flush()  # refused, retried for the budget, then raised
    assert 1.5 < time.monotonic() - t0 < 10
    worker.close()
    # not one of the chunks was acked: all four are ready again
    wait_for(lambda: ctl._count(Names("bnack").tasks)[0] == 4, timeout=10,
             what="every chunk back in the queue")


@pytest.mark.timeout(60)
def test_batched_results_refused_then_accepted_are_acked_after_their_confirms(rmq: Env
                                                                                ) -> None:
    ctl, worker, held = _three_results_into_a_full_sink(rmq, "bretry", 3, retry_budget_s=20)
    sink = "ttg.bretry.sink"
    time.sleep(0.5)
    # refused so far: nothing acked (the 4th chunk is prefetched, so none is ready)
    assert ctl._count(Names("bretry").tasks)[0] == 0
    ch = channel(rmq)
    ch.queue_purge(sink)  # room again: the refused results are published again...
    ch.connection.close()
    worker.flush()  # ...confirmed, and only then their chunks acked
    worker.close()
    wait_for(lambda: ctl._count(Names("bretry").tasks)[0] == 1, timeout=10,
             what="only the unstarted chunk back in the queue")
    ch = channel(rmq)
    bodies = []
    while True:
        method, _props, body = ch.basic_get(sink, auto_ack=True)
        if method is None:
            break
        if body != b"filler":
            rec = json.loads(body)  # a batch of results is one record: a list
            bodies += rec if isinstance(rec, list) else [rec]
    ch.connection.close()
    assert sorted(b["chunk"] for b in bodies) == sorted(d.chunk for d in held)  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_events_report_the_reclaim_and_memory_is_best_effort(rmq: Env) -> None:
    ctl = rmq.make()
    ctl.submit(spec("ev", params=100, chunk=10, task="slow", work_ms=1))
    victim = rmq.worker("ev", 0, TTG_SLOW_PARAM="30", TTG_SLOW_S="30")
    wait_for(lambda: ctl.progress("ev").done >= 3, timeout=30, what="chunks 0-2 done")
    time.sleep(0.5)  # inside chunk 3
    killed = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    rmq.fleet("ev", 2, TTG_SLOW_PARAM="30", TTG_SLOW_S="0")
    wait(ctl, "ev", timeout_s=45, stall_s=10)
    ev = [e for e in ctl.events("ev") if e["kind"] == "reclaimed"]
    assert 3 in {e["chunk"] for e in ev}
    assert all(killed <= e["ts"] <= time.time() and e["worker"] for e in ev)
    assert min(e["ts"] for e in ev) - killed < 5  # the broker requeues at once
    assert ctl.broker_memory_bytes() >= 0  # no management API here: 0, no error
    gone = RabbitMQBackend(BrokerConfig(url=rmq.broker.url, password="x",
                                        options={"management_url":
                                                 f"http://127.0.0.1:{free_port()}"}))
    assert gone.broker_memory_bytes() == 0
