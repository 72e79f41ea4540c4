"""Fixtures of the Kubernetes-path tests: every manifest rendered once per session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock

from .helpers import PLATFORMS, ROOT, env, load_docs, tool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lint: yamllint / ansible-lint (make lint runs them too)"
    )
    config.addinivalue_line("markers", "docker: needs a reachable Docker daemon")
    config.addinivalue_line(
        "markers", "live: needs a live Kind cluster (Docker + kind + node image)"
    )


@pytest.fixture(scope="session")
def render_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build/manifests/<platform>/<backend>[-extras]/, rendered through Ansible's own
    templating (playbooks/render-manifests.yml, the k8s_app role's `render` entry point).

    Once per test session, not once per pytest-xdist worker: the first worker renders under
    a file lock into the directory the workers share, the others read the result (three
    workers each running three playbooks of ~100 template tasks on two cores took over ten
    minutes)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-of-<user>/pytest-N/, above each worker's popen-gwK/
    out, state, done = shared / "manifests", shared / "manifests-state", shared / "manifests.ok"
    with FileLock(str(shared / "manifests.lock")):
        if not done.exists():
            _render(out, state)
            done.touch()
    return out


def _render(out: Path, state: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    procs = {
        platform: subprocess.Popen(
            [
                tool("ansible-playbook"),
                "-i",
                f"inventories/{platform}",
                "playbooks/render-manifests.yml",
                "-e",
                f"ttg_render_dir={out}",
                "-e",
                f"ttg_state_dir={state}",
            ],
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for platform in PLATFORMS  # in parallel: each is ~100 template tasks
    }
    for platform, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{platform}: {output[-4000:]}"


@pytest.fixture(scope="session")
def manifests(render_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """{"kind/redis": {"03-broker.yml": [docs...]}, ...}"""
    out: dict[str, dict[str, list[dict]]] = {}
    for d in sorted(p for p in render_dir.glob("*/*") if p.is_dir()):
        out[f"{d.parent.name}/{d.name}"] = {
            f.name: load_docs(f) for f in sorted(d.glob("*.yml"))
        }
    return out
