"""Redis Streams specifics: leases, reclaim, dead letters, malformed entries, broker loss."""

from __future__ import annotations

import json
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import spec, wait_for

from ttg.backends.redis_store import GROUP, Keys
from ttg.partial import Partial
from ttg.sweep import reference_expected_sum

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(tmp_path):
    from brokers import RedisServer
    from conftest import Env

    server = RedisServer(tmp_path / "redis")
    e = Env("redis", server, tmp_path)
    yield e
    e.stop_all()
    server.stop()


def test_first_write_wins_and_ack_is_atomic(env):
    a, b = env.make(), env.make()
    a.submit(spec("fww", params=20, chunk=10))
    a.start_consuming("fww", "a", None)
    b.start_consuming("fww", "b", None)
    d = a.next_delivery(1)
    a.complete(d, Partial(10, 1.0, 0.0, 1.0), {"worker": "a"})
    a.flush()
    # a late duplicate (e.g. a reclaimed copy finishing) never overwrites the first result
    b.complete(d, Partial(10, 99.0, 0.0, 99.0), {"worker": "b"})
    b.flush()
    results = {c: (p, m) for c, p, m in a.results("fww")}
    assert results[d.chunk][0].sum == 1.0 and results[d.chunk][1]["worker"] == "a"
    r = env.broker.client()
    k = Keys("fww")
    assert r.xpending(k.tasks, GROUP)["pending"] == 0  # acked together with the write
    assert int(r.hget(k.stats, "duplicates")) == 1
    a.close()
    b.close()


def test_dead_workers_entries_are_all_reclaimed_by_a_full_scan(env):
    """XAUTOCLAIM must walk the whole pending list, not stop after its first page."""
    b = env.make(min_idle_ms=200)
    b.submit(spec("scan", params=500, chunk=10))  # 50 chunks
    r = env.broker.client()
    k = Keys("scan")
    r.xreadgroup(GROUP, "ghost", {k.tasks: ">"}, count=50)  # a consumer that then dies
    assert r.xpending(k.tasks, GROUP)["pending"] == 50
    time.sleep(0.3)
    w = env.worker("scan", 0, "--exit-when-done", TTG_MIN_IDLE_MS="200")
    assert w.wait(timeout=60) == 0
    p = b.progress("scan")
    assert p.done == 50 and p.reclaimed == 50
    b.close()


def test_slow_chunk_is_not_stolen_from_a_live_worker(env):
    """A chunk taking 5x the reclaim idle time stays with its worker: its lease is renewed."""
    b = env.make()
    b.submit(spec("slow", params=40, chunk=10, task="slow", workers=2))
    extra = {"TTG_SLOW_PARAM": "0", "TTG_SLOW_S": "3", "TTG_MIN_IDLE_MS": "600"}
    fleet = env.fleet("slow", 2, **extra)
    assert [p.wait(timeout=60) for p in fleet] == [0, 0]
    p = b.progress("slow")
    assert p.done == 4 and p.executions == 4 and p.reclaimed == 0
    b.close()


def test_restarted_worker_takes_back_its_own_pending_chunk(env):
    b = env.make()
    b.submit(spec("own", params=20, chunk=10, work_ms=100))  # 1 s chunks
    w = env.worker("own", 0, TTG_MIN_IDLE_MS="60000")  # nobody else would reclaim for 60 s
    wait_for(lambda: b.progress("own").in_flight >= 1, what="a chunk in flight")
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=10)
    t0 = time.monotonic()
    assert env.worker("own", 0, "--exit-when-done", TTG_MIN_IDLE_MS="60000").wait(60) == 0
    assert time.monotonic() - t0 < 30  # well before the 60 s idle time
    p = b.progress("own")
    assert p.done == 2 and p.reclaimed >= 1
    b.close()


def restart_until_done(env, run_id: str, crash_param: int, tries: int) -> None:
    """A supervisor: restart the one worker each time the crash task kills it (exit 137),
    until it exits 0 (its chunk dead-lettered after the delivery limit, the rest done)."""
    extra = {"TTG_CRASH_PARAM": str(crash_param), "TTG_MIN_IDLE_MS": "200"}
    for _ in range(tries):
        rc = env.worker(run_id, 0, "--exit-when-done", **extra).wait(timeout=30)
        if rc == 0:
            return
        assert rc == 137
        time.sleep(0.25)
    raise AssertionError(f"the worker still crashed after {tries} starts")


def test_chunk_that_kills_its_worker_is_dead_lettered_after_the_limit(env):
    b = env.make()
    b.submit(spec("crash", params=30, chunk=10, task="crash", max_attempts=3))
    restart_until_done(env, "crash", crash_param=15, tries=6)
    dead = b.dead_letters("crash")
    assert [d.chunk for d in dead] == [1]
    assert "lost its worker" in dead[0].reason
    assert b.progress("crash").done == 2
    b.close()


def test_malformed_entry_is_dead_lettered_and_the_worker_goes_on(env):
    b = env.make()
    b.submit(spec("bad", params=30, chunk=10))
    r = env.broker.client()
    k = Keys("bad")
    r.xadd(k.tasks, {"c": "not-a-number"})
    r.xadd(k.tasks, {"c": "99"})  # out of range
    w = env.worker("bad", 0)
    wait_for(lambda: b.progress("bad").done == 3, what="real chunks done")
    dead = b.dead_letters("bad")
    assert len(r.xrange(k.dlq)) == 2
    assert all("malformed" in d.reason for d in dead)
    assert w.poll() is None  # still running: no crash loop
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=10) == 0
    b.close()


