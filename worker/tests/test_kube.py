"""The Kubernetes fault adapter (`KubePlatform` over `ttg.kube.KubeApi`), offline.

No API server can run on the test machines (no node image, no kube-apiserver binary), so the
adapter is driven against a small HTTP server on loopback that answers the five REST calls
the way the Kubernetes API does (paths, verbs, content types, label selectors with `=` and
`!key`, a pod delete that honours gracePeriodSeconds) and records every request. What this
proves: which objects each fault touches and how (the requests); what it cannot prove: that
a cluster behaves as the recorded requests intend (tests/k8s/test_live_kind.py does that,
where Kind can run).
"""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from ttg.chaos import KubePlatform
from ttg.cli import main
from ttg.errors import ConfigError
from ttg.kube import KubeApi, KubeError

NS = "ttg"
RUN = "chaos-k8s-1"


def pod(name: str, run: str = RUN, component: str = "worker", phase: str = "Running",
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
    """State + the requests seen, behind a ThreadingHTTPServer on 127.0.0.1."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.replicas = 3
        self.template = {
            "metadata": {"labels": {"app.kubernetes.io/component": "worker",
                                    "app.kubernetes.io/part-of": "ttg",
                                    "app.kubernetes.io/instance": "ttg-workers",
                                    "ttg.io/run-id": RUN}},
            "spec": {"restartPolicy": "Always", "containers": [{
                "name": "worker", "image": "ttg-worker:0.1.0", "args": ["work"],
                "env": [{"name": "TTG_RUN_ID", "value": RUN},
                        {"name": "TTG_POISON_PARAM", "value": "old"}]}]},
        }
        self.requests: list[tuple[str, str, dict | None, str | None]] = []
        self.generated = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _body(self) -> dict | None:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _send(self, code: int, obj: object) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                body = self._body() if method in ("POST", "PATCH", "DELETE") else None
                url = urlparse(self.path)
                api.requests.append((method, url.path, body, self.headers.get("Content-Type")))
                if self.headers.get("Authorization") != "Bearer t0ken":
                    return self._send(401, {"message": "Unauthorized"})
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

    def route(self, method: str, path: str, query: dict, body: dict | None
              ) -> tuple[int, object]:
        pods = f"/api/v1/namespaces/{NS}/pods"
        dep = f"/apis/apps/v1/namespaces/{NS}/deployments/ttg-workers"
        if path == pods and method == "GET":
            sel = query.get("labelSelector", [""])[0]
            return 200, {"kind": "PodList", "items": [
                p for p in self.pods.values() if matches(p["metadata"]["labels"], sel)]}
        if path == pods and method == "POST":
            self.generated += 1
            name = body["metadata"]["generateName"] + f"x{self.generated}"
            created = {**body, "metadata": {**body["metadata"], "name": name},
                       "status": {"phase": "Pending"}}
            self.pods[name] = created
            return 201, created
        if path.startswith(pods + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.pods:
                return 404, {"message": f'pods "{name}" not found'}
            if method == "GET":
                return 200, self.pods[name]
            if method == "DELETE":
                grace = (body or {}).get("gracePeriodSeconds")
                if grace == 0:
                    return 200, self.pods.pop(name)
                self.pods[name]["metadata"]["deletionTimestamp"] = "now"
                return 200, self.pods[name]
        if path == dep and method == "GET":
            return 200, {"spec": {"replicas": self.replicas, "template": self.template}}
        if path == dep + "/scale" and method == "PATCH":
            self.replicas = body["spec"]["replicas"]
            return 200, {"spec": {"replicas": self.replicas}}
        return 404, {"message": f"no route {method} {path}"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    api = FakeApi()
    yield api
    api.close()


@pytest.fixture
def platform(fake: FakeApi) -> KubePlatform:
    return KubePlatform(KubeApi(fake.url, token="t0ken", namespace=NS), RUN, poll_s=0.01,
                        wait_s=5)


def test_workers_are_the_runs_running_pods_only(fake, platform):
    fake.pods = {p["metadata"]["name"]: p for p in [
        pod("w-a"), pod("w-b"),
        pod("w-pending", phase="Pending"),
        pod("w-leaving", deleting=True),
        pod("w-other-run", run="another-run"),
        pod("w-armed", labels={"ttg.io/chaos-armed": "true"}),
        pod("ttg-redis-0", component="broker"),
    ]}
    assert platform.workers() == {"w-a": 0, "w-b": 0}
    method, path, _, _ = fake.requests[0]
    assert (method, path) == ("GET", f"/api/v1/namespaces/{NS}/pods")


def test_static_workers_are_named_by_their_completion_index(fake, platform):
    idx = "batch.kubernetes.io/job-completion-index"
    fake.pods = {"ttg-workers-r-1-abc": pod("ttg-workers-r-1-abc", labels={idx: "1"}),
                 "ttg-workers-r-0-def": pod("ttg-workers-r-0-def", labels={idx: "0"})}
    assert sorted(platform.workers()) == ["worker-0", "worker-1"]
    platform.kill_worker("worker-1", signal.SIGKILL)
    assert sorted(fake.pods) == ["ttg-workers-r-0-def"]


def test_sigkill_is_a_delete_with_grace_0_and_sigterm_keeps_the_pods_grace(fake, platform):
    fake.pods = {n: pod(n) for n in ("w-a", "w-b")}
    platform.kill_worker("w-a", signal.SIGKILL)
    method, path, body, _ = fake.requests[-1]
    assert (method, path) == ("DELETE", f"/api/v1/namespaces/{NS}/pods/w-a")
    assert body["gracePeriodSeconds"] == 0
    assert "w-a" not in fake.pods
    platform.kill_worker("w-b", signal.SIGTERM)
    method, path, body, _ = fake.requests[-1]
    assert (method, path) == ("DELETE", f"/api/v1/namespaces/{NS}/pods/w-b")
    assert "gracePeriodSeconds" not in body  # the pod's terminationGracePeriodSeconds
    assert fake.pods["w-b"]["metadata"]["deletionTimestamp"]
    assert platform.workers() == {}  # terminating pods are not counted
    with pytest.raises(ConfigError, match="not running"):
        platform.kill_worker("w-gone", signal.SIGKILL)


def test_broker_kill_deletes_every_broker_pod_with_grace_0(fake, platform):
    fake.pods = {n: pod(n, component="broker") for n in ("ttg-rabbitmq-0",)}
    fake.pods["w-a"] = pod("w-a")
    platform.kill_broker()
    deletes = [(p, b) for m, p, b, _ in fake.requests if m == "DELETE"]
    assert deletes == [(f"/api/v1/namespaces/{NS}/pods/ttg-rabbitmq-0",
                        {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})]
    assert list(fake.pods) == ["w-a"]
    with pytest.raises(ConfigError, match="no broker pod"):
        platform.kill_broker()


def test_scale_is_the_deployments_scale_subresource(fake, platform):
    handles = [platform.add_worker(f"extra-{i}", {}) for i in range(2)]
    assert fake.replicas == 5
    patch = [r for r in fake.requests if r[0] == "PATCH"]
    assert patch[0][1] == f"/apis/apps/v1/namespaces/{NS}/deployments/ttg-workers/scale"
    assert patch[0][3] == "application/merge-patch+json"
    assert patch[0][2] == {"spec": {"replicas": 4}}
    for h in handles:
        assert platform.stop_added(h, signal.SIGTERM) is None
    assert fake.replicas == 3


def test_armed_worker_is_a_bare_pod_the_replicaset_cannot_adopt(fake, platform):
    env = {"TTG_TEST_KILL_AFTER_WRITE": "1", "TTG_POISON_PARAM": "7"}
    handle = platform.add_worker("armed-0", env)
    created = [b for m, _, b, _ in fake.requests if m == "POST"][0]
    labels = created["metadata"]["labels"]
    assert created["metadata"]["generateName"] == "ttg-armed-0-"
    assert labels["ttg.io/chaos-armed"] == "true"
    assert labels["app.kubernetes.io/instance"] != "ttg-workers"  # not the RS's selector
    assert labels["ttg.io/run-id"] == RUN
    assert created["spec"]["restartPolicy"] == "Never"
    env_out = {e["name"]: e["value"] for e in created["spec"]["containers"][0]["env"]}
    assert env_out == {"TTG_RUN_ID": RUN, "TTG_POISON_PARAM": "7",
                       "TTG_TEST_KILL_AFTER_WRITE": "1", "TTG_EXIT_WHEN_DONE": "1"}
    assert platform.workers() == {}  # an armed pod is no fleet worker

    # the pod dies by its hook: the exit code is read back, then the pod is removed
    name = handle[1]
    fake.pods[name]["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": "worker", "state": {"terminated": {"exitCode": 137}}}]}
    assert platform.wait_added(handle) == 137
    assert name not in fake.pods


def test_api_errors_carry_the_status_and_message(fake):
    api = KubeApi(fake.url, token="wrong", namespace=NS)
    with pytest.raises(KubeError, match="401: Unauthorized"):
        api.list_pods("a=b")
    ok = KubeApi(fake.url, token="t0ken", namespace=NS)
    assert ok.read_pod("nope") is None
    ok.delete_pod("nope", 0)  # already gone: not an error (the fault happened anyway)


def test_chaos_on_kubernetes_outside_a_pod_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = main(["chaos", "--fault", "worker-kill", "--platform", "kind", "--backend", "redis",
               "--broker-url", "redis://127.0.0.1:1/0", "--params", "100",
               "--chunk-size", "10"])
    assert rc == 2
    assert "runs in-cluster, as the ttg-chaos Job" in capsys.readouterr().err


def test_chaos_on_an_unknown_platform_is_a_clear_error(capsys):
    rc = main(["chaos", "--fault", "worker-kill", "--platform", "moon", "--backend", "redis",
               "--broker-url", "redis://127.0.0.1:1/0", "--params", "100",
               "--chunk-size", "10"])
    assert rc == 2
    assert "unknown platform 'moon'" in capsys.readouterr().err
