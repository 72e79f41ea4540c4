"""playbooks/recover-infra.yml after a crash of everything mid-run, with real processes.

A run is started (make demo, in the background), and once some chunks are done the project's
supervisord and all its children (the broker, the workers) and the controller are SIGKILLed by
PID. `make recover` must bring the platform back from its data dirs and finish the same run:
exit 0, summary ok, the exact sum, work done both before and after the crash.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import ROOT, Platform, env, free_port, project_pids, run, tool

PARAMS, CHUNK, WORK_MS, WORKERS = 3000, 30, 10, 2
JOB = [f"PARAMS={PARAMS}", f"CHUNK={CHUNK}", f"WORK_MS={WORK_MS}", f"WORKERS={WORKERS}"]


def reference_sum(n: int) -> float:
    return round(sum((p * 7 + 13) % 1000 + float(f"0.{p % 100}") for p in range(n)), 6)


def descendants(root: int) -> list[int]:
    """root and every process under it (by /proc ppid), root first."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["redis", "rabbitmq"])
def test_recover_after_killing_everything_mid_run(
    platform: Platform, backend: str
) -> None:
    run_id = f"recover-{backend}-{int(time.time())}"
    extra = ""
    broker_port = platform.port
    password = platform.state_dir / "secrets" / "redis.pass"
    url = f"redis://127.0.0.1:{platform.port}/0"
    if backend == "rabbitmq":
        broker_port = free_port()
        extra = (
            f" -e ttg_rabbitmq_port={broker_port}"
            f" -e ttg_rabbitmq_management_port={free_port()}"
            f" -e ttg_rabbitmq_dist_port={free_port()}"
            f" -e ttg_rabbitmq_epmd_port={free_port()}"
            f" -e ttg_rabbitmq_nodename=ttg-test-{broker_port}@localhost"
        )
        password = platform.state_dir / "secrets" / "rabbitmq.pass"
        url = f"amqp://ttg@127.0.0.1:{broker_port}/ttg"
    args = [f"BACKEND={backend}", *JOB, f"RUN_ID={run_id}"]
    ansible_args = f"ANSIBLE_ARGS={platform.ansible_args}{extra}"

    demo = subprocess.Popen(
        ["make", "demo", *args, ansible_args],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    status_env = dict(
        env(),
        TTG_BACKEND=backend,
        TTG_BROKER_URL=url,
        TTG_BROKER_PASSWORD_FILE=str(password),
        TTG_RUN_ID=run_id,
    )
    try:
        done_before, deadline = 0, time.monotonic() + 400
        while time.monotonic() < deadline and demo.poll() is None:
            if password.exists():
                st = subprocess.run(
                    [tool("ttg"), "status", "--json", "--connect-timeout", "2"],
                    env=status_env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                if st.returncode == 0:
                    done_before = json.loads(st.stdout.splitlines()[-1])["done"]
                    if done_before >= 10:
                        break
            time.sleep(1)
        assert demo.poll() is None, "the run ended before it could be interrupted"
        assert 10 <= done_before < PARAMS // CHUNK, done_before

        # The crash: supervisord first (so nothing is restarted), then all it ran, then the
        # controller (ansible-playbook runs in a session of its own: found under make).
        supervisord = int(
            (platform.state_dir / "supervisor" / "supervisord.pid").read_text()
        )
        platform_tree = descendants(supervisord)
        controller_tree = descendants(demo.pid)
        crashed_at = time.time()
        kill_all(platform_tree)
        kill_all(controller_tree)
        demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            kill_all(descendants(demo.pid))
            demo.wait(timeout=30)
    time.sleep(1)
    assert len(platform_tree) >= 1 + WORKERS + 1, platform_tree
    assert not listening(broker_port), "the broker is still up"
    assert project_pids(platform.state_dir) == []
    assert not (platform.runs_dir / run_id / "summary.json").exists()

    started = time.monotonic()
    recovered = run(["make", "recover", *args, ansible_args], timeout=900)
    took = time.monotonic() - started
    assert recovered.returncode == 0, (
        recovered.stdout[-5000:] + recovered.stderr[-2000:]
    )
    assert f"run {run_id} survived" in recovered.stdout
    assert f"Run {run_id} ok" in recovered.stdout

    run_dir = platform.runs_dir / run_id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] is True, summary
    assert summary["backend"] == backend
    assert summary["chunks_total"] == summary["chunks_done"] == PARAMS // CHUNK
    assert summary["chunks_missing"] == 0
    assert summary["result"]["count"] == PARAMS
    assert summary["result"]["sum"] == pytest.approx(reference_sum(PARAMS), abs=1e-6)
    # Work done before and after the crash, in the same run.
    rows = [json.loads(line) for line in (run_dir / "chunks.jsonl").read_text().splitlines()]
    finished = [row["finished"] for row in rows]
    # One run across the crash: the wall time counts from the first submission, so it covers
    # every chunk from the first started before the crash to the last finished after it (a
    # wall time restarted by the recovery would be shorter than that span).
    span = max(finished) - min(row.get("started", row["finished"]) for row in rows)
    assert summary["wall_s"] >= span - 0.01, (summary["wall_s"], span, took)
    before = sum(t < crashed_at for t in finished)
    after = sum(t > crashed_at for t in finished)
    # (Redis AOF fsyncs every second: the last second's results may be redone after it.)
    assert before > 0 and after > 0, (before, after, done_before)
    assert before + after == len(finished) == PARAMS // CHUNK
    # The crash is a fault of the run, measured from the run's own results.
    crash = [f for f in summary["faults"] if f["type"] == "infra-crash"]
    assert len(crash) == 1, summary["faults"]
    crash = crash[0]
    assert crashed_at < crash["at"] < crashed_at + took
    assert 0 < crash["recovered_s"] < took
    assert crash["last_result_before"] <= crashed_at + 0.01
    assert crash["outage_s"] >= crash["at"] - crashed_at
    assert 0 < crash["at_progress"] < 1
    recovery = json.loads((run_dir / "recovery.json").read_text())
    assert recovery["progress_at_recovery"]["chunks_total"] == PARAMS // CHUNK
