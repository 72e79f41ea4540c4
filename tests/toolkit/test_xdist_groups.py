"""The suite's parallel run depends on pytest-xdist's `--dist loadgroup` keeping a group on one
worker (conftest.py): the local cluster's module fixture, one node per machine, must be set up
once. pytest 9.2 stopped reading the node id xdist 3.8 rewrites for that, and every group
silently spread over every worker; this test fails if a pair of versions does that again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GROUPED = """
import os, pytest
pytestmark = [pytest.mark.xdist_group("one")]

@pytest.fixture(scope="module")
def shared():
    with open(os.environ["SETUPS"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "none") + "\\n")

@pytest.mark.parametrize("i", range(12))
def test_grouped(shared, i):
    pass
"""
OTHERS = """
import time, pytest

@pytest.mark.parametrize("i", range(24))
def test_other(i):
    time.sleep(0.05)
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_others.py").write_text(OTHERS)
    setups = tmp_path / "setups"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "3",
            "--dist",
            "loadgroup",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "SETUPS": str(setups)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    workers = setups.read_text().split()
    assert len(workers) == 1 and workers[0].startswith("gw"), (
        f"the group's module fixture was set up on {workers}: --dist loadgroup did not group"
    )
