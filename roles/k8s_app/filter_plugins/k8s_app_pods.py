"""The k8s_app role's reading of pods: which cannot start (and why), which are running."""

from __future__ import annotations

from typing import Any

# Container states a pod does not leave by waiting: its image cannot be had, its container
# cannot be made, or it keeps exiting (the kubelet backs off between restarts).
STUCK_REASONS = (
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def k8s_app_stuck_pods(pods: list[dict[str, Any]], failed: bool = True) -> list[str]:
    """One line per pod that cannot start: "<pod>: <reason>: <message>" (its first stuck
    container, init containers first); with `failed`, a pod that failed outright too (not for
    a Job's pods: the Job retries those)."""
    out = []
    for pod in pods or []:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        containers = (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or [])
        for c in containers:
            waiting = (c.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_REASONS:
                message = " ".join(str(waiting.get("message") or "").split())[:300]
                out.append(f"{name}: {waiting['reason']}" + (f": {message}" if message else ""))
                break
        else:
            if failed and status.get("phase") == "Failed":
                reason = status.get("reason") or "Failed"
                message = " ".join(str(status.get("message") or "").split())[:300]
                out.append(f"{name}: {reason}" + (f": {message}" if message else ""))
    return out


def k8s_app_started_pods(pods: list[dict[str, Any]]) -> int:
    """How many pods are running with every container ready, or have already succeeded."""
    n = 0
    for pod in pods or []:
        status = pod.get("status") or {}
        if status.get("phase") == "Succeeded":
            n += 1
        elif status.get("phase") == "Running" and not (pod.get("metadata") or {}).get(
                "deletionTimestamp"):
            conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
            n += conds.get("Ready") == "True"
    return n


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"k8s_app_stuck_pods": k8s_app_stuck_pods,
                "k8s_app_started_pods": k8s_app_started_pods}
