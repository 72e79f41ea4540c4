"""Parameter spaces, per-point rows and the results dataset: pure logic, no broker."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ttg.errors import ConfigError
from ttg.results import ResultsWriter, export, load_results
from ttg.rows import decode, encode, run_chunk
from ttg.spaces import MAX_POINTS, from_definition, load_space_file, parse_space, range_space
from ttg.sweep import JobSpec, reference_value
from ttg.tasks import load_task

BIN = Path(sys.executable).parent


def grid(**axes):
    return parse_space({"type": "grid", "axes": axes})


def test_grid_is_the_cartesian_product_in_order():
    s = grid(a=[1, 2, 3], b=["x", "y"], c={"start": 0, "stop": 1, "step": 0.25})
    assert s.size == 3 * 2 * 4 and s.names == ("a", "b", "c")
    expected = [dict(zip("abc", t, strict=True))
                for t in itertools.product([1, 2, 3], ["x", "y"], [0, 0.25, 0.5, 0.75])]
    assert [s.point(i) for i in range(s.size)] == expected
    assert s.points(5, 9) == expected[5:9]


def test_grid_axes_linspace_logspace_and_integer_ranges():
    s = grid(lin={"linspace": [0, 1, 5]}, log={"logspace": [-2, 1, 4]},
             n={"start": 2, "stop": 11, "step": 3})
    lin = [s.point(i)["lin"] for i in range(0, s.size, 12)]
    assert lin == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [s.point(i)["log"] for i in range(0, 12, 3)] == pytest.approx([0.01, 0.1, 1, 10])
    assert [s.point(i)["n"] for i in range(3)] == [2, 5, 8]


def test_a_ten_million_point_grid_costs_nothing_to_define_and_decodes_anywhere():
    s = grid(a={"start": 0, "stop": 1000}, b={"start": 0, "stop": 100},
             c={"start": 0, "stop": 100})
    assert s.size == 10_000_000
    assert s.point(9_999_999) == {"a": 999, "b": 99, "c": 99}
    assert s.point(1_234_567) == {"a": 123, "b": 45, "c": 67}
    assert len(s.definition) < 10_000


def test_random_space_is_reproducible_across_processes():
    data = {"type": "random", "params": 50, "seed": 7,
            "axes": {"lr": {"loguniform": [1e-4, 1e-1]}, "depth": {"randint": [1, 9]},
                     "opt": {"choice": ["adam", "sgd"]}, "x": {"normal": [0, 1]},
                     "u": {"uniform": [-1, 1]}}}
    s = parse_space(data)
    here = [s.point(i) for i in range(50)]
    code = ("import json,sys; from ttg.spaces import from_definition; "
            "s = from_definition(sys.argv[1]); print(json.dumps([s.point(i) for i in range(50)]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code, s.definition],
                                      capture_output=True, text=True, check=True).stdout)
    assert here == there
    assert all(1e-4 <= p["lr"] <= 1e-1 and 1 <= p["depth"] < 9 and -1 <= p["u"] <= 1
               for p in here)
    assert {p["opt"] for p in here} == {"adam", "sgd"}
    other = parse_space({**data, "seed": 8})
    assert [other.point(i) for i in range(50)] != here


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_file_space_rows_are_points(tmp_path, fmt):
    rows = [{"a": i, "b": i * 0.5, "name": f"n{i}"} for i in range(10)]
    path = tmp_path / f"points.{fmt}"
    if fmt == "csv":
        path.write_text("a,b,name\n" + "".join(f"{r['a']},{r['b']},{r['name']}\n"
                                               for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    spec = tmp_path / "space.yml"
    spec.write_text(f"type: file\npath: points.{fmt}\n")  # relative to the space file
    s = load_space_file(spec)
    assert s.size == 10 and s.names == ("a", "b", "name")
    assert s.point(3) == rows[3] and s.points(8, 10) == rows[8:]
    again = from_definition(s.definition)  # what a worker decodes from the job spec
    assert again.point(9) == rows[9]
    path.write_bytes(path.read_bytes() + b"\n")  # changed after submission: refused
    from_definition.cache_clear()
    with pytest.raises(ConfigError, match="changed since the run was submitted"):
        from_definition(s.definition)


def test_a_million_row_parquet_file_space(tmp_path):
    n = 1_000_000
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"x": pa.array(range(n), pa.int64()),
                             "y": pa.array([i * 0.001 for i in range(n)])}), path)
    s = parse_space({"type": "file", "path": str(path)})
    assert s.size == n
    assert s.point(n - 1) == {"x": n - 1, "y": pytest.approx((n - 1) * 0.001)}
    assert [p["x"] for p in s.points(500_000, 500_003)] == [500_000, 500_001, 500_002]


@pytest.mark.parametrize("data,message", [
    ({"type": "cube"}, "unknown type 'cube'"),
    ({"type": "grid", "axes": {"a": []}}, "axis 'a': is empty"),
    ({"type": "grid", "axes": {}}, "needs 'axes'"),
    ({"type": "grid", "axes": {"a": {"start": 0, "stop": 5, "step": 0}}}, "step must not be 0"),
    ({"type": "grid", "axes": {"a": {"linspace": [0, 1]}}}, "linspace takes"),
    ({"type": "grid", "axes": {"a": {"bogus": 1}}}, "an axis is a list"),
    ({"type": "grid", "axes": {"a": [[1, 2]]}}, "values must be strings"),
    ({"type": "grid", "axes": {"index": [1]}}, "reserved"),
    ({"type": "grid", "axes": {"1a": [1]}}, "must be an identifier"),
    ({"type": "grid", "axes": {f"a{i}": {"start": 0, "stop": 1 << 14} for i in range(4)}},
     "more than 2^53"),
    ({"type": "range", "params": MAX_POINTS + 1}, "more than 2^53"),
    ({"type": "range", "params": 0}, "positive integer"),
    ({"type": "random", "params": 5, "axes": {"a": {"uniform": [1, 0]}}}, "low < high"),
    ({"type": "random", "params": 5, "axes": {"a": {"gamma": [1, 2]}}}, "random axis is one"),
    ({"type": "file", "path": "/nonexistent/points.csv"}, "no such file"),
    ({"type": "file", "path": "/tmp/points.xlsx"}, "unknown format"),
    ({"type": "grid", "axes": {"a": [1]}, "extra": 1}, "unknown key"),
    ([1, 2], "expected a mapping"),
])
def test_bad_spaces_are_one_clear_line(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        parse_space(data)
    assert "\n" not in str(exc.value)


def test_a_file_that_does_not_parse_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ConfigError, match="does not parse as jsonl"):
        parse_space({"type": "file", "path": str(bad)})
    spec = tmp_path / "space.yml"
    spec.write_text("type: grid\naxes: [oops\n")
    r = subprocess.run([BIN / "ttg", "validate", "--space", str(spec)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"ttg: error: --space {spec}: ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_validate_imports_the_task_from_code_and_reports_the_space(tmp_path):
    (tmp_path / "mymod.py").write_text("def run(a, b):\n    return {'s': a + b}\n")
    spec = tmp_path / "space.yml"
    spec.write_text("type: grid\naxes:\n  a: [1, 2]\n  b: [10, 20, 30]\n")
    r = subprocess.run([BIN / "ttg", "validate", "--space", str(spec), "--task", "mymod:run",
                        "--code", str(tmp_path), "--chunk-size", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "grid space of 6 points, 3 chunks" in r.stdout
    r = subprocess.run([BIN / "ttg", "validate", "--task", "mymod:run"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 2 and "cannot import module 'mymod'" in r.stderr


# ---- tasks and rows ---------------------------------------------------------------------


def test_tasks_take_a_point_by_name_as_a_dict_or_as_the_old_index(tmp_path, monkeypatch):
    (tmp_path / "t.py").write_text(
        "def kw(a, b=0):\n    return a * 10 + b\n"
        "def whole(point):\n    return {'n': len(point), 'a': point['a']}\n"
        "def old(i):\n    return i * 2.0\n"
        "def star(**pt):\n    return sum(pt.values())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = grid(a=[1, 2], b=[3, 4])
    assert load_task("t:kw", g.names, g.kind).call(1, g.point(1)) == 14
    assert load_task("t:whole", g.names, g.kind).call(0, g.point(0)) == {"n": 2, "a": 1}
    assert load_task("t:star", g.names, g.kind).call(3, g.point(3)) == 6
    r = range_space(10)
    assert load_task("t:old", r.names, r.kind).call(4, None) == 8.0
    assert load_task("reference", r.names, r.kind).call(7, None) == reference_value(7)


def test_run_chunk_keeps_every_point_with_its_outputs_or_its_error(tmp_path, monkeypatch):
    (tmp_path / "u.py").write_text(
        "def f(a, b):\n"
        "    if a == 2 and b == 'y':\n        raise RuntimeError('bad point')\n"
        "    if a == 3:\n        return [1]\n"
        "    return {'score': a * 1.5, 'label': b, 'big': a > 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = grid(a=[1, 2, 3], b=["x", "y"])
    run = run_chunk(load_task("u:f", g.names, g.kind), g, 0, 6, work_ms=0, attempt=2)
    assert run.failed == 3
    t = decode(encode(run.table())).to_pydict()
    assert t["index"] == list(range(6)) and t["a"] == [1, 1, 2, 2, 3, 3]
    assert t["score"] == [1.5, 1.5, 3.0, None, None, None]
    assert t["label"] == ["x", "y", "x", None, None, None]
    assert t["attempts"] == [2] * 6
    assert t["error"][:3] == [None, None, None]
    assert t["error"][3] == "RuntimeError: bad point"
    assert "returned a list" in t["error"][4]
    assert run.partial("score").count == 3 and run.partial("score").sum == 6.0


def test_an_output_named_like_a_point_value_fails_the_point(tmp_path, monkeypatch):
    (tmp_path / "v.py").write_text("def f(a):\n    return {'a': 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = grid(a=[1])
    run = run_chunk(load_task("v:f", g.names, g.kind), g, 0, 1, work_ms=0)
    assert run.failed == 1 and "name of a point value" in run.first_error()


def test_decode_refuses_what_is_not_arrow():
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        decode(b"\x00garbage")


# ---- the results dataset ----------------------------------------------------------------


class Transit:
    """Rows in transit as a broker would hand them over: (token, chunk, payload)."""

    def __init__(self, items):
        self.items = list(items)
        self.dropped = []

    def take_rows(self, _run_id, limit=200):
        return self.items[:limit]

    def drop_rows(self, _run_id, tokens):
        self.dropped += tokens
        self.items = [i for i in self.items if i[0] not in tokens]


def chunk_payload(space, task, spec, k, attempt=1):
    return encode(run_chunk(task, space, *spec.bounds(k), work_ms=0, attempt=attempt).table())


def test_the_writer_keeps_one_copy_per_chunk_and_survives_a_restart(tmp_path):
    spec = JobSpec("r", 1000, 10)
    space, task = range_space(1000), load_task("reference")
    payloads = {k: chunk_payload(space, task, spec, k) for k in range(100)}
    first = Transit([(f"t{k}", k, payloads[k]) for k in range(60)]
                    + [("dup3", 3, payloads[3])])  # a redelivered chunk's copy
    w = ResultsWriter(tmp_path)
    assert w.drain(first, "r") == 600
    assert first.items == [] and "dup3" in first.dropped
    # a controller restarted mid-run: the broker gives back rows it already stored
    w2 = ResultsWriter(tmp_path)
    assert w2.written == set(range(60))
    again = Transit([(f"u{k}", k, payloads[k]) for k in range(50, 100)])
    assert w2.drain(again, "r") == 400
    info = w2.finish(1000, ("p",))
    assert info["rows"] == 1000 and info["distinct_indices"] == 1000
    assert info["duplicate_rows"] == 0 and info["missing_indices"] == 0
    assert info["stats"] == {"count": 1000, "sum": 500035.5, "min": 0.41, "max": 999.98}
    table = load_results(tmp_path)
    assert table["index"].to_pylist() == list(range(1000))
    assert table["value"].to_pylist() == [reference_value(p) for p in range(1000)]
    assert not (tmp_path / "parts").exists()


def test_the_writer_counts_missing_indices_and_splits_failures(tmp_path):
    g = grid(a=list(range(10)))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "w.py").write_text(
        "def f(a):\n    if a == 4:\n        raise ValueError('four')\n    return a / 2\n")
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        task = load_task("w:f", g.names, g.kind)
        spec = JobSpec("r", 10, 5, space=g.definition)
        src = Transit([("a", 0, chunk_payload(g, task, spec, 0, attempt=5))])
        w = ResultsWriter(tmp_path / "run")
        w.drain(src, "r")
        info = w.finish(10, g.names)
    finally:
        sys.path.remove(str(tmp_path / "code"))
    assert info["rows"] == 4 and info["failed_points"] == 1 and info["missing_indices"] == 5
    failed = load_results(tmp_path / "run", failures=True).to_pylist()
    assert failed == [{"index": 4, "a": 4, "attempts": 5, "error": "ValueError: four"}]
    out = export(tmp_path / "run", "csv", None)
    lines = out.read_text().splitlines()
    assert lines[0] == '"index","a","value","attempts"' and len(lines) == 5
    out = export(tmp_path / "run", "jsonl", tmp_path / "r.jsonl")
    assert json.loads(out.read_text().splitlines()[0]) == {"index": 0, "a": 0, "value": 0.0,
                                                           "attempts": 5}


def test_chunks_with_different_output_types_are_unified(tmp_path):
    ints = pa.table({"index": pa.array([0, 1], pa.int64()), "p": pa.array([0, 1], pa.int64()),
                     "n": pa.array([1, 2], pa.int64()), "attempts": pa.array([1, 1], pa.int32()),
                     "error": pa.array([None, None], pa.string())})
    floats = pa.table({"index": pa.array([2], pa.int64()), "p": pa.array([2], pa.int64()),
                       "n": pa.array([2.5]), "extra": pa.array(["e"]),
                       "attempts": pa.array([1], pa.int32()),
                       "error": pa.array([None], pa.string())})
    w = ResultsWriter(tmp_path)
    w.drain(Transit([("a", 0, encode(ints)), ("b", 1, encode(floats))]), "r")
    info = w.finish(3, ("p",))
    t = load_results(tmp_path)
    assert t.schema.field("n").type == pa.float64()
    assert t["n"].to_pylist() == [1.0, 2.0, 2.5] and t["extra"].to_pylist() == [None, None, "e"]
    assert info["objective"] == "n" and math.isclose(info["stats"]["sum"], 5.5)


def test_the_vectorized_index_check_and_the_plain_one_agree():
    from ttg.results import _Bitmap, _Stats

    cols = [pa.array([0, 1, 2, 2, 7, -1, 99, None], pa.int64()), pa.array([3, 2, 9], pa.int64())]
    fast, plain = _Bitmap(10), _Bitmap(10, vectorized=False)
    for col in cols:
        fast.add(col)
        plain.add(col)
    assert fast.distinct == plain.distinct == 6
    assert fast.seen == plain.seen
    st = _Stats()
    st.add(pa.chunked_array([[0.1] * 10, [None, float("nan"), 0.2]]).slice(1))
    assert st.result() == {"count": 10, "sum": 1.1, "min": 0.1, "max": 0.2}
