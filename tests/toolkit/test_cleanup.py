"""make clean (the cleanup role) on a real local platform: it lists, asks, removes only ours."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import ROOT, Platform, env, project_pids, run, tool


def supervisor_status(platform: Platform) -> dict[str, str]:
    out = run(
        [
            tool("supervisorctl"),
            "-c",
            str(platform.state_dir / "supervisor" / "supervisord.conf"),
            "status",
        ],
        timeout=30,
    ).stdout
    return {
        f[0]: f[1] for f in (line.split() for line in out.splitlines()) if len(f) > 1
    }


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_cleanup_removes_only_what_the_project_created(platform: Platform) -> None:
    # The platform, a fleet waiting for a run that never comes, and no sweep.
    up = run(
        [
            "make",
            "demo",
            "SCALE=small",
            "WORKERS=2",
            "RUN_ID=cleanup-test",
            f"ANSIBLE_ARGS={platform.ansible_args} --tags preflight,provision,backend,fleet",
        ],
        timeout=600,
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-2000:]
    status = supervisor_status(platform)
    assert status == {
        "ttg-fleet:worker-0": "RUNNING",
        "ttg-fleet:worker-1": "RUNNING",
        "ttg-redis": "RUNNING",
    }, status
    before = sorted(project_pids(platform.state_dir))

    # Not the project's: a process of its own group, and files next to the state dir.
    bystander = subprocess.Popen(
        ["sleep", "300"], start_new_session=True, cwd=platform.state_dir.parent
    )
    sibling = platform.state_dir.parent / "not-ours"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("keep me\n")
    beside = platform.state_dir.parent / "keep-me.txt"
    beside.write_text("keep me\n")
    runs_file = platform.runs_dir / "keep" / "summary.json"
    runs_file.parent.mkdir(parents=True)
    runs_file.write_text("{}\n")
    try:
        # Dry run: lists everything, touches nothing.
        started = time.monotonic()
        dry = platform.make("clean", "DRY_RUN=1", timeout=300)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "would remove (local, scope all)" in dry.stdout, dry.stdout
        for name in (
            "supervisord pid",
            "ttg-fleet:worker-0",
            "ttg-fleet:worker-1",
            "ttg-redis",
        ):
            assert name in dry.stdout, name
        assert time.monotonic() - started < 120
        assert sorted(project_pids(platform.state_dir)) == before

        # No terminal, no CONFIRM=yes: refuses in one line, touches nothing.
        refused = subprocess.run(
            ["make", "clean", f"ANSIBLE_ARGS={platform.ansible_args}"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env(),
        )
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, output
        errors = [line for line in output.splitlines() if line.startswith("[ERROR]")]
        assert len(errors) == 1 and "Refusing to clean up" in errors[0], output
        assert sorted(project_pids(platform.state_dir)) == before

        # --tags workers: only the fleet.
        workers = run(
            [
                "make",
                "clean",
                "CONFIRM=yes",
                f"ANSIBLE_ARGS={platform.ansible_args} --tags workers",
            ],
            timeout=300,
        )
        assert workers.returncode == 0, workers.stdout + workers.stderr
        status = supervisor_status(platform)
        assert status["ttg-redis"] == "RUNNING", status
        assert (
            status["ttg-fleet:worker-0"] == status["ttg-fleet:worker-1"] == "STOPPED"
        ), status

        # Everything of the project.
        cleaned = platform.make("clean", "CONFIRM=yes", timeout=300)
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        assert project_pids(platform.state_dir) == []

        # What is not the project's survived; runs/ and the data are kept.
        assert alive(bystander.pid)
        assert (sibling / "keep.txt").read_text() == "keep me\n"
        assert beside.read_text() == "keep me\n"
        assert runs_file.exists()
        assert (platform.state_dir / "redis" / "data").is_dir()
        assert (platform.state_dir / "secrets" / "redis.pass").exists()

        # A second clean-up finds nothing and asks nothing.
        again = platform.make("clean", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing of the project" in again.stdout

        # purge (asked by its tag only): the brokers' data and the secrets go, runs/ stays.
        purged = run(
            [
                "make",
                "clean",
                "CONFIRM=yes",
                f"ANSIBLE_ARGS={platform.ansible_args} --tags purge",
            ],
            timeout=300,
        )
        assert purged.returncode == 0, purged.stdout + purged.stderr
        assert not (platform.state_dir / "redis").exists()
        assert not (platform.state_dir / "secrets").exists()
        assert (
            runs_file.exists() and beside.exists() and (sibling / "keep.txt").exists()
        )
        assert alive(bystander.pid)
    finally:
        os.kill(bystander.pid, signal.SIGKILL)
        bystander.wait(timeout=10)


def test_kubernetes_selection_is_by_labels_offline(tmp_path: Path) -> None:
    """--check against inventories/kind, with rendered manifests standing in for the cluster."""
    rendered = run(
        [
            tool("ansible-playbook"),
            "-i",
            "inventories/kind",
            "playbooks/render-manifests.yml",
            "-e",
            f"ttg_render_dir={tmp_path}",
            "-e",
            '{"ttg_render_backends": ["redis"]}',
        ],
        timeout=300,
    )
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    objects = tmp_path / "kind" / "redis"
    (objects / "99-foreign.yml").write_text(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: someone-elses\n"
        "  namespace: ttg\n  labels:\n    app.kubernetes.io/part-of: other-team\ndata: {}\n"
    )

    def dry(*tags: str) -> str:
        result = run(
            [
                tool("ansible-playbook"),
                "-i",
                "inventories/kind",
                "playbooks/cleanup.yml",
                "--check",
                "-e",
                f"cleanup_k8s_manifests_dir={objects}",
                *tags,
            ],
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return " ".join(result.stdout.split())

    everything = dry()
    assert "would remove (kind, scope all)" in everything
    assert "StatefulSet ttg/ttg-redis" in everything
    assert "Deployment ttg/ttg-workers" in everything
    assert "Secret ttg/ttg-broker" not in everything  # credentials go with purge only
    assert "kept, not the project's: ConfigMap someone-elses" in everything
    assert "ttg/someone-elses" not in everything
    workers = dry("--tags", "workers")
    assert "Deployment ttg/ttg-workers" in workers
    assert "StatefulSet" not in workers
    backend = dry("--tags", "backend")
    assert "StatefulSet ttg/ttg-redis" in backend and "Deployment" not in backend
    assert "Secret ttg/ttg-broker" in dry("--tags", "purge")
