"""Parameter spaces: map a point index 0..N-1 to a point (a dict of named values).

A chunk message stays a few integers whatever the space: every worker decodes the points of
its index range itself, from the space definition carried in the job spec.

    range   {"type": "range", "params": N}                     -> {"p": i}
    grid    {"type": "grid", "axes": {name: axis, ...}}         cartesian product, mixed radix
            axis: [v, ...] | {start, stop, step} | {linspace: [a, b, n]} | {logspace: [a, b, n]}
    file    {"type": "file", "path": FILE}                      one point per row (CSV, JSONL,
                                                                Parquet), read with pyarrow
    random  {"type": "random", "params": N, "seed": S, "axes": {name: dist, ...}}
            dist: {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {normal: [mu, sigma]}
                  | {randint: [lo, hi]} (hi exclusive) | {choice: [v, ...]}

The first axis of a grid varies slowest (like nested for-loops, `itertools.product`). A random
point depends only on (seed, index), so any worker computes the same point for an index.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttg.errors import ConfigError

MAX_POINTS = 2**53  # indices stay exact in a float64 and in every JSON reader
Scalar = str | int | float | bool | None
SPACE_TYPES = ("range", "grid", "file", "random")
DISTRIBUTIONS = ("uniform", "loguniform", "normal", "randint", "choice")
FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def _fail(where: str, msg: str) -> ConfigError:
    return ConfigError(f"space {where}: {msg}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, f"expected a finite number, got {value!r}")
    return value


def _scalar(value: Any, where: str) -> Scalar:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _fail(where, f"values must be strings, numbers, booleans or null, got {value!r}")


def _axis_values(name: str, axis: Any) -> list[Scalar]:
    where = f"axis {name!r}"
    if isinstance(axis, list):
        values = [_scalar(v, where) for v in axis]
    elif isinstance(axis, Mapping) and set(axis) <= {"start", "stop", "step"} and "stop" in axis:
        start = _number(axis.get("start", 0), where)
        stop = _number(axis["stop"], where)
        step = _number(axis.get("step", 1), where)
        if step == 0:
            raise _fail(where, "step must not be 0")
        n = max(0, math.ceil((stop - start) / step))
        if n > MAX_POINTS:
            raise _fail(where, f"{n} values is more than 2^53")
        ints = all(isinstance(v, int) for v in (start, stop, step))
        values = [start + i * step if ints else round(start + i * step, 12) for i in range(n)]
    elif isinstance(axis, Mapping) and len(axis) == 1 and next(iter(axis)) in ("linspace",
                                                                              "logspace"):
        kind, spec = next(iter(axis.items()))
        if not (isinstance(spec, list) and len(spec) == 3):
            raise _fail(where, f"{kind} takes [start, stop, count], got {spec!r}")
        a, b = _number(spec[0], where), _number(spec[1], where)
        n = spec[2]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _fail(where, f"{kind} count must be a positive integer, got {n!r}")
        lin = [a + (b - a) * i / (n - 1) if n > 1 else a for i in range(n)]
        values = lin if kind == "linspace" else [10.0 ** x for x in lin]
    else:
        raise _fail(where, "an axis is a list of values, {start, stop, step}, "
                           f"{{linspace: [a, b, n]}} or {{logspace: [a, b, n]}}; got {axis!r}")
    if not values:
        raise _fail(where, "is empty")
    return values


def _check_name(name: Any, names: list[str]) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"space: axis name {name!r} must be an identifier (letters, digits, _)")
    if name in ("index", "attempts", "error"):
        raise ConfigError(f"space: axis name {name!r} is reserved for the results columns")
    if name in names:
        raise ConfigError(f"space: axis {name!r} is given twice")
    return name


def _check_dist(name: str, dist: Any) -> tuple[str, list]:
    where = f"axis {name!r}"
    if not (isinstance(dist, Mapping) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
        raise _fail(where, f"a random axis is one of {', '.join(DISTRIBUTIONS)} "
                           f"(e.g. {{uniform: [0, 1]}}), got {dist!r}")
    kind, args = next(iter(dist.items()))
    if not isinstance(args, list) or not args:
        raise _fail(where, f"{kind} takes a list of arguments, got {args!r}")
    if kind == "choice":
        return kind, [_scalar(v, where) for v in args]
    if len(args) != 2:
        raise _fail(where, f"{kind} takes two numbers, got {args!r}")
    lo, hi = _number(args[0], where), _number(args[1], where)
    if kind == "randint" and not all(isinstance(v, int) for v in (lo, hi)):
        raise _fail(where, "randint takes two integers [low, high)")
    if kind in ("uniform", "randint") and not lo < hi:
        raise _fail(where, f"{kind} needs low < high, got {args!r}")
    if kind == "loguniform" and not 0 < lo < hi:
        raise _fail(where, f"loguniform needs 0 < low < high, got {args!r}")
    if kind == "normal" and hi < 0:
        raise _fail(where, "normal needs a standard deviation >= 0")
    return kind, [lo, hi]


@dataclass(frozen=True)
class Space:
    """A validated space. `definition` is its canonical JSON form (what the job spec carries)."""

    kind: str
    size: int
    names: tuple[str, ...]
    definition: str
    _axes: tuple[tuple[Scalar, ...], ...] = ()
    _dists: tuple[tuple[str, tuple], ...] = ()
    _seed: int = 0
    _rows: Any = None  # file space: the pyarrow Table, loaded on first use

    # ---- decoding ---------------------------------------------------------------------
    def point(self, index: int) -> dict[str, Scalar]:
        if not 0 <= index < self.size:
            raise IndexError(f"point {index} outside 0..{self.size - 1}")
        if self.kind == "range":
            return {"p": index}
        if self.kind == "grid":
            out: dict[str, Scalar] = {}
            rest = index
            for name, values in zip(reversed(self.names), reversed(self._axes), strict=False):
                rest, digit = divmod(rest, len(values))
                out[name] = values[digit]
            return {n: out[n] for n in self.names}
        if self.kind == "random":
            rng = random.Random(f"{self._seed}:{index}")
            return {name: _sample(rng, kind, args)
                    for name, (kind, args) in zip(self.names, self._dists, strict=False)}
        return self.rows().slice(index, 1).to_pylist()[0]

    def points(self, start: int, end: int) -> list[dict[str, Scalar]]:
        """The points of [start, end), in order."""
        if self.kind == "file":
            return self.rows().slice(start, end - start).to_pylist()
        return [self.point(i) for i in range(start, end)]

    def rows(self) -> Any:
        """File space: every row as a pyarrow Table (read once per process)."""
        if self._rows is None:
            info = json.loads(self.definition)
            object.__setattr__(self, "_rows", read_table(Path(info["path"]), info["sha256"]))
        return self._rows


def _sample(rng: random.Random, kind: str, args: tuple) -> Scalar:
    if kind == "uniform":
        return rng.uniform(args[0], args[1])
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    if kind == "normal":
        return rng.gauss(args[0], args[1])
    if kind == "randint":
        return rng.randrange(int(args[0]), int(args[1]))
    return args[rng.randrange(len(args))]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_table(path: Path, sha256: str | None = None) -> Any:
    """A space file as a pyarrow Table; a clear ConfigError if it is missing or does not parse
    (or, given `sha256`, is not the file the run was submitted with)."""
    import pyarrow as pa

    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"space file {path}: unknown format {path.suffix!r}; "
                          f"use {', '.join(FILE_FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"space file {path}: no such file")
    if sha256 is not None and file_digest(path) != sha256:
        raise ConfigError(f"space file {path}: its content changed since the run was submitted")
    try:
        if fmt == "csv":
            from pyarrow import csv
            table = csv.read_csv(path)
        elif fmt == "jsonl":
            from pyarrow import json as pajson
            table = pajson.read_json(path)
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"space file {path}: does not parse as {fmt}: {first}") from None
    if table.num_rows == 0:
        raise ConfigError(f"space file {path}: has no rows")
    for field in table.schema:
        _check_name(field.name, [])
        t = field.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise ConfigError(f"space file {path}: column {field.name!r} is {t}; a point's "
                              "values must be strings, numbers or booleans")
    return table


def range_space(params: int) -> Space:
    return parse_space({"type": "range", "params": params})


def parse_space(data: Any, base_dir: Path | None = None) -> Space:
    """Validate a space definition (the parsed YAML/JSON); ConfigError with one clear line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"space: expected a mapping with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if kind not in SPACE_TYPES:
        raise ConfigError(f"space: unknown type {kind!r}; use one of {', '.join(SPACE_TYPES)}")
    allowed = {"range": {"type", "params"}, "grid": {"type", "axes"},
               "file": {"type", "path"}, "random": {"type", "params", "seed", "axes"}}[kind]
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(f"space: unknown key(s) {', '.join(map(str, extra))} for a {kind} "
                          f"space (allowed: {', '.join(sorted(allowed))})")
    if kind in ("range", "random"):
        n = data.get("params")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"space: params must be a positive integer, got {n!r}")
        if n > MAX_POINTS:
            raise ConfigError(f"space: {n} points is more than 2^53")
        if kind == "range":
            return Space("range", n, ("p",), _canonical({"type": "range", "params": n}))
    if kind in ("grid", "random"):
        axes = data.get("axes")
        if not isinstance(axes, Mapping) or not axes:
            raise ConfigError(f"space: a {kind} space needs 'axes', a mapping of name -> axis")
        names: list[str] = []
        for name in axes:
            names.append(_check_name(name, names))
    if kind == "grid":
        values = [tuple(_axis_values(name, axes[name])) for name in names]
        size = math.prod(len(v) for v in values)
        if size > MAX_POINTS:
            raise ConfigError(f"space: the grid has {size} points, more than 2^53")
        canon = {"type": "grid", "axes": {n: list(v)
                                          for n, v in zip(names, values, strict=True)}}
        return Space("grid", size, tuple(names), _canonical(canon), _axes=tuple(values))
    if kind == "random":
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"space: seed must be an integer, got {seed!r}")
        dists = [_check_dist(name, axes[name]) for name in names]
        canon = {"type": "random", "params": n, "seed": seed,
                 "axes": {name: {k: a}
                          for name, (k, a) in zip(names, dists, strict=True)}}
        return Space("random", n, tuple(names), _canonical(canon),
                     _dists=tuple((k, tuple(a)) for k, a in dists), _seed=seed)
    raw = data.get("path")
    if not isinstance(raw, str) or not raw:
        raise ConfigError("space: a file space needs 'path', the CSV, JSONL or Parquet file")
    path = Path(raw)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    path = path.resolve()
    table = read_table(path)
    canon = {"type": "file", "path": str(path), "sha256": file_digest(path)}
    return Space("file", table.num_rows, tuple(table.column_names), _canonical(canon),
                 _rows=table)


def load_space_file(path: Path) -> Space:
    """A space from a YAML or JSON file (`--space FILE`); a file space's relative path is
    relative to the space file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--space {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--space {path}: does not parse: {first}") from None
    return parse_space(data, base_dir=path.parent.resolve())


@functools.lru_cache(maxsize=4)
def from_definition(definition: str) -> Space:
    """The space of a job spec (its canonical JSON), as a worker decodes it."""
    try:
        data = json.loads(definition)
    except ValueError:
        raise ConfigError(f"space: the job's space is not JSON: {definition[:80]!r}") from None
    if isinstance(data, Mapping) and data.get("type") == "file":
        info = {k: data.get(k) for k in ("path", "sha256")}
        if not all(isinstance(v, str) for v in info.values()):
            raise ConfigError("space: the job's file space needs a path and a sha256")
        path = Path(info["path"])
        table = read_table(path, info["sha256"])
        return Space("file", table.num_rows, tuple(table.column_names),
                     _canonical({"type": "file", **info}), _rows=table)
    return parse_space(data)


def _canonical(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=False)
