"""The Molecule scenario of every role (delegated driver, local connection, idempotence step).

A few minutes in all; `make test` runs them through `make molecule`, so here they are marked
`molecule` and `make test` deselects them.
"""

from __future__ import annotations

import pytest

from .helpers import ROOT, run, tool

ROLES = sorted(
    p.parents[2].name for p in (ROOT / "roles").glob("*/molecule/default/molecule.yml")
)


@pytest.mark.molecule
@pytest.mark.parametrize("role", ROLES)
def test_molecule(role: str) -> None:
    result = run([tool("molecule"), "test"], cwd=ROOT / "roles" / role, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
