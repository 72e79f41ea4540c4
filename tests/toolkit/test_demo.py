"""`make demo` end to end on an isolated local platform, and its fast failures on bad input."""

from __future__ import annotations

import json
import re
import time

import pytest

from .helpers import Platform, project_pids, run, tool


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            "BACKEND=kafka",
            "BACKEND 'kafka' is not valid: choose one of redis, rabbitmq, static",
        ),
        ("PARAMS=-5", "PARAMS must be a whole number > 0, got '-5'"),
        (
            "PLATFORM=mars",
            "PLATFORM 'mars' is not valid: choose one of local, kind, aks",
        ),
        ("WORK_MS=-1", "WORK_MS must be a whole number >= 0, got '-1'"),
        ("TASK=nosuch.module:fn", "nosuch"),
    ],
)
def test_bad_input_fails_fast_and_starts_nothing(
    platform: Platform, var: str, message: str
) -> None:
    started = time.monotonic()
    result = platform.make("demo", var, timeout=120)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    error_lines = [line for line in output.splitlines() if line.startswith("[ERROR]")]
    assert len(error_lines) == 1 and message in error_lines[0], output
    assert not platform.state_dir.exists(), "bad input touched the state dir"
    assert project_pids(platform.state_dir) == []


@pytest.mark.e2e
def test_make_demo_small_then_clean(platform: Platform) -> None:
    result = platform.make("demo", "SCALE=small", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((platform.runs_dir / "latest" / "summary.json").read_text())
    assert summary["ok"] is True
    assert summary["result"]["sum"] == 500035.5
    assert summary["result"]["count"] == 1000
    assert summary["chunks_total"] == summary["chunks_done"] == 100
    assert summary["chunks_missing"] == 0
    assert (platform.runs_dir / summary["run_id"] / "summary.json").exists()
    assert f"Run {summary['run_id']} ok" in result.stdout  # the verdict line is shown

    # make status: what runs where, read from the platform itself
    status = platform.make("status", timeout=300)
    assert status.returncode == 0, status.stdout[-3000:]
    out = status.stdout
    pid = (platform.state_dir / "supervisor" / "supervisord.pid").read_text().strip()
    assert f"supervisord  running, pid {pid}" in out
    assert re.search(r"program +ttg-redis +RUNNING +pid \d+", out), out[-3000:]
    assert len(re.findall(r"program +ttg-fleet:worker-\d", out)) == 3
    assert f"port         {platform.port} (redis): listening" in out
    assert f"runs         1 (1 with a summary), latest {summary['run_id']}" in out
    assert f"recorded     {summary['run_id']} (redis, 1000 params)" in out
    assert re.search(rf"disk +\d+ KiB  {re.escape(str(platform.state_dir))}/redis", out)

    cleaned = platform.make("clean", "CONFIRM=yes", timeout=300)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert project_pids(platform.state_dir) == []
    after = platform.make("status", timeout=300)
    assert after.returncode == 0, after.stdout[-3000:]
    assert "supervisord  not running" in after.stdout
    assert f"port         {platform.port} (redis): nothing listens" in after.stdout


def test_second_converge_of_the_backend_changes_nothing(platform: Platform) -> None:
    args = [
        tool("ansible-playbook"),
        "playbooks/provision.yml",
        "playbooks/backend.yml",
        *platform.extra_vars(),
    ]
    # Ansible's own callback: the play recap (and every task's output, for the leak check)
    first = run(args, timeout=300, ANSIBLE_STDOUT_CALLBACK="default")
    assert first.returncode == 0, first.stdout + first.stderr
    second = run(args, timeout=300, ANSIBLE_STDOUT_CALLBACK="default")
    assert second.returncode == 0, second.stdout + second.stderr
    recap = second.stdout.split("PLAY RECAP")[-1]
    assert "changed=0" in recap and "failed=0" in recap, recap
    secret = platform.state_dir / "secrets" / "redis.pass"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert (
        oct((platform.state_dir / "redis" / "redis.conf").stat().st_mode & 0o777)
        == "0o600"
    )
    # The password never reaches the output.
    assert secret.read_text().strip() not in first.stdout + second.stdout


def test_cleanup_check_mode_lists_and_stops_nothing(platform: Platform) -> None:
    up = run(
        [
            tool("ansible-playbook"),
            "playbooks/provision.yml",
            "playbooks/backend.yml",
            *platform.extra_vars(),
        ]
    )
    assert up.returncode == 0, up.stdout + up.stderr
    pids = project_pids(platform.state_dir)
    dry = run(
        [
            tool("ansible-playbook"),
            "playbooks/cleanup.yml",
            "--check",
            *platform.extra_vars(),
        ]
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would stop supervisord pid" in dry.stdout and "ttg-redis" in dry.stdout
    assert project_pids(platform.state_dir) == pids
    real = run(
        [
            tool("ansible-playbook"),
            "playbooks/cleanup.yml",
            "-e",
            "cleanup_confirm=yes",
            *platform.extra_vars(),
        ]
    )
    assert real.returncode == 0, real.stdout + real.stderr
    assert project_pids(platform.state_dir) == []


def test_check_mode_on_a_fresh_machine_writes_nothing(platform: Platform) -> None:
    result = run(
        [
            tool("ansible-playbook"),
            "site.yml",
            "--check",
            "--diff",
            *platform.extra_vars(),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not platform.state_dir.exists()
    assert not platform.runs_dir.exists()
