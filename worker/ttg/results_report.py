"""The report's "what the sweep computed" part, from runs/<id>/results.parquet only.

- the best k points for an objective output (min or max),
- the distribution of each numeric output (a table and histograms),
- for a grid of two or more axes, a heatmap of the objective over the two axes that explain
  most of its variance (the share of the objective's variance between the axis' groups,
  eta squared), averaged over the other axes.

Columns are read with pyarrow; plots with matplotlib (Agg) like the rest of the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ttg.results import FAILURES, RESULTS

MAX_OUTPUTS = 8  # numeric outputs shown in the distribution section
BEST_K = 10


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def analyse(run_dir: Path, summary: dict, objective: str | None = None,
            goal: str = "min", k: int = BEST_K) -> dict | None:
    """What the plots and the markdown show; None when the run has no results file."""
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    table = pq.read_table(path)
    space = _space_of(summary)
    names = [n for n in space.get("names", []) if n in table.column_names]
    outputs = [f.name for f in table.schema
               if f.name not in ("index", "attempts", *names) and _numeric(f.type)]
    objective = objective or (summary.get("results") or {}).get("objective") or (
        outputs[0] if outputs else None)
    data: dict[str, Any] = {"rows": table.num_rows, "objective": objective, "goal": goal,
                            "axes": names, "outputs": {}, "best": [], "heatmap": None}
    failures = run_dir / FAILURES
    data["failed"] = pq.read_metadata(failures).num_rows if failures.is_file() else 0
    if failures.is_file() and data["failed"]:
        errs = pq.read_table(failures, columns=["error"])["error"]
        counts = pc.value_counts(errs).to_pylist()
        data["errors"] = sorted(({"error": c["values"], "points": c["counts"]}
                                 for c in counts), key=lambda e: -e["points"])[:5]
    for name in outputs[:MAX_OUTPUTS]:
        col = table[name].cast(pa.float64())
        valid = pc.drop_null(col)
        if len(valid) == 0:
            continue
        q = pc.quantile(valid, q=[0.0, 0.5, 1.0]).to_pylist()
        data["outputs"][name] = {
            "count": len(valid), "mean": pc.mean(valid).as_py(),
            "std": pc.stddev(valid).as_py() if len(valid) > 1 else 0.0,
            "min": q[0], "p50": q[1], "max": q[2],
        }
    if objective and objective in table.column_names:
        valid = table.filter(pc.is_valid(table[objective]))
        order = "ascending" if goal == "min" else "descending"
        idx = pc.select_k_unstable(valid, k=min(k, valid.num_rows),
                                   sort_keys=[(objective, order)])
        best = valid.take(idx).select(["index", *names, *[o for o in outputs
                                                         if o in data["outputs"]]])
        data["best"] = best.to_pylist()
        if len(names) >= 2 and space.get("kind") == "grid":
            data["heatmap"] = _heatmap(valid, names, objective)
    return data


def _space_of(summary: dict) -> dict:
    """Axis names and kind of the run's space, from its summary (`space`)."""
    sp = summary.get("space") or {}
    return {"kind": sp.get("type", "range"), "names": list(sp.get("names", ["p"]))}


def _eta_squared(table: pa.Table, axis: str, objective: str) -> float:
    """Share of the objective's variance explained by grouping on `axis`."""
    y = table[objective].cast(pa.float64())
    mean = pc.mean(y).as_py()
    total = pc.sum(pc.power(pc.subtract(y, mean), 2)).as_py() or 0.0
    if not total:
        return 0.0
    g = table.group_by(axis).aggregate([(objective, "mean"), (objective, "count")])
    between = sum(n * (m - mean) ** 2 for m, n in zip(g[f"{objective}_mean"].to_pylist(),
                                                       g[f"{objective}_count"].to_pylist(),
                                                       strict=True))
    return between / total


