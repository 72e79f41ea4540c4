"""Behaviour every backend shares, run against real brokers and real worker processes.

A new backend added to the `any_backend`/`queue_backend` fixtures gets this whole suite.
"""

from __future__ import annotations

import json
import signal

import pytest
from conftest import spec, wait_for

from ttg.errors import JobMismatch
from ttg.sweep import reference_expected_sum, reference_value

pytestmark = pytest.mark.timeout(120)


def run_sweep(env, run_id, *args, **extra):
    r = env.ttg("sweep", "--runs-dir", str(env.tmp / "runs"), "--stall-timeout", "20",
                *args, run_id=run_id, **extra)
    summary = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None
    return r, summary


def test_sweep_is_exact(any_backend):
    env = any_backend
    fleet = env.fleet("exact", 3)
    r, s = run_sweep(env, "exact", "--params", "1000", "--chunk-size", "10", "--work-ms", "0")
    assert r.returncode == 0, r.stderr
    assert s["ok"] and s["backend"] == env.backend
    assert s["result"] == {"count": 1000, "sum": 500035.5, "min": 0.41, "max": 999.98}
    assert s["chunks_done"] == 100 and s["chunks_missing"] == 0 and s["executions"] >= 100
    assert (env.tmp / "runs" / "latest" / "summary.json").exists()
    lines = (env.tmp / "runs" / "exact" / "chunks.jsonl").read_text().splitlines()
    assert len(lines) == 100
    assert all(p.wait(timeout=30) == 0 for p in fleet)  # --exit-when-done
    from ttg.results import load_results

    rows = load_results(env.tmp / "runs" / "exact").to_pydict()
    assert rows["index"] == list(range(1000)) and rows["p"] == rows["index"]
    assert rows["value"] == [reference_value(p) for p in range(1000)]
    assert set(rows["attempts"]) == {1}
    assert s["results"]["rows"] == 1000 and s["results"]["failed_points"] == 0


def test_submit_is_idempotent(any_backend):
    b = any_backend.make()
    assert b.submit(spec("idem")) is True
    assert b.submit(spec("idem")) is False
    with pytest.raises(JobMismatch):
        b.submit(spec("idem", params=999))
    b.close()


def test_wrong_password_is_one_clear_error(any_backend):
    env = any_backend
    env.pwfile.write_text("not-the-password")
    r = env.ttg("check", "--connect-timeout", "3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "password" in lines[0].lower(), r.stderr


def _wait_some_done(b, run_id, n):
    return wait_for(lambda: b.progress(run_id).done >= n, timeout=30, what=f"{n} chunks done")


def test_sigkilled_worker_loses_nothing(any_backend):
    """SIGKILL a worker mid-run: queue backends reclaim its chunk; static restarts the index."""
    env = any_backend
    b = env.make()
    s = spec("kill", params=300, chunk=10, work_ms=10, workers=2)  # 100 ms chunks
    b.submit(s)
    victim, other = env.fleet("kill", 2)
    _wait_some_done(b, "kill", 4)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    if env.backend == "static":  # as supervisord / the Indexed Job would
        env.worker("kill", 0, "--exit-when-done")
    wait_for(lambda: b.progress("kill").finished, timeout=60, what="run finished")
    results = {c: p for c, p, _ in b.results("kill")}
    assert sorted(results) == list(range(30))
    total = sum(p.sum for p in results.values())
    assert total == pytest.approx(reference_expected_sum(300))
    assert b.progress("kill").executions >= 30
    b.close()


def test_a_point_that_raises_is_kept_with_its_error_after_the_retries(any_backend):
    """The poisoned chunk is retried (a transient error may pass), and on its last attempt
    stored with the good points' rows and the failed point in failures.parquet."""
    env = any_backend
    env.fleet("poison", 2, TTG_POISON_PARAM="55", TTG_RETRY_DELAYS_MS="50,100")
    r, s = run_sweep(env, "poison", "--params", "200", "--chunk-size", "10", "--work-ms", "0",
                     "--task", "poison", "--max-attempts", "3", "--workers", "2")
    assert r.returncode == 1  # not ok: a point failed that nobody expected to
    assert s["chunks_dead_lettered"] == 0 and s["chunks_done"] == 20
    assert s["chunks_missing"] == 0 and s["executions"] == 22  # chunk 5 ran 3 times
    expected = sum(reference_value(p) for p in range(200) if p != 55)
    assert s["result"]["count"] == 199 and s["result"]["sum"] == pytest.approx(expected)
    res = s["results"]
    assert res["rows"] == 199 and res["failed_points"] == 1 and res["distinct_indices"] == 200
    assert res["duplicate_rows"] == 0 and res["missing_indices"] == 0
    from ttg.results import load_results

    failed = load_results(env.tmp / "runs" / "poison", failures=True).to_pylist()
    assert [(f["index"], f["p"], f["attempts"]) for f in failed] == [(55, 55, 3)]
    assert "poisoned parameter 55" in failed[0]["error"]
    rows = load_results(env.tmp / "runs" / "poison")
    assert 55 not in rows["index"].to_pylist() and rows.num_rows == 199


def test_sigterm_finishes_the_chunk_and_exits_zero(any_backend):
    env = any_backend
    b = env.make()
    b.submit(spec("term", params=40, chunk=10, work_ms=40, workers=1))  # 400 ms chunks
    w = env.worker("term", 0)
    wait_for(lambda: b.progress("term").executions >= 1, timeout=30, what="first chunk done")
    w.send_signal(signal.SIGTERM)
    # a queue worker hands the rest back and exits 0; a static worker owns its range, so it
    # exits 75 to be restarted (an Indexed Job would otherwise count the index as done)
    assert w.wait(timeout=10) == (75 if env.backend == "static" else 0)
    p = b.progress("term")
    assert p.executions == p.done  # the chunk in hand was finished, not abandoned
    assert p.done < 4
    env.worker("term", 0, "--exit-when-done").wait(timeout=30)
    wait_for(lambda: b.progress("term").finished, timeout=30, what="run finished")
    p = b.progress("term")
    assert p.done == 4 and p.executions == 4  # nothing ran twice
    b.close()


def test_purge_removes_the_run_from_the_broker(any_backend):
    b = any_backend.make()
    b.submit(spec("gone", params=50, chunk=10))
    assert b.load_spec("gone") is not None
    b.purge("gone")
    assert b.load_spec("gone") is None
    assert b.submit(spec("gone", params=50, chunk=10)) is True  # the id is free again
    b.close()
