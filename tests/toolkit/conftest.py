"""Fixtures of the toolkit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Platform, project_pids


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lint: yamllint / ansible-lint over the repo (make lint runs them too)",
    )
    config.addinivalue_line(
        "markers",
        "molecule: the Molecule scenario of a role (make molecule runs them too)",
    )
    config.addinivalue_line(
        "markers", "e2e: runs make demo end to end on an isolated local platform"
    )


@pytest.fixture
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A local platform of the test's own (state dir, runs dir, Redis port), stopped at the end."""
    p = Platform(Path(tmp_path_factory.mktemp("ttg")))
    yield p
    p.stop()
    assert project_pids(p.state_dir) == [], (
        "a process of the test platform is still running"
    )
