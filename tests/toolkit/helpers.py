"""Helpers of the toolkit tests: the repository, the tools, an isolated local platform."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The tools run from the interpreter's venv (make setup's .venv, or any venv with the lock).
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a console script of this venv (ansible-playbook, ansible-lint, ...)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def env() -> dict[str, str]:
    """The environment the toolkit runs in: this venv first on PATH, no colours."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["ANSIBLE_NOCOLOR"] = "1"
    e["ANSIBLE_FORCE_COLOR"] = "0"
    e["PY_COLORS"] = "0"
    return e


def run(
    args: list[str], timeout: float = 600, cwd: Path = ROOT, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command (in the repository by default) and capture its output."""
    return subprocess.run(
        args,
        cwd=cwd,
        env={**env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_pids(state_dir: Path) -> list[int]:
    """Pids of the processes that belong to the platform of this state dir.

    supervisord is started with -c <state>/supervisor/supervisord.conf, Redis with
    <state>/redis/redis.conf, and the workers carry TTG_BROKER_PASSWORD_FILE under the state dir.
    """
    marker = str(state_dir).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in cmdline or marker in environ:
            pids.append(int(proc.name))
    return pids


class Platform:
    """An isolated local platform: its own state dir, runs dir and Redis port."""

    def __init__(self, base: Path) -> None:
        self.state_dir = base / "state"
        self.runs_dir = base / "runs"
        self.port = free_port()

    @property
    def ansible_args(self) -> str:
        return (
            f"-e ttg_state_dir={self.state_dir} -e ttg_runs_dir={self.runs_dir} "
            f"-e ttg_redis_port={self.port}"
        )

    def extra_vars(self) -> list[str]:
        return self.ansible_args.split()

    def make(
        self, *targets_and_vars: str, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["make", *targets_and_vars, f"ANSIBLE_ARGS={self.ansible_args}"],
            timeout=timeout,
        )

    def stop(self) -> None:
        run(
            [
                tool("ansible-playbook"),
                "playbooks/cleanup.yml",
                "-e",
                "cleanup_confirm=yes",
                *self.extra_vars(),
            ],
            timeout=300,
        )
