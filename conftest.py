"""How the suite runs in parallel (`make pytest`: pytest-xdist with `--dist loadgroup`).

Every test makes its own broker, state dir, ports and temporary files, so tests run on any
worker. The few that share something costly are kept on one worker with an `xdist_group`:

- `k8s-manifests`: the tests of the rendered manifests (tests/k8s/conftest.py renders them
  once per session, under a file lock, whichever worker asks first).
- `docker`: the worker-image tests build one image (a module fixture) in the one Docker daemon.
- `kind`: the live-cluster tests share one Kind cluster (a module fixture).

A test that asks for its group explicitly (`@pytest.mark.xdist_group(...)`) keeps it; a mark's
group comes before a fixture's.
"""

from __future__ import annotations

import pytest

SHARED_FIXTURES = {"render_dir": "k8s-manifests", "manifests": "k8s-manifests"}
SHARED_MARKS = {"docker": "docker", "live": "kind"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        # marks first: a docker test that also reads the manifests must stay with the image
        # it shares (each worker building and then removing the same tag broke the others)
        group = next(
            (g for m, g in SHARED_MARKS.items() if item.get_closest_marker(m)), None
        ) or next(
            (g for f, g in SHARED_FIXTURES.items() if f in getattr(item, "fixturenames", ())),
            None,
        )
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
