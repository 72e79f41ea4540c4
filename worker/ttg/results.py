"""The results dataset of a run: one row per point, kept exactly once.

While a run goes, the controller drains the rows in transit from the broker (`drain`): it
keeps the first copy per chunk, writes a batch of chunks as one Arrow IPC part file under
`runs/<id>/parts/` (written to a temporary name, fsynced, renamed), and only then deletes
those rows from the broker. A controller restarted mid-run finds the chunks its parts hold
(in each part's schema metadata) and skips their copies. At the end (`finish`) the parts are
compacted, streaming, into

    runs/<id>/results.parquet    index, the point's values, the outputs, attempts
    runs/<id>/failures.parquet   index, the point's values, attempts, error

and verified: every index 0..N-1 exactly once across the two files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ttg.errors import ConfigError
from ttg.rows import decode

log = logging.getLogger("ttg.results")
RESULTS = "results.parquet"
FAILURES = "failures.parquet"
META_KEY = b"ttg.chunks"
NOT_OUTPUTS = ("index", "attempts", "error")


class ResultsWriter:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.parts = run_dir / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.written: set[int] = set()
        self.bad: dict[int, str] = {}  # chunk -> why its rows could not be read
        self.count = 0
        for path in sorted(self.parts.glob("part-*.arrow")):
            with pa.memory_map(str(path)) as src:
                meta = pa.ipc.open_file(src).schema.metadata or {}
            self.written.update(json.loads(meta.get(META_KEY, b"[]")))
            self.count += 1

    def drain(self, backend: Any, run_id: str, budget_s: float = 0.5) -> int:
        """Store what the broker holds in transit (for at most about `budget_s`); returns
        the number of rows written."""
        t_end = time.monotonic() + budget_s
        rows = 0
        while True:
            items = backend.take_rows(run_id, 200)
            if not items:
                return rows
            tables, chunks = [], []
            for _token, chunk, payload in items:
                if chunk in self.written or chunk in chunks:
                    continue  # a redelivered chunk's copy: the first one is kept
                try:
                    tables.append(decode(payload))
                except ValueError as exc:
                    self.bad[chunk] = str(exc)
                    log.error("chunk %d: its rows are unreadable (%s)", chunk, exc)
                    continue
                chunks.append(chunk)
            if tables:
                rows += self._write(tables, chunks)
            backend.drop_rows(run_id, [token for token, _c, _p in items])
            if time.monotonic() > t_end:
                return rows

    def _write(self, tables: list[pa.Table], chunks: list[int]) -> int:
        table = pa.concat_tables(tables, promote_options="permissive")
        meta = {**(table.schema.metadata or {}), META_KEY: json.dumps(chunks).encode()}
        table = table.replace_schema_metadata(meta)
        self.count += 1
        path = self.parts / f"part-{self.count:06d}.arrow"
        tmp = path.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.written.update(chunks)
        return table.num_rows

    def finish(self, params: int, names: tuple[str, ...], objective: str = "") -> dict:
        """Compact the parts into results.parquet and failures.parquet, verify one row per
        index, and summarize the objective output; returns the summary's `results`."""
        parts = sorted(self.parts.glob("part-*.arrow"))
        schemas = [_read_schema(p) for p in parts]
        unified = (pa.unify_schemas(schemas, promote_options="permissive") if schemas
                   else pa.schema([("index", pa.int64()), ("attempts", pa.int32()),
                                   ("error", pa.string())]))
        unified = unified.remove_metadata()
        outputs = [f.name for f in unified if f.name not in (*NOT_OUTPUTS, *names)]
        res_schema = pa.schema([unified.field(n) for n in ("index", *names, *outputs,
                                                             "attempts")
                                if n in unified.names])
        fail_schema = pa.schema([unified.field(n) for n in ("index", *names, "attempts",
                                                              "error") if n in unified.names])
        objective = _pick_objective(res_schema, outputs, objective)
        seen = _Bitmap(params)
        stats = _Stats()
        rows = failed = 0
        errors: Counter[str] = Counter()
        res_tmp, fail_tmp = (self.run_dir / (n + ".tmp") for n in (RESULTS, FAILURES))
        with pq.ParquetWriter(res_tmp, res_schema) as rw, \
                pq.ParquetWriter(fail_tmp, fail_schema) as fw:
            for path in parts:
                table = _conform(_read_part(path), unified)
                seen.add(table["index"])
                ok_mask = pc.is_null(table["error"])
                good = table.filter(ok_mask).select(res_schema.names)
                bad = table.filter(pc.invert(ok_mask)).select(fail_schema.names)
                if good.num_rows:
                    rw.write_table(good)
                    if objective:
                        stats.add(good[objective])
                if bad.num_rows:
                    fw.write_table(bad)
                    _count_errors(errors, bad["error"])
                rows += good.num_rows
                failed += bad.num_rows
        for tmp in (res_tmp, fail_tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, tmp.with_suffix(""))
        for path in parts:
            path.unlink()
        self.parts.rmdir()
        return {
            "path": str(self.run_dir / RESULTS),
            "failures_path": str(self.run_dir / FAILURES),
            "rows": rows,
            "failed_points": failed,
            "distinct_indices": seen.distinct,
            "duplicate_rows": rows + failed - seen.distinct,
            "missing_indices": params - seen.distinct,
            "columns": res_schema.names,
            "objective": objective,
            "stats": stats.result(),
            "unreadable_chunks": sorted(self.bad),
            "top_errors": [{"error": e, "count": n} for e, n in errors.most_common(TOP_ERRORS)],
        }


