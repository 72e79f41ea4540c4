"""A Kubernetes API for tests, on loopback: the five REST calls `ttg.kube.KubeApi` makes.

`FakeApi` answers them the way the API server does (paths, verbs, content types, label
selectors with `=` and `!key`, deletes with or without gracePeriodSeconds) over plain state and
records every request. `Kubelet` puts real processes behind the pods: each pod is a `ttg work`
process, a delete with grace 0 is a SIGKILL, a graceful delete a SIGTERM (the pod goes when the
process has exited), the Deployment keeps its replica count (a deleted pod is replaced at once,
a scale-down terminates the newest pods), an Indexed Job (static) keeps one pod per unfinished
index, and a bare pod's exit code is its status. It stands
in for an API server and a kubelet, not for the broker: workers, broker and signals are real.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

NS = "ttg"
TOKEN = "t0ken"
WORKER_LABELS = {"app.kubernetes.io/component": "worker", "app.kubernetes.io/part-of": "ttg",
                 "app.kubernetes.io/instance": "ttg-workers"}


def pod(name: str, run: str, component: str = "worker", phase: str = "Running",
        labels: dict | None = None, deleting: bool = False) -> dict:
    meta: dict = {"name": name, "namespace": NS, "labels": {
        "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "ttg",
        "ttg.io/run-id": run, **(labels or {})}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def matches(labels: dict, selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        else:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    return True


class FakeApi:
    """Pods, one Deployment (`ttg-workers`) and the requests seen, on 127.0.0.1."""

    def __init__(self, run_id: str, replicas: int = 3, env: list[dict] | None = None) -> None:
        self.run_id = run_id
        self.lock = threading.RLock()
        self.pods: dict[str, dict] = {}
        self.replicas = replicas
        self.template = {
            "metadata": {"labels": {**WORKER_LABELS, "ttg.io/run-id": run_id}},
            "spec": {"restartPolicy": "Always", "containers": [{
                "name": "worker", "image": "ttg-worker:0.1.0", "args": ["work"],
                "env": env if env is not None else [{"name": "TTG_RUN_ID", "value": run_id}]}]},
        }
        self.requests: list[tuple[str, str, dict | None, str | None]] = []
        self.generated = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _send(self, code: int, obj: object) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                url = urlparse(self.path)
                with api.lock:
                    api.requests.append((method, url.path, body,
                                         self.headers.get("Content-Type")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"message": "Unauthorized"})
                with api.lock:
                    code, obj = api.route(method, url.path, parse_qs(url.query), body)
                self._send(code, obj)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ---- hooks a kubelet overrides --------------------------------------------------------
    def status(self, name: str) -> dict:
        return self.pods[name].get("status", {})

    def started(self, name: str) -> None:
        """A pod was created (POST)."""

    def deleted(self, name: str, grace: int | None) -> bool:
        """A pod delete: True = gone now, False = terminating."""
        if grace == 0:
            self.pods.pop(name)
            return True
        self.pods[name]["metadata"]["deletionTimestamp"] = "now"
        return False

    def scaled(self) -> None:
        """spec.replicas changed."""

    # ---- the API ----------------------------------------------------------------------------
    def view(self, name: str) -> dict:
        return {**self.pods[name], "status": self.status(name)}

    def route(self, method: str, path: str, query: dict, body: dict | None
              ) -> tuple[int, object]:
        pods = f"/api/v1/namespaces/{NS}/pods"
        dep = f"/apis/apps/v1/namespaces/{NS}/deployments/ttg-workers"
        if path == pods and method == "GET":
            sel = query.get("labelSelector", [""])[0]
            return 200, {"kind": "PodList", "items": [
                self.view(n) for n, p in list(self.pods.items())
                if matches(p["metadata"]["labels"], sel)]}
        if path == pods and method == "POST":
            self.generated += 1
            name = body["metadata"]["generateName"] + f"x{self.generated}"
            created = {**body, "metadata": {**body["metadata"], "name": name},
                       "status": {"phase": "Pending"}}
            self.pods[name] = created
            self.started(name)
            return 201, self.view(name)
        if path.startswith(pods + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.pods:
                return 404, {"message": f'pods "{name}" not found'}
            if method == "GET":
                return 200, self.view(name)
            if method == "DELETE":
                view = self.view(name)
                self.deleted(name, (body or {}).get("gracePeriodSeconds"))
                return 200, view
        if path == dep and method == "GET":
            return 200, {"spec": {"replicas": self.replicas, "template": self.template}}
        if path == dep + "/scale" and method == "PATCH":
            self.replicas = body["spec"]["replicas"]
            self.scaled()
            return 200, {"spec": {"replicas": self.replicas}}
        return 404, {"message": f"no route {method} {path}"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Kubelet(FakeApi):
    """Real `ttg work` processes behind the pods (see the module docstring)."""

    INDEX = "batch.kubernetes.io/job-completion-index"

    def __init__(self, run_id: str, env: dict[str, str], logs: Path, replicas: int = 3,
                 broker: object | None = None, indexed: bool = False) -> None:
        """indexed: the workers are an Indexed Job of `replicas` indexes (the static backend):
        one pod per index, restartPolicy Never, a failed or deleted pod replaced for the same
        index (up to 3 times, backoffLimitPerIndex), an index done when its pod exits 0."""
        self.indexed = indexed
        self.completed: set[int] = set()
        self.failures: dict[int, int] = {}
        template_env = [] if indexed else [
            {"name": "TTG_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
        super().__init__(run_id, replicas, env=template_env)
        self.base_env = env
        # The broker as its StatefulSet's pod: a delete kills the real broker, the StatefulSet
        # starts it again under the same name, from the same data (its PVC: the data dir).
        self.broker = broker
        self.broker_pod = "ttg-broker-0"
        self.broker_restarts: list[threading.Thread] = []
        if broker is not None:
            self.pods[self.broker_pod] = pod(self.broker_pod, "", component="broker")
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.all_procs: list[subprocess.Popen] = []
        self.serial = 0
        self.stopping = False
        self.seen_ended: set[str] = set()
        with self.lock:
            self.scaled()
        self.watch = threading.Thread(target=self._reap, daemon=True)
        self.watch.start()

    def _spawn(self, name: str, container: dict) -> None:
        env = dict(self.base_env)
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[e["name"]] = name
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "ttg.cli", *container["args"]],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        self.all_procs.append(proc)

    def status(self, name: str) -> dict:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is None:
            return {"phase": "Running" if proc else "Pending"}
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        return {"phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "worker",
                                       "state": {"terminated": {"exitCode": code}}}]}

    def started(self, name: str) -> None:
        self._spawn(name, self.pods[name]["spec"]["containers"][0])

    def deleted(self, name: str, grace: int | None) -> bool:
        if name == self.broker_pod:
            self.pods.pop(name)
            self.broker.kill()

            def recreate() -> None:
                time.sleep(0.5)  # the StatefulSet controller, the scheduler, the container start
                self.broker.restart()
                with self.lock:
                    self.pods[name] = pod(name, "", component="broker")

            t = threading.Thread(target=recreate, daemon=True)
            t.start()
            self.broker_restarts.append(t)
            return True
        proc = self.procs.get(name)
        self.pods[name]["metadata"]["deletionTimestamp"] = "now"
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if grace == 0 else signal.SIGTERM)
        if grace == 0:
            self._forget(name)
        self.scaled()  # a ReplicaSet replaces a deleted pod at once
        return grace == 0

    def _forget(self, name: str) -> None:
        self.pods.pop(name, None)
        self.procs.pop(name, None)

    def _owned(self) -> list[str]:
        return [n for n, p in self.pods.items()
                if p["metadata"]["labels"].get("app.kubernetes.io/instance") == "ttg-workers"
                and not p["metadata"].get("deletionTimestamp")]

    def _index_pods(self) -> None:
        """The Job controller: a pod for every index neither done nor out of retries. With a
        podFailurePolicy (ours has one) a terminating pod is replaced once it has failed, not
        while it still runs: a SIGTERMed static worker finishes its chunk first."""
        live = {int(p["metadata"]["labels"][self.INDEX]) for n, p in self.pods.items()
                if self.INDEX in p["metadata"]["labels"]
                and self.status(n)["phase"] in ("Pending", "Running")}
        for i in range(self.replicas):
            if i in self.completed or i in live or self.failures.get(i, 0) > 3:
                continue
            self.serial += 1
            name = f"ttg-workers-{self.run_id}-{i}-{self.serial:03d}"
            labels = {**self.template["metadata"]["labels"], self.INDEX: str(i)}
            spec = {**self.template["spec"], "restartPolicy": "Never"}
            container = {**spec["containers"][0], "env": [
                {"name": "JOB_COMPLETION_INDEX", "value": str(i)},
                {"name": "TTG_EXIT_WHEN_DONE", "value": "1"}]}
            self.pods[name] = {"metadata": {"name": name, "namespace": NS, "labels": labels},
                               "spec": {**spec, "containers": [container]}}
            self._spawn(name, container)

    def scaled(self) -> None:
        if self.stopping:
            return
        if self.indexed:
            self._index_pods()
            return
        owned = self._owned()
        while len(owned) < self.replicas:
            self.serial += 1
            name = f"ttg-workers-{self.serial:03d}"
            self.pods[name] = {"metadata": {"name": name, "namespace": NS, "labels": dict(
                self.template["metadata"]["labels"])}, "spec": self.template["spec"]}
            self._spawn(name, self.template["spec"]["containers"][0])
            owned.append(name)
        for name in sorted(owned)[self.replicas:][::-1]:  # the newest go first
            self.deleted(name, None)

    def _reap(self) -> None:
        """Terminating pods go when their process has exited (as the kubelet reports it)."""
        while not self.stopping:
            with self.lock:
                for name, p in list(self.pods.items()):
                    proc = self.procs.get(name)
                    index = p["metadata"]["labels"].get(self.INDEX)
                    ended = proc is not None and proc.poll() is not None
                    if index is not None and ended and name not in self.seen_ended:
                        self.seen_ended.add(name)
                        if proc.returncode == 0:
                            self.completed.add(int(index))
                        else:
                            self.failures[int(index)] = self.failures.get(int(index), 0) + 1
                    if p["metadata"].get("deletionTimestamp") and (proc is None or ended):
                        self._forget(name)
                if self.indexed and not self.stopping:
                    self._index_pods()
            time.sleep(0.05)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
        for t in self.broker_restarts:
            t.join(timeout=60)
        for proc in self.all_procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        super().close()
