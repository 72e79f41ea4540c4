"""A chunk's result: a small mergeable partial (count, sum, min, max), never per-parameter rows."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Partial:
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def of(cls, values: Iterable[float]) -> Partial:
        vals = list(values)
        if not vals:
            return cls()
        return cls(len(vals), math.fsum(vals), min(vals), max(vals))

    def merge(self, other: Partial) -> Partial:
        return Partial(
            self.count + other.count,
            self.sum + other.sum,
            min(self.min, other.min),
            max(self.max, other.max),
        )

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict) -> Partial:
        """From a stored record; ValueError unless count is an int >= 0 and sum, min, max are
        numbers (min/max infinite only for an empty partial), sum finite."""
        count, total, lo, hi = d["count"], d["sum"], d["min"], d["max"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {str(count)[:40]!r}")
        vals = []
        for name, v in (("sum", total), ("min", lo), ("max", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {str(v)[:40]!r}")
            vals.append(float(v))
        if not math.isfinite(vals[0]) or (count and not all(map(math.isfinite, vals))):
            raise ValueError("sum, min and max of a non-empty result must be finite")
        return cls(count, *vals)


class Aggregator:
    """Streams partials in; first write per chunk wins; sums with fsum for exactness."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.sums: list[float] = []
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.duplicates = 0

    def add(self, chunk: int, partial: Partial) -> bool:
        if chunk in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(chunk)
        self.count += partial.count
        self.sums.append(partial.sum)
        self.min = min(self.min, partial.min)
        self.max = max(self.max, partial.max)
        return True

    def result(self) -> dict:
        if not self.count:
            return {"count": 0, "sum": 0.0, "min": None, "max": None}
        return {
            "count": self.count,
            "sum": round(math.fsum(self.sums), 6),
            "min": self.min,
            "max": self.max,
        }


def encode_result(partial: Partial, **meta: object) -> str:
    """The stored form of a chunk result: the partial plus timing/worker metadata."""
    return json.dumps({**partial.to_dict(), **meta}, separators=(",", ":"))


class MalformedResult(ValueError):
    """A stored result record that is not one (written by something else, or corrupted)."""


def decode_result(raw: str | bytes) -> tuple[Partial, dict]:
    """The partial and metadata of a stored record; MalformedResult with the reason else."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Partial.from_dict(data), data
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = f"{exc.__class__.__name__}: {exc}"[:300]
        raise MalformedResult(f"malformed result record: {reason}") from None
