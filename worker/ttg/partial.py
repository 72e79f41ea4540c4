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
        return cls(int(d["count"]), float(d["sum"]), float(d["min"]), float(d["max"]))


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


def decode_result(raw: str | bytes) -> tuple[Partial, dict]:
    data = json.loads(raw)
    return Partial.from_dict(data), data
