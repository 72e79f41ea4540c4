"""The sweep model: N points 0..N-1 cut into chunks [k*C, min((k+1)*C, N)).

Point i is decoded from its index by the job's space (`ttg.spaces`): the range space (the
default, `space` empty) gives {"p": i}."""

from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from ttg.errors import ConfigError

if TYPE_CHECKING:
    from ttg.spaces import Space

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def new_run_id(now: float | None = None) -> str:
    """A sortable, unique run id: `YYYYmmdd-HHMMSS-xxxx`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or ""):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return run_id


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to compute any chunk of a run."""

    run_id: str
    params: int
    chunk_size: int
    task: str = "reference"
    work_ms: float = 1.0
    workers: int = 1
    max_attempts: int = 5
    space: str = ""  # the space's canonical JSON (ttg.spaces); empty: the range 0..params-1
    objective: str = ""  # the numeric output summarized in `result`; empty: `value`

    def get_space(self) -> Space:
        from ttg.spaces import from_definition, range_space

        return from_definition(self.space) if self.space else range_space(self.params)

    @property
    def chunks_total(self) -> int:
        return math.ceil(self.params / self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        """Half-open parameter range of chunk `chunk`."""
        if not 0 <= chunk < self.chunks_total:
            raise ValueError(f"chunk {chunk} outside 0..{self.chunks_total - 1}")
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.params)

    def validate(self) -> JobSpec:
        check_run_id(self.run_id)
        for name in ("params", "chunk_size", "workers", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if (not isinstance(self.work_ms, (int, float)) or not math.isfinite(self.work_ms)
                or self.work_ms < 0):
            raise ConfigError(f"work_ms must be >= 0, got {self.work_ms!r}")
        if self.chunks_total > 10_000_000:
            raise ConfigError(f"{self.chunks_total} chunks is too many: use a larger chunk size")
        if self.objective and not self.objective.isidentifier():
            raise ConfigError(f"objective {self.objective!r} must be an output name")
        from ttg.tasks import check_task_name

        check_task_name(self.task)
        if self.space:
            size = self.get_space().size
            if size != self.params:
                raise ConfigError(f"params {self.params} is not the space's {size} points")
        return self

    def to_fields(self) -> dict[str, str]:
        """Flat string fields, as stored in a broker hash or message header."""
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, data: dict) -> JobSpec:
        raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}
        kwargs = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            value = value.decode() if isinstance(value, bytes) else value
            if f.name in ("params", "chunk_size", "workers", "max_attempts"):
                value = int(value)
            elif f.name == "work_ms":
                value = float(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def same_job(self, other: JobSpec) -> bool:
        """Equal in everything that changes the result (the fleet size may differ)."""
        a, b = asdict(self), asdict(other)
        a.pop("workers")
        b.pop("workers")
        return a == b


def static_range(index: int, workers: int, chunks_total: int) -> range:
    """The contiguous chunks worker `index` of `workers` owns in the static split."""
    if not 0 <= index < workers:
        raise ConfigError(f"worker index {index} outside 0..{workers - 1}")
    per = math.ceil(chunks_total / workers)
    return range(min(index * per, chunks_total), min((index + 1) * per, chunks_total))


def reference_value(p: int) -> float:
    """The seed formula of the original system, kept bit for bit."""
    return (p * 7 + 13) % 1000 + float(f"0.{p % 100}")


def reference_expected_sum(params: int) -> float:
    """Exact sum of `reference_value` over 0..params-1, in O(1000).

    The formula is periodic with period 1000, so whole periods are counted once. Each
    value is summed as an exact decimal (integer part + hundredths) to avoid float drift.
    """
    def hundredths(p: int) -> int:
        # float(f"0.{r}") is r/10 for r < 10 and r/100 otherwise
        r = p % 100
        return ((p * 7 + 13) % 1000) * 100 + (r * 10 if r < 10 else r)

    period = sum(hundredths(p) for p in range(1000))
    full, rest = divmod(params, 1000)
    total = full * period + sum(hundredths(p) for p in range(rest))
    return total / 100
