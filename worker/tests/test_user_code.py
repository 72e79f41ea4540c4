"""A user's own code over a user's own space, on every backend, with real brokers and real
worker processes: every point's result comes back once; workers run only their task; a fleet
that cannot run the task fails the run within seconds with the workers' own error."""

from __future__ import annotations

import json
import time

import pytest

from ttg.results import load_results
from ttg.sweep import JobSpec

pytestmark = pytest.mark.timeout(180)

SIM = '''
import math

def run(alpha, beta, mode):
    if alpha == 0.5 and beta == 3:
        raise ArithmeticError("diverges at alpha=0.5, beta=3")
    return {"loss": (alpha - 0.3) ** 2 + math.log(beta), "mode_len": len(mode),
            "stable": alpha < 0.5}
'''


def expected(alpha, beta, mode):
    import math

    return {"loss": (alpha - 0.3) ** 2 + math.log(beta), "mode_len": len(mode),
            "stable": alpha < 0.5}


def write_code(tmp):
    code = tmp / "code" / "mysim"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "model.py").write_text(SIM)
    (tmp / "space.yml").write_text(
        "type: grid\naxes:\n  alpha: {linspace: [0, 0.5, 6]}\n  beta: [1, 2, 3]\n"
        "  mode: [fast, accurate]\n")
    return tmp / "code"


def sweep(env, run_id, *args, **extra):
    r = env.ttg("sweep", "--runs-dir", str(env.tmp / "runs"), "--stall-timeout", "20",
                "--json", *args, run_id=run_id, **extra)
    lines = r.stdout.strip().splitlines()
    return r, (json.loads(lines[-1]) if lines else None)


def test_your_function_over_a_grid_every_point_back_once(any_backend):
    env = any_backend
    code = write_code(env.tmp)
    task = "mysim.model:run"
    env.fleet("grid", 2, TTG_TASK=task, TTG_CODE=str(code))
    r, s = sweep(env, "grid", "--task", task, "--code", str(code), "--space",
                 str(env.tmp / "space.yml"), "--chunk-size", "5", "--max-attempts", "2",
                 "--objective", "loss", "--workers", "2")
    assert s is not None, r.stderr
    # 6 x 3 x 2 = 36 points; alpha=0.5, beta=3 fails for both modes (2 points)
    res = s["results"]
    assert s["params"] == 36 and s["chunks_total"] == 8 and s["work_ms"] == 0
    assert res["rows"] == 34 and res["failed_points"] == 2 and res["distinct_indices"] == 36
    assert res["duplicate_rows"] == 0 and res["missing_indices"] == 0
    assert not s["ok"] and r.returncode == 1  # failures nobody expected
    rows = load_results(env.tmp / "runs" / "grid").to_pylist()
    assert [r["index"] for r in rows] == [i for i in range(36) if i not in (34, 35)]
    for row in rows:
        want = expected(row["alpha"], row["beta"], row["mode"])
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-12)
        assert row["mode_len"] == want["mode_len"] and row["stable"] == want["stable"]
    assert s["result"]["count"] == 34
    assert s["result"]["sum"] == pytest.approx(sum(r["loss"] for r in rows))
    failed = load_results(env.tmp / "runs" / "grid", failures=True).to_pylist()
    assert [(f["alpha"], f["beta"], f["attempts"]) for f in failed] == [(0.5, 3, 2)] * 2
    assert all("ArithmeticError: diverges" in f["error"] for f in failed)


def test_a_worker_refuses_a_job_naming_another_task(any_backend):
    """Whoever writes a spec into the broker first cannot make the workers run their code."""
    env = any_backend
    evil = env.tmp / "evil"
    evil.mkdir()
    marker = env.tmp / "pwned"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                  "def run(p):\n    return 0.0\n")
    b = env.make()
    b.submit(JobSpec("hijack", 40, 10, task="evil:run", work_ms=0).validate())
    b.close()
    workers = env.fleet("hijack", 2, TTG_TASK="reference", TTG_CODE=str(evil))
    codes = [w.wait(timeout=60) for w in workers]
    assert codes == [2, 2]
    assert not marker.exists(), "the workers imported a module they were not started for"
    log = open(workers[0].logfile).read()  # type: ignore[attr-defined]
    assert "refusing task 'evil:run'" in log
    b = env.make()
    try:
        assert b.progress("hijack").executions == 0  # nothing of it ran
        assert "refusing task" in next(iter(b.worker_errors("hijack").values()))
    finally:
        b.close()


def test_a_fleet_that_cannot_import_the_task_fails_the_run_in_seconds(any_backend):
    env = any_backend
    task = "not_installed_anywhere.sim:run"
    env.fleet("noimport", 2, TTG_TASK=task)
    t0 = time.monotonic()
    r, _s = sweep(env, "noimport", "--task", task, "--params", "100", "--chunk-size", "10")
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "the workers cannot run this job" in last
    assert "cannot import module 'not_installed_anywhere.sim'" in last
    assert took < 60, f"took {took:.0f} s to notice"