def _heatmap(table: pa.Table, names: list[str], objective: str) -> dict:
    share = {a: _eta_squared(table, a, objective) for a in names}
    a, b = sorted(names, key=lambda n: -share[n])[:2]
    g = table.group_by([a, b]).aggregate([(objective, "mean")])
    xs = sorted(set(g[b].to_pylist()), key=_sort_key)
    ys = sorted(set(g[a].to_pylist()), key=_sort_key)
    cell = {(r[a], r[b]): r[f"{objective}_mean"] for r in g.to_pylist()}
    grid = [[cell.get((y, x)) for x in xs] for y in ys]
    return {"x": b, "y": a, "x_values": xs, "y_values": ys, "values": grid,
            "variance_share": {n: round(v, 4) for n, v in share.items()}}


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def plot(data: dict, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made = []
    outs = list(data["outputs"])
    if outs:
        cols = min(3, len(outs))
        rows = math.ceil(len(outs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        table = pq.read_table(run_dir / RESULTS, columns=outs)
        for ax, name in zip(axes.flat, outs, strict=False):
            vals = table[name].cast(pa.float64()).drop_null().to_numpy()
            ax.hist(vals, bins=min(50, max(5, int(math.sqrt(len(vals))))), color="tab:blue")
            ax.set_title(name)
        for ax in list(axes.flat)[len(outs):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(run_dir / "outputs.png", dpi=90)
        plt.close(fig)
        made.append("outputs.png")
    hm = data.get("heatmap")
    if hm:
        values = np.array([[np.nan if v is None else v for v in row] for row in hm["values"]])
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(hm["x_values"]),
                                        1.2 + 0.4 * len(hm["y_values"])))
        im = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(hm["x_values"])), [_label(v) for v in hm["x_values"]],
                      rotation=45, ha="right")
        ax.set_yticks(range(len(hm["y_values"])), [_label(v) for v in hm["y_values"]])
        ax.set_xlabel(hm["x"])
        ax.set_ylabel(hm["y"])
        ax.set_title(f"mean {data['objective']}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(run_dir / "heatmap.png", dpi=90)
        plt.close(fig)
        made.append("heatmap.png")
    return made


def _label(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render(data: dict, plots: list[str]) -> list[str]:
    lines = ["## Results", "",
             f"{data['rows']:,} points with a result in `results.parquet`, "
             f"{data['failed']:,} failed in `failures.parquet` "
             "(`ttg results RUN --format csv`, or `ttg.load_results(run_dir).to_pandas()`).",
             ""]
    for e in data.get("errors", []):
        lines.append(f"- {e['points']:,} point(s): `{e['error'][:200]}`")
    if data.get("errors"):
        lines.append("")
    if data["best"]:
        cols = list(data["best"][0])
        lines += [f"### Best {len(data['best'])} points by {data['objective']} "
                  f"({data['goal']})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in data["best"]]
        lines.append("")
    if data["outputs"]:
        lines += ["### Outputs", ""]
        lines += ["![outputs](outputs.png)", ""] if "outputs.png" in plots else []
        lines += ["| output | count | mean | std | min | median | max |",
                  "|---|---|---|---|---|---|---|"]
        for name, st in data["outputs"].items():
            lines.append(f"| {name} | {st['count']:,} | " + " | ".join(
                _cell(st[k]) for k in ("mean", "std", "min", "p50", "max")) + " |")
        lines.append("")
    hm = data.get("heatmap")
    if hm:
        share = ", ".join(f"{n} {v:.0%}" for n, v in hm["variance_share"].items())
        lines += [f"### {data['objective']} over {hm['y']} × {hm['x']}", ""]
        lines += ["![heatmap](heatmap.png)", ""] if "heatmap.png" in plots else []
        lines += [f"The two axes that explain most of the variance of {data['objective']} "
                  f"(share of variance between each axis' values: {share}); each cell is the "
                  "mean over the other axes.", ""]
    return lines
