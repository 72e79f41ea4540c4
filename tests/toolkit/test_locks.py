"""Every requirement has its pin: `make setup` and `make dev` install from the locks alone, so
a name in a requirements file without a line in its lock is silently never installed (it
happened: ansible-lint went missing from requirements-dev.lock and `make lint` could not run)."""

from __future__ import annotations

import re

import pytest

from .helpers import ROOT


def names(path: str) -> set[str]:
    out = set()
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return out


@pytest.mark.parametrize(("wanted", "locks"), [
    ("requirements.txt", ["requirements.lock"]),
    ("requirements-dev.txt", ["requirements.lock", "requirements-dev.lock"]),
])
def test_each_requirement_is_pinned(wanted: str, locks: list[str]) -> None:
    pinned: set[str] = set()
    for lock in locks:
        for line in (ROOT / lock).read_text().splitlines():
            if line and not line.startswith("#"):
                assert "==" in line, f"{lock}: not a pin: {line!r}"
                pinned.add(line.split("==", 1)[0].lower().replace("_", "-"))
    assert names(wanted) - pinned == set(), f"in {wanted} but not pinned in {locks}"
