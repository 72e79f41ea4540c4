"""Helpers of the Kubernetes-path tests: the repository, the venv's tools, rendering."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLATFORMS = ("kind", "aks")
BACKENDS = ("redis", "rabbitmq", "static")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0"})
    e.update(extra)
    return e


def run(
    args: list[str], timeout: float = 600, cwd: Path = ROOT, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kubernetes_version() -> str:
    """The pinned Kubernetes version (x.y.0) of both inventories."""
    versions = {
        yaml.safe_load(
            (
                ROOT / "inventories" / p / "group_vars" / "all" / "cluster.yml"
            ).read_text()
        )["ttg_kubernetes_version"]
        for p in PLATFORMS
    }
    assert len(versions) == 1, (
        f"kind and aks pin different Kubernetes versions: {versions}"
    )
    return f"{versions.pop()}.0"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of a workload document: Deployment, StatefulSet, Job, Pod."""
    kind = doc.get("kind")
    if kind == "Pod":
        return [(f"Pod/{doc['metadata']['name']}", doc["spec"])]
    if kind in {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}:
        return [(f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])]
    if kind == "CronJob":
        return [
            (
                f"CronJob/{doc['metadata']['name']}",
                doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            )
        ]
    return []