def test_reconcile_reenqueues_lost_chunks_only(env):
    b = env.make()
    b.submit(spec("rec", params=50, chunk=10))
    r = env.broker.client()
    k = Keys("rec")
    ids = [i for i, _ in r.xrange(k.tasks)]
    r.xdel(k.tasks, ids[1], ids[3])  # as if the broker lost them
    assert b.reconcile("rec") == [1, 3]
    assert b.reconcile("rec") == []  # nothing more is missing
    assert r.xlen(k.tasks) == 5
    b.close()


def test_a_point_that_raises_is_retried_then_stored_as_a_failure(env):
    (first,) = env.fleet("pfail", 1, TTG_POISON_PARAM="5")
    r1 = env.ttg("sweep", "--runs-dir", str(env.tmp / "runs"), "--params", "30",
                 "--chunk-size", "10", "--work-ms", "0", "--task", "poison",
                 "--max-attempts", "2", "--workers", "1", run_id="pfail")
    assert r1.returncode == 1  # a failed point the run did not expect: not ok
    assert "0 dead-lettered, 4 executions" in r1.stdout  # chunk 0 ran twice
    assert "1 failed points" in r1.stdout
    assert first.wait(timeout=30) == 0
    failures = pq.read_table(env.tmp / "runs/pfail/failures.parquet").to_pylist()
    assert [f["index"] for f in failures] == [5]
    assert "poisoned parameter 5" in failures[0]["error"] and failures[0]["attempts"] == 2
    rows = pq.read_table(env.tmp / "runs/pfail/results.parquet")
    # one row per point: every point but the failed one, each once
    assert sorted(rows.column("index").to_pylist()) == [i for i in range(30) if i != 5]


def test_dlq_replay_runs_the_chunk_again(env):
    b = env.make()
    b.submit(spec("replay", params=30, chunk=10, task="crash", max_attempts=2))
    restart_until_done(env, "replay", crash_param=5, tries=5)
    assert [d.chunk for d in b.dead_letters("replay")] == [0]
    # the crash is gone now (e.g. a fixed task): replay and run again
    out = env.ttg("dlq", "replay", run_id="replay")
    assert "replayed 1 chunk(s): [0]" in out.stdout
    env.worker("replay", 0, "--exit-when-done", TTG_CRASH_PARAM="-1").wait(timeout=30)
    agg = json.loads(env.ttg("aggregate", "--json", run_id="replay").stdout)
    assert agg["chunks"] == 3 and agg["sum"] == reference_expected_sum(30)
    b.close()


def test_broker_killed_mid_run_loses_nothing(env):
    """SIGKILL redis mid-run, restart it from its AOF: workers reconnect, reconcile repairs."""
    b = env.make()
    s = spec("bkill", params=600, chunk=10, work_ms=5, workers=3)  # 60 chunks of 50 ms
    b.submit(s)
    fleet = env.fleet("bkill", 3)
    wait_for(lambda: b.progress("bkill").done >= 10, what="some progress")
    env.broker.kill(signal.SIGKILL)
    time.sleep(1.0)
    env.broker.start()
    r = env.ttg("sweep", "--runs-dir", str(env.tmp / "runs"), "--params", "600",
                "--chunk-size", "10", "--work-ms", "5", "--stall-timeout", "5",
                run_id="bkill")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"], r.stdout + r.stderr
    assert summary["result"]["sum"] == reference_expected_sum(600)
    assert [p.wait(timeout=60) for p in fleet] == [0, 0, 0]


def test_results_are_read_across_a_broker_restart(env):
    """CI found it: broker-kill as a run ended killed the controller with a traceback in its
    final read of the results (a bare HSCAN iterator, outside the retry budget). The read
    waits for the broker and reads every result once."""
    from ttg.partial import encode_result

    b = env.make(retry_budget_s=20)
    k = Keys("rr")
    # 5,000 chunk results: several HSCAN pages, so the restart falls between two of them
    b.r.hset(k.results, mapping={str(c): encode_result(Partial.of([float(c)]), worker="w")
                                 for c in range(5000)})
    b.r.execute_command("BGREWRITEAOF")
    wait_for(lambda: b.r.info("persistence")["aof_rewrite_in_progress"] == 0,
             what="the AOF rewritten")
    it = b.results("rr")
    first = [next(it) for _ in range(10)]
    env.broker.kill(signal.SIGKILL)
    back = threading.Timer(1.5, env.broker.start)  # down for a while, as a real restart is
    back.start()
    try:
        rest = list(it)
    finally:
        back.join()  # so a failure here cannot start a broker after the fixture stopped it
    chunks = [c for c, _, _ in first + rest]
    # the restarted Redis hashes anew: the scan starts over and gives no field twice
    assert sorted(chunks) == list(range(5000))
    assert all(p.sum == float(c) for c, p, _ in first + rest)


def test_export_per_chunk_partials(env):
    env.fleet("exp", 2)
    env.ttg("sweep", "--runs-dir", str(env.tmp / "runs"), "--params", "100", "--chunk-size",
            "10", "--work-ms", "0", "--workers", "2", run_id="exp")
    out = env.tmp / "parts.csv"
    r = env.ttg("aggregate", "--export", str(out), "--format", "csv", run_id="exp")
    assert r.returncode == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("chunk,count,sum,min,max") and len(rows) == 11
