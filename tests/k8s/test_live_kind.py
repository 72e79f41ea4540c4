"""End to end on a live Kind cluster: kind_cluster (cluster + image), then k8s_app's backend,
fleet and sweep stages for each backend, and the summary read back into runs/<run_id>/.

Runs only where Docker, kind and the pinned node image are present (a developer machine):
    TTG_LIVE_KIND=1 pytest tests/k8s/test_live_kind.py
It deletes the cluster it made at the end (TTG_LIVE_KIND_KEEP=1 keeps it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from .helpers import BACKENDS, ROOT, run, tool

pytestmark = pytest.mark.live
CLUSTER = yaml.safe_load(
    (ROOT / "inventories/kind/group_vars/all/cluster.yml").read_text()
)


def _why_not() -> str | None:
    if not shutil.which("kind"):
        return (
            "kind is not installed (a live cluster needs Docker + kind + a node image)"
        )
    if (
        not shutil.which("docker")
        or run(["docker", "info"], timeout=30).returncode != 0
    ):
        return "no Docker daemon reachable (a live cluster needs Docker + kind)"
    image = CLUSTER["ttg_kind_node_image"]
    if run(["docker", "image", "inspect", image], timeout=30).returncode != 0:
        return f"Kind node image {image} is not present (docker pull {image} first)"
    if os.environ.get("TTG_LIVE_KIND") != "1":
        return "Docker, kind and the node image are here: set TTG_LIVE_KIND=1 to run it"
    return None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("state")
    yield state
    if os.environ.get("TTG_LIVE_KIND_KEEP") != "1":
        run(
            ["kind", "delete", "cluster", "--name", CLUSTER["ttg_kind_cluster_name"]],
            timeout=300,
        )


def _on_kind(playbook: Path | str, state: Path, **ttg_vars: object):
    """ansible-playbook with the kind inventory, this test's state dir and -e ttg_<k>=<v>."""
    extra = [a for k, v in ttg_vars.items() for a in ("-e", f"ttg_{k}={v}")]
    return run(
        [tool("ansible-playbook"), "-i", "inventories/kind", str(playbook),
         "-e", f"ttg_state_dir={state}", *extra],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        timeout=3600,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_sweep_on_kind(live: Path, tmp_path: Path, backend: str) -> None:
    runs = tmp_path / "runs"
    run_id = f"live-{backend}"
    book = tmp_path / "play.yml"
    book.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "TTG on Kind",
                    "hosts": "ttg_controller",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Cluster",
                            "ansible.builtin.include_role": {"name": "kind_cluster"},
                        },
                        *(
                            {
                                "name": f"k8s_app {stage}",
                                "ansible.builtin.include_role": {
                                    "name": "k8s_app",
                                    "tasks_from": f"{stage}.yml",
                                },
                            }
                            for stage in ("main", "fleet", "sweep")
                        ),
                    ],
                }
            ]
        )
    )
    result = _on_kind(book, live, runs_dir=runs, backend=backend, run_id=run_id,
                      params=1000, chunk_size=10, work_ms=1)
    assert result.returncode == 0, result.stdout[-6000:]
    summary = json.loads((runs / run_id / "summary.json").read_text())
    assert summary["ok"] and summary["platform"] == "kind"
    assert summary["result"]["sum"] == 500035.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_chaos_on_kind(live: Path, tmp_path: Path, backend: str) -> None:
    """`make chaos` on Kind: every fault that applies, as pod deletes and scale changes from
    the in-cluster `ttg chaos` Job; each run ok (poison: only its chunk dead-lettered), every
    fault recorded with a recovered_s, and the table printed."""
    runs = tmp_path / "runs"
    result = _on_kind("playbooks/chaos.yml", live, runs_dir=runs, backend=backend,
                      run_id=f"live-chaos-{backend}", params=3000, chunk_size=30, work_ms=10)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Every fault run is ok" in result.stdout
    summaries = [json.loads(p.read_text()) for p in runs.glob("live-chaos-*/summary.json")]
    assert summaries
    for s in summaries:
        assert s["platform"] == "kind" and s["ok"], s
        assert s["faults"] and all("recovered_s" in f for f in s["faults"]), s["faults"]
