"""Hypothesis settings shared by the property tests of the parsers (test_fuzz_*.py).

In the suite each property runs TTG_FUZZ_EXAMPLES examples (default 150, so `make test` stays
fast); `make fuzz` sets TTG_FUZZ_EXAMPLES=10000. `scale` shrinks the count for properties that
make a round trip to a real broker per example.
"""

from __future__ import annotations

import os

from hypothesis import settings


def examples(scale: float = 1.0) -> int:
    raw = os.environ.get("TTG_FUZZ_EXAMPLES", "150")
    base = int(raw) if raw.isascii() and raw.isdigit() else 150
    return max(int(base * scale), 10)


def fuzz_settings(scale: float = 1.0, **kw: object) -> settings:
    return settings(max_examples=examples(scale), deadline=None, print_blob=True, database=None,
                    **kw)
