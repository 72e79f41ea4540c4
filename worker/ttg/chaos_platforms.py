"""Where `make chaos` strikes: the platforms a fault is run against (see `ttg.chaos`).

- `LocalPlatform`: the local platform's supervisord (`supervisorctl status` gives the PIDs;
  kills are real signals; supervisord restarts what dies, as a Deployment/StatefulSet would).
- `KubePlatform`: pods of the run, found by label through the Kubernetes API (`ttg.kube`,
  in-cluster); a kill is a pod delete with grace 0; the broker is its StatefulSet's pod (its
  PVC survives); scaling is the Deployment's scale subresource.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from ttg.errors import ConfigError

if TYPE_CHECKING:
    from ttg.kube import KubeApi

T = TypeVar("T")

class Platform(Protocol):
    def workers(self) -> dict[str, int]:
        """Running workers of the run: name -> pid (or 0 where there is no local pid)."""

    def kill_worker(self, name: str, sig: int) -> None: ...

    def kill_broker(self) -> None:
        """SIGKILL the broker; its supervisor restarts it."""

    def add_worker(self, name: str, env: dict[str, str]) -> object:
        """One more worker of the run (with `env` on top of the fleet's environment)."""

    def wait_added(self, handle: object) -> int | None:
        """Wait for an added worker to end by itself; its exit code (None if unknown)."""

    def stop_added(self, handle: object, sig: int) -> int | None: ...


class _Snapshot:
    """The last answer of `fetch`, kept for a second: listing the workers costs a process start
    (supervisorctl) or an API call, and a fault must strike at its progress point, not a few
    hundred milliseconds later."""

    def __init__(self, fetch: Callable[[], dict[str, T]], ttl_s: float = 1.0) -> None:
        self.fetch = fetch
        self.ttl_s = ttl_s
        self.value: dict[str, T] = {}
        self.at = 0.0

    def get(self) -> dict[str, T]:
        now = time.monotonic()
        if now - self.at > self.ttl_s:
            self.value, self.at = self.fetch(), now
        return dict(self.value)

    def expire(self) -> None:
        self.at = 0.0


class LocalPlatform:
    """The local platform: supervisord programs, real PIDs, real signals."""

    STATUS = re.compile(r"^(\S+)\s+RUNNING\s+pid (\d+)")

    def __init__(self, supervisorctl: str, config: str, fleet_program: str,
                 broker_program: str) -> None:
        self.ctl_cmd = [supervisorctl, "-c", config]
        self.fleet = fleet_program
        self.broker = broker_program
        self._workers = _Snapshot(lambda: {
            name.partition(":")[2]: pid for name, pid in self._status().items()
            if name.startswith(self.fleet + ":")})

    def _status(self) -> dict[str, int]:
        out = subprocess.run([*self.ctl_cmd, "status"], capture_output=True, text=True,
                             timeout=30).stdout
        found = {}
        for line in out.splitlines():
            m = self.STATUS.match(line)
            if m:
                found[m.group(1)] = int(m.group(2))
        return found

    def workers(self) -> dict[str, int]:
        return self._workers.get()

    def kill_worker(self, name: str, sig: int) -> None:
        pid = self.workers().get(name)
        if pid is None:
            raise ConfigError(f"worker {name} is not running")
        os.kill(pid, sig)
        self._workers.expire()

    def kill_broker(self) -> None:
        """SIGKILL the broker's whole process group: supervisord starts each program in a
        group of its own, and `rabbitmq-server` forks the Erlang VM instead of exec'ing it,
        so killing the script alone would leave the node running on its port."""
        status = self._status()
        pid = status.get(self.broker) or status.get(f"{self.broker}:{self.broker}")
        if pid is None:
            raise ConfigError(f"broker program {self.broker} is not running")
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def add_worker(self, name: str, env: dict[str, str]) -> subprocess.Popen:
        """An extra worker, a child of this process, with this process's TTG_* settings."""
        return subprocess.Popen(
            [sys.executable, "-m", "ttg.cli", "work", "--worker-id", name, "--exit-when-done"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_added(self, handle: object) -> int | None:
        assert isinstance(handle, subprocess.Popen)
        try:
            return handle.wait(timeout=120)
        except subprocess.TimeoutExpired:
            handle.kill()
            return None

    def stop_added(self, handle: object, sig: int) -> int | None:
        assert isinstance(handle, subprocess.Popen)
        if handle.poll() is None:
            handle.send_signal(sig)
        return self.wait_added(handle)


class KubePlatform:
    """Kubernetes (kind, aks): the run's worker pods, the broker's StatefulSet pod, the
    workers' Deployment, through the API with the ttg-chaos service account (its Role allows
    exactly these verbs in the project's namespace). Workers are named as the backend knows
    them: the pod name (queue backends: TTG_WORKER_ID is the pod name), `worker-<index>` for
    the static backend's Indexed Job pods."""

    ARMED = "ttg.io/chaos-armed"
    INDEX = "batch.kubernetes.io/job-completion-index"

    def __init__(self, api: KubeApi, run_id: str, deployment: str = "ttg-workers",
                 worker_selector: str = "app.kubernetes.io/component=worker,"
                                        "app.kubernetes.io/part-of=ttg",
                 broker_selector: str = "app.kubernetes.io/component=broker,"
                                        "app.kubernetes.io/part-of=ttg",
                 poll_s: float = 0.5, wait_s: float = 120.0) -> None:
        self.api = api
        self.run_id = run_id
        self.deployment = deployment
        self.worker_selector = f"{worker_selector},ttg.io/run-id={run_id},!{self.ARMED}"
        self.broker_selector = broker_selector
        self.poll_s = poll_s
        self.wait_s = wait_s
        # backend's worker name -> pod name, of the running pods that are not terminating
        self._pods = _Snapshot(lambda: {
            self._name(p): p["metadata"]["name"] for p in self.api.list_pods(self.worker_selector)
            if p.get("status", {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")})

    def _name(self, pod: dict) -> str:
        meta = pod["metadata"]
        index = (meta.get("labels") or {}).get(self.INDEX) or (
            meta.get("annotations") or {}).get(self.INDEX)
        return f"worker-{index}" if index is not None else meta["name"]

    def workers(self) -> dict[str, int]:
        """Running, not terminating worker pods of the run (no local pid: 0)."""
        return {name: 0 for name in self._pods.get()}

    def kill_worker(self, name: str, sig: int) -> None:
        """SIGKILL: delete with grace 0; SIGTERM: delete with the pod's own grace period (the
        kubelet sends SIGTERM, the worker finishes or hands back the chunk in hand)."""
        pod = self._pods.get().get(name)
        if pod is None:
            raise ConfigError(f"worker {name} is not running")
        self.api.delete_pod(pod, 0 if sig == signal.SIGKILL else None)
        self._pods.expire()

    def kill_broker(self) -> None:
        pods = self.api.list_pods(self.broker_selector)
        if not pods:
            raise ConfigError(f"no broker pod matches {self.broker_selector}")
        for pod in pods:
            self.api.delete_pod(pod["metadata"]["name"], 0)

    def add_worker(self, name: str, env: dict[str, str]) -> object:
        """No extra environment: one more replica of the Deployment (a real scale-up). With
        one (an armed worker): a bare pod from the Deployment's pod template, labelled so
        that it is not counted as a fleet worker and cleaned up with the project."""
        if not env:
            current = self.api.read_deployment(self.deployment)["spec"].get("replicas", 1)
            self.api.scale_deployment(self.deployment, int(current) + 1)
            return ("replica", None)
        template = self.api.read_deployment(self.deployment)["spec"]["template"]
        # Not the Deployment's instance label: its ReplicaSet would adopt the pod otherwise.
        labels = {**template["metadata"].get("labels", {}), self.ARMED: "true",
                  "app.kubernetes.io/instance": "ttg-chaos-armed"}
        spec = dict(template["spec"], restartPolicy="Never")
        containers = []
        for c in spec["containers"]:
            kept = [e for e in c.get("env", []) if e["name"] not in env]
            extra = [{"name": k, "value": v} for k, v in {**env, "TTG_EXIT_WHEN_DONE": "1"}
                     .items()]
            containers.append({**c, "env": kept + extra})
        spec["containers"] = containers
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": f"ttg-{name}-", "labels": labels},
               "spec": spec}
        created = self.api.create_pod(pod)
        return ("pod", created["metadata"]["name"])

    def wait_added(self, handle: object) -> int | None:
        kind, pod = handle  # type: ignore[misc]
        if kind != "pod":
            return None
        deadline = time.monotonic() + self.wait_s
        code = None
        while time.monotonic() < deadline:
            p = self.api.read_pod(pod)
            if p is None:
                break
            for cs in p.get("status", {}).get("containerStatuses", []) or []:
                done = (cs.get("state") or {}).get("terminated")
                if done:
                    code = int(done.get("exitCode", -1))
            if code is not None or p.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(self.poll_s)
        self.api.delete_pod(pod, 0)
        return code

    def stop_added(self, handle: object, sig: int) -> int | None:
        kind, pod = handle  # type: ignore[misc]
        if kind == "replica":
            current = self.api.read_deployment(self.deployment)["spec"].get("replicas", 1)
            self.api.scale_deployment(self.deployment, max(int(current) - 1, 0))
            return None  # the ReplicaSet picks the pod; its SIGTERM path is graceful-stop's
        self.api.delete_pod(pod, 0 if sig == signal.SIGKILL else None)
        return self.wait_added(handle)