TOP_ERRORS = 5
_MAX_DISTINCT_ERRORS = 10_000  # a message per point (with its values) must not grow without bound


def _count_errors(errors: Counter[str], column: pa.ChunkedArray) -> None:
    """Add the column's distinct error messages and their counts (pyarrow's value_counts)."""
    for item in pc.value_counts(column).to_pylist():
        key = item["values"]
        if key in errors or len(errors) < _MAX_DISTINCT_ERRORS:
            errors[key] += item["counts"]
        else:
            errors["(other errors)"] += item["counts"]


def _read_schema(path: Path) -> pa.Schema:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).schema


def _read_part(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with every column of `schema` (missing ones null), in its order and types."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table[field.name].cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _pick_objective(schema: pa.Schema, outputs: list[str], wanted: str) -> str | None:
    numeric = [n for n in outputs
               if pa.types.is_integer(schema.field(n).type)
               or pa.types.is_floating(schema.field(n).type)]
    if wanted:
        return wanted if wanted in numeric else None
    return "value" if "value" in numeric else (numeric[0] if numeric else None)


class _Bitmap:
    """Which indices 0..N-1 have a row (one byte per index; 10 MB for 10M points). With
    numpy (the controller's venv has it) the marking is vectorized; without it (the slim
    worker image) a plain loop does the same."""

    def __init__(self, n: int, vectorized: bool = True) -> None:
        self.seen = bytearray(n)
        self.distinct = 0
        self.n = n
        try:
            import numpy as np
        except ImportError:
            np = None  # noqa: N806
        self.np = np if vectorized else None

    def add(self, column: Any) -> None:
        if self.np is not None:
            np = self.np
            seen = np.frombuffer(self.seen, dtype=np.uint8)
            idx = pc.drop_null(column).to_numpy()
            idx = np.unique(idx[(idx >= 0) & (idx < self.n)])
            new = idx[seen[idx] == 0]
            seen[new] = 1
            self.distinct += len(new)
            return
        seen, n, new_count = self.seen, self.n, 0
        for i in column.to_pylist():
            if i is not None and 0 <= i < n and not seen[i]:
                seen[i] = 1
                new_count += 1
        self.distinct += new_count


class _Stats:
    """count/sum/min/max of a numeric column, summed exactly: math.fsum over the column's
    float64 buffer (pyarrow's public buffers), then over the per-batch sums."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: list[float] = []
        self.min = math.inf
        self.max = -math.inf

    def add(self, column: Any) -> None:
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        arr = arr.cast(pa.float64())
        arr = arr.filter(pc.fill_null(pc.is_finite(arr), False))
        if not len(arr):
            return
        values = memoryview(arr.buffers()[1]).cast("d")[arr.offset:arr.offset + len(arr)]
        self.count += len(arr)
        self.sums.append(math.fsum(values))
        mm = pc.min_max(arr).as_py()
        self.min = min(self.min, mm["min"])
        self.max = max(self.max, mm["max"])

    def result(self) -> dict:
        if not self.count:
            return {"count": 0, "sum": 0.0, "min": None, "max": None}
        return {"count": self.count, "sum": round(math.fsum(self.sums), 6),
                "min": self.min, "max": self.max}


def load_results(run_dir: str | Path, failures: bool = False) -> pa.Table:
    """A run's results (or its failed points) as a pyarrow Table sorted by index; pandas:
    `load_results(run_dir).to_pandas()`."""
    path = Path(run_dir) / (FAILURES if failures else RESULTS)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (is {run_dir} a finished run directory?)")
    return pq.read_table(path).sort_by("index")


def export(run_dir: Path, fmt: str, out: Path | None, failures: bool = False) -> Path:
    """Write a run's results as parquet, csv or jsonl (default: next to the run's files)."""
    table = load_results(run_dir, failures)
    stem = "failures" if failures else "results"
    out = out or run_dir / f"{stem}.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, out)
    elif fmt == "csv":
        from pyarrow import csv

        csv.write_csv(table, out)
    elif fmt == "jsonl":
        with open(out, "w") as f:
            for batch in table.to_batches(65536):
                for row in batch.to_pylist():
                    f.write(json.dumps(row, separators=(",", ":")) + "\n")
    else:
        raise ConfigError(f"unknown format {fmt!r}: use parquet, csv or jsonl")
    return out
