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
# A task as a spec may name it: a built-in name or `module.path:function` (syntax only).
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
TASK_RE = re.compile(rf"^{_NAME}(\.{_NAME})*(:{_NAME})?$")
# ASCII decimal only: int() and float() also take ' 7 ', '1_0', '١٢', 'nan', 'inf'
_INT_RE = re.compile(r"^-?[0-9]{1,19}$")
_FLOAT_RE = re.compile(r"^-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?$")
# Upper bounds a spec read from a broker must respect (a hostile spec cannot make a worker
# or the controller allocate or sleep without bound).
LIMITS = {"params": 10**12, "chunk_size": 10**9, "workers": 10**5, "max_attempts": 1000}
MAX_CHUNKS = 10**8
MAX_WORK_MS = 3_600_000.0
MAX_SPACE_CHARS = 1_000_000  # a grid of explicit values, a file space's path and digest


def strict_int(value: object, what: str = "value") -> int:
    """An int from a broker field: an int (not a bool) or ASCII decimal digits; ValueError else."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_RE.match(value):
        return int(value)
    raise ValueError(f"{what} must be an integer, got {str(value)[:80]!r}")


def strict_float(value: object, what: str = "value") -> float:
    """A finite float from a broker field (decimal notation only: no nan, inf, '1_0')."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str) and _FLOAT_RE.match(value):
        out = float(value)
    else:
        raise ValueError(f"{what} must be a number, got {str(value)[:80]!r}")
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return out


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

    def check(self) -> JobSpec:
        """Types, ranges, run id and task syntax; imports nothing (a spec read from a broker
        is checked so before a worker acts on it)."""
        if not isinstance(self.run_id, str):
            raise ConfigError(f"invalid run id {self.run_id!r}")
        check_run_id(self.run_id)
        for name in ("params", "chunk_size", "workers", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:
                raise ConfigError(f"{name} must be at most {LIMITS[name]}, got {value}")
        if self.chunks_total > MAX_CHUNKS:
            raise ConfigError(f"{self.chunks_total} chunks: at most {MAX_CHUNKS} "
                              "(raise chunk_size)")
        if (not isinstance(self.work_ms, (int, float)) or isinstance(self.work_ms, bool)
                or not math.isfinite(self.work_ms) or not 0 <= self.work_ms <= MAX_WORK_MS):
            raise ConfigError(f"work_ms must be >= 0 and at most {MAX_WORK_MS:.0f}, "
                              f"got {self.work_ms!r}")
        if not isinstance(self.task, str) or not TASK_RE.match(self.task):
            raise ConfigError(f"task {str(self.task)[:80]!r}: use a built-in name or "
                              "'module:function'")
        if not isinstance(self.objective, str) or (
                self.objective and not self.objective.isidentifier()):
            raise ConfigError(f"objective {str(self.objective)[:80]!r} must be an output name")
        if not isinstance(self.space, str) or len(self.space) > MAX_SPACE_CHARS:
            raise ConfigError("space: the job's space definition is not a string of at most "
                              f"{MAX_SPACE_CHARS} characters")
        return self

    def validate(self) -> JobSpec:
        """`check`, the task's name, and the space (parsed; a file space's file read)."""
        self.check()
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
    def from_fields(cls, data: dict, run_id: str | None = None) -> JobSpec:
        """A spec from flat fields another process wrote (a broker hash or record), checked
        fully (`check`); ConfigError with the reason if it is malformed or, with `run_id`,
        if it is not that run's."""
        where = f"the job spec of run {run_id}" if run_id else "the job spec"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} is malformed: not a mapping")
        raw = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v
               for k, v in data.items()}
        kwargs: dict = {}
        try:
            for f in fields(cls):
                if f.name not in raw:
                    if f.name in ("run_id", "params", "chunk_size"):
                        raise ValueError(f"no {f.name}")
                    continue
                value = raw[f.name]
                value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                if f.name in ("params", "chunk_size", "workers", "max_attempts"):
                    value = strict_int(value, f.name)
                elif f.name == "work_ms":
                    value = strict_float(value, f.name)
                elif not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string, got {str(value)[:80]!r}")
                kwargs[f.name] = value
            spec = cls(**kwargs).check()
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{where} is malformed: {exc}") from None
        if run_id is not None and spec.run_id != run_id:
            raise ConfigError(f"{where} is malformed: it names run {spec.run_id!r}")
        return spec

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
