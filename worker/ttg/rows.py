"""A chunk's execution and its per-point rows.

`run_chunk` calls the task once per point of [start, end) and keeps every point: its index, its
values, the task's outputs (a float becomes the output `value`; a dict of scalars gives one
output per key) and, for a point that raised, the error instead of the outputs. The rows of a
chunk travel as one Arrow IPC stream (`encode`/`decode`, pyarrow's own format) from the worker
to the controller, which stores them (`ttg.results`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ttg.partial import Partial
from ttg.spaces import Space
from ttg.tasks import Task

RESERVED = ("index", "attempts", "error")
MAX_ERROR = 500  # characters of a point's error kept in its row


@dataclass
class ChunkRun:
    start: int
    end: int
    attempt: int
    points: list[dict] | None  # None for the range space (the point is {"p": index})
    names: tuple[str, ...]
    outputs: list[Any] = field(default_factory=list)  # per point: float, dict, or None if failed
    errors: dict[int, str] = field(default_factory=dict)  # index -> "Type: message"

    @property
    def failed(self) -> int:
        return len(self.errors)

    def first_error(self) -> str | None:
        return next(iter(self.errors.values()), None)

    def partial(self, objective: str = "value") -> Partial:
        """count/sum/min/max of the objective output over the points that succeeded."""
        values = []
        for out in self.outputs:
            v = _objective_of(out, objective)
            if v is not None:
                values.append(v)
        return Partial.of(values)

    def table(self) -> pa.Table:
        n = self.end - self.start
        cols: dict[str, Any] = {"index": pa.array(range(self.start, self.end), pa.int64())}
        if self.points is None:
            cols["p"] = cols["index"]
        else:
            for name in self.names:
                cols[name] = [pt.get(name) for pt in self.points]
        keys: dict[str, None] = {}
        scalar = False
        for out in self.outputs:
            if isinstance(out, dict):
                keys.update(dict.fromkeys(out))
            elif out is not None:
                scalar = True
        if scalar:
            cols["value"] = pa.array([out if not isinstance(out, dict) else None
                                      for out in self.outputs], pa.float64())
        for key in keys:
            cols[key] = [out.get(key) if isinstance(out, dict) else None for out in self.outputs]
        cols["attempts"] = pa.array([self.attempt] * n, pa.int32())
        cols["error"] = pa.array([self.errors.get(i) for i in range(self.start, self.end)],
                                 pa.string())
        return pa.table(cols)


def _objective_of(out: Any, objective: str) -> float | None:
    if out is None:
        return None
    if isinstance(out, dict):
        v = out.get(objective)
        if v is None and objective == "value":
            v = next((x for x in out.values() if _is_number(x)), None)
        return float(v) if _is_number(v) else None
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _output(value: Any, names: tuple[str, ...]) -> Any:
    """A task's return value as an output: a float, or a dict of scalars; TypeError if not."""
    if isinstance(value, float):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise TypeError(f"output name {k!r} must be an identifier")
            if k in RESERVED or k in names:
                raise TypeError(f"output {k!r} has the name of a point value or results column")
            if v is not None and not isinstance(v, (str, int, float, bool)):
                raise TypeError(f"output {k!r} is a {type(v).__name__}; outputs are scalars "
                                "(str, int, float, bool, None)")
        return value
    raise TypeError(f"the task returned a {type(value).__name__}; return a number or a dict of "
                    "scalars")


def run_chunk(task: Task, space: Space, start: int, end: int, work_ms: float,
              attempt: int = 1) -> ChunkRun:
    """Run `task` over the points [start, end); sleep `work_ms` per point on a fixed deadline.
    A point that raises is kept with its error; the others are not affected."""
    points = None if space.kind == "range" else space.points(start, end)
    run = ChunkRun(start, end, attempt, points, space.names)
    step = work_ms / 1000.0
    t0 = time.monotonic()
    call, names, outputs, errors = task.call, space.names, run.outputs, run.errors
    for i in range(start, end):
        try:
            outputs.append(_output(call(i, None if points is None else points[i - start]), names))
        except Exception as exc:  # noqa: BLE001 - any task error is the point's failure
            outputs.append(None)
            errors[i] = f"{exc.__class__.__name__}: {exc}"[:MAX_ERROR]
        if step:
            delay = t0 + (i - start + 1) * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return run


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(payload: bytes) -> pa.Table:
    """A chunk's rows; ValueError if the payload is not an Arrow IPC stream."""
    try:
        return pa.ipc.open_stream(payload).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"not an Arrow IPC stream: {exc}") from None
