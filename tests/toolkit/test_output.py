"""What a person reads from `make`: one line per stage, the sweep's progress, the summary
once, where the files are; and when something fails, the reason in the last lines.

The output is captured as a log or CI console would have it (not a TTY, stderr merged into
stdout in the order it was written)."""

from __future__ import annotations

import re
import subprocess

import pytest

from .helpers import ROOT, Platform, env


def make(platform: Platform, *args: str, extra: str = "",
         timeout: float = 900) -> tuple[int, list[str]]:
    """Run make on the isolated platform; return (exit code, the non-empty output lines)."""
    proc = subprocess.run(
        ["make", *args, f"ANSIBLE_ARGS={platform.ansible_args} {extra}".strip()],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )
    return proc.returncode, [line for line in proc.stdout.splitlines() if line.strip()]


STAGE = re.compile(r"^(preflight|platform|backend|fleet|sweep) +\d+\.\d s")


@pytest.mark.e2e
def test_demo_prints_stages_progress_then_the_summary_once(platform: Platform) -> None:
    rc, lines = make(platform, "demo", "PARAMS=600", "CHUNK=10", "WORK_MS=50")
    text = "\n".join(lines)
    assert rc == 0, text[-4000:]
    run_id = re.search(r"^run id: (\S+)$", text, re.MULTILINE).group(1)
    head = [i for i, line in enumerate(lines) if line.startswith(f"run {run_id}  local/redis")]
    assert len(head) == 1, text  # the human summary, once
    before = lines[: head[0]]
    assert len(before) <= 25, "\n".join(before)
    assert [STAGE.match(line).group(1) for line in lines if STAGE.match(line)] == [
        "preflight", "platform", "backend", "fleet", "sweep"], text
    progress = [line for line in before if re.search(r" progress \d+/60 chunks ", line)]
    assert progress and "60/60 chunks 100.0%" in progress[-1], text
    assert "params/s" in progress[-1] and "workers 3" in progress[-1]
    assert text.count("verdict  OK") == 1
    # after the summary: where its files are, last
    where = f"{platform.runs_dir}/{run_id}/summary.json"
    assert lines[-1].startswith(f"Run {run_id} ok: summary {where}")
    assert "TASK [" not in text and "PLAY [" not in text and "skipping" not in text


def last_lines(lines: list[str], n: int = 3) -> str:
    return "\n".join(lines[-n:])


def test_bad_backend_ends_with_the_reason(platform: Platform) -> None:
    rc, lines = make(platform, "demo", "BACKEND=kafka", timeout=120)
    assert rc != 0
    want = "BACKEND 'kafka' is not valid: choose one of redis, rabbitmq, static"
    assert want in last_lines(lines)
    assert len(lines) <= 6, "\n".join(lines)  # no Ansible error dump, no recap


def test_kind_without_docker_or_kind_ends_with_the_reason(platform: Platform) -> None:
    # Docker and kind "not on PATH": the role's commands point where nothing is installed
    rc, lines = make(platform, "demo", "PLATFORM=kind", timeout=300,
                     extra="-e kind_cluster_docker_bin=/nonexistent/docker "
                           "-e kind_cluster_kind_bin=/nonexistent/kind")
    assert rc != 0
    tail = last_lines(lines)
    assert ("PLATFORM=kind needs a reachable Docker daemon (docker info failed), kind on PATH"
            in tail)
    assert "install Docker and kind" in tail


def test_verbose_gives_ansibles_full_output(platform: Platform) -> None:
    rc, lines = make(platform, "demo", "BACKEND=kafka", "VERBOSE=1", timeout=120)
    text = "\n".join(lines)
    assert rc != 0
    assert "PLAY [Check the input before anything is touched]" in text
    assert "PLAY RECAP" in text


@pytest.mark.e2e
def test_failed_run_says_what_failed_why_and_where_to_look(platform: Platform) -> None:
    # the poison task raises for parameter 0: chunk 0 is retried, then stored with that
    # point's error; a failed point the run did not expect: not ok
    rc, lines = make(platform, "demo", "TASK=poison", "PARAMS=200", "CHUNK=10", "WORK_MS=1")
    text = "\n".join(lines)
    assert rc != 0, text[-3000:]
    tail = "\n".join(lines[-8:])
    assert re.search(r"chunks: 20/20 done, 0 missing, 0 dead-lettered", tail), text[-3000:]
    assert re.search(r"points: 1 failed, stored with their errors \(every one: .* --failures\)",
                     tail), text[-3000:]
    assert re.search(r"error: 1 x .*poisoned parameter 0", tail), text[-3000:]
    assert "dlq list --backend redis" in tail
    assert f"worker logs: {platform.state_dir}/logs/worker-*.log" in tail
    assert re.search(r"\[ERROR\] Run \S+ is NOT ok: read the errors above", lines[-2] + lines[-1])
