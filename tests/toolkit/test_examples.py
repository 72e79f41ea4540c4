"""Each example in examples/ through the README's command, on every backend:

    make demo TASK=... CODE=examples/... SPACE=examples/.../space.yml BACKEND=...

Its results.parquet must hold exactly one row per point, and the values must be those of the
task recomputed here for a sample of points.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .helpers import ROOT, Platform, free_port

EXAMPLES = {
    # name: (task, sample of point indices recomputed here, objective, tolerance)
    "oscillator": ("oscillator:run", [0, 17, 40, 71], "amplitude", 1e-9),
    "model_selection": ("wine_svm:score", [0, 12, 24], "accuracy", 1e-12),
}
CASES = [(name, backend) for name in EXAMPLES for backend in ("redis", "rabbitmq", "static")]


def rabbitmq_args() -> str:
    port = free_port()
    return (f" -e ttg_rabbitmq_port={port} -e ttg_rabbitmq_management_port={free_port()}"
            f" -e ttg_rabbitmq_dist_port={free_port()} -e ttg_rabbitmq_epmd_port={free_port()}"
            f" -e ttg_rabbitmq_nodename=ttg-test-{port}@localhost")


@pytest.mark.e2e
@pytest.mark.parametrize(("example", "backend"), CASES)
def test_example_runs_end_to_end(platform: Platform, example: str, backend: str) -> None:
    task, sample, objective, tol = EXAMPLES[example]
    code = ROOT / "examples" / example
    extra = rabbitmq_args() if backend == "rabbitmq" else ""
    result = platform.make(
        "demo", f"BACKEND={backend}", f"TASK={task}", f"CODE={code}",
        f"SPACE={code / 'space.yml'}", "CHUNK=4", "WORKERS=2", f"OBJECTIVE={objective}",
        f"ANSIBLE_ARGS={platform.ansible_args}{extra}", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((platform.runs_dir / "latest" / "summary.json").read_text())
    assert summary["ok"] and summary["task"] == task and summary["work_ms"] == 0
    res = summary["results"]
    n = summary["params"]
    assert res["rows"] == n and res["distinct_indices"] == n
    assert res["duplicate_rows"] == 0 and res["missing_indices"] == 0
    assert res["failed_points"] == 0 and res["objective"] == objective
    table = pq.read_table(res["path"]).sort_by("index")
    assert table["index"].to_pylist() == list(range(n))
    # the task recomputed here, in this process, for a sample of points
    sys.path.insert(0, str(code))
    try:
        module_name, fn_name = task.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        rows = table.to_pylist()
        axes = summary["space"]["names"]
        for i in sample:
            want = fn(**{a: rows[i][a] for a in axes})
            for key, value in want.items():
                if key == "fit_s":  # a time, not a result
                    continue
                assert rows[i][key] == pytest.approx(value, rel=tol, abs=tol), (i, key)
    finally:
        sys.path.remove(str(code))
    assert summary["result"]["count"] == n
    assert summary["result"]["sum"] == pytest.approx(sum(table[objective].to_pylist()))
    report = (platform.runs_dir / summary["run_id"] / "report.md").read_text()
    assert "### Best 10 points by" in report and "heatmap.png" in report


def test_examples_have_their_own_requirements_and_space() -> None:
    for name in EXAMPLES:
        d = ROOT / "examples" / name
        assert (d / "requirements.txt").read_text().strip()
        assert (d / "space.yml").is_file()
        assert Path(d / "README.md").is_file()
