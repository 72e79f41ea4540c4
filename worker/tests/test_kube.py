"""The Kubernetes fault adapter (`KubePlatform` over `ttg.kube.KubeApi`), without a cluster.

No API server can run on the test machines (no node image, no kube-apiserver binary). So the
adapter is driven against `kubeapi.FakeApi`, a small HTTP server on loopback that answers the
five REST calls the way the Kubernetes API does and records every request (which objects each
fault touches, and how), and then end to end against `kubeapi.Kubelet`, which puts real `ttg
work` processes behind the pods and the real broker behind the broker pod: the faults must
lose nothing there. What neither proves: that a real cluster behaves like the emulation
(tests/k8s/test_live_kind.py does that, where Kind can run).
"""

from __future__ import annotations

import signal
from functools import partial

import pytest
from kubeapi import NS, TOKEN, FakeApi
from kubeapi import pod as _pod

from ttg.chaos_platforms import KubePlatform
from ttg.cli import main
from ttg.errors import ConfigError
from ttg.kube import KubeApi, KubeError

RUN = "chaos-k8s-1"
pod = partial(_pod, run=RUN)


@pytest.fixture
def fake():
    api = FakeApi(RUN, env=[{"name": "TTG_RUN_ID", "value": RUN},
                            {"name": "TTG_POISON_PARAM", "value": "old"}])
    yield api
    api.close()


@pytest.fixture
def platform(fake: FakeApi) -> KubePlatform:
    return KubePlatform(KubeApi(fake.url, token=TOKEN, namespace=NS), RUN, poll_s=0.01,
                        wait_s=5)


def test_workers_are_the_runs_running_pods_only(fake, platform):
    fake.pods = {p["metadata"]["name"]: p for p in [
        pod("w-a"), pod("w-b"),
        pod("w-pending", phase="Pending"),
        pod("w-leaving", deleting=True),
        _pod("w-other-run", run="another-run"),
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
    env = {"TTG_EXIT_AFTER_FIRST_WRITE": "1", "TTG_POISON_PARAM": "7"}
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
                       "TTG_EXIT_AFTER_FIRST_WRITE": "1", "TTG_EXIT_WHEN_DONE": "1"}
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
    ok = KubeApi(fake.url, token=TOKEN, namespace=NS)
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


# ---- the Kubernetes faults end to end: real broker, real workers behind emulated pods -------

KUBE_FAULTS = ["worker-kill", "worker-kill-repeat", "graceful-stop", "scale",
               "kill-after-write", "broker-kill"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", KUBE_FAULTS)
def test_kube_fault_loses_nothing(fault, queue_backend, tmp_path):
    """`Chaos` with `KubePlatform`, as `ttg chaos --platform kind` runs it in-cluster: pods are
    found by label, killed by API deletes (grace 0 = SIGKILL of the real worker process), the
    Deployment replaces them and scales through its scale subresource, the armed worker is a
    bare pod. The run must lose nothing, count nothing twice and measure each recovery."""
    from kubeapi import Kubelet

    from ttg.chaos import Chaos
    from ttg.controller import run_sweep
    from ttg.sweep import JobSpec

    env = queue_backend
    run_id = f"kube-{fault}"
    logs = tmp_path / "pods"
    logs.mkdir()
    kube = Kubelet(run_id, env.env(run_id, TTG_MIN_IDLE_MS="1000"), logs, replicas=3,
                   broker=env.broker)
    try:
        # the armed pod of kill-after-write must start (a Python process: a second or more
        # on a busy machine) while chunks are left for it: a longer run for that fault
        work_ms = 10.0 if fault == "kill-after-write" else 3.0
        spec = JobSpec(run_id, 2000, 20, "reference", work_ms, 3)
        platform = KubePlatform(KubeApi(kube.url, token=TOKEN, namespace=NS), run_id,
                                poll_s=0.05, wait_s=60)
        # the defaults' patience with a broker that is restarting (a RabbitMQ node boots in s)
        config = {"min_idle_ms": 1000, "connect_timeout_s": 10, "retry_budget_s": 60}
        chaos = Chaos(fault, spec, platform, lambda: env.make(**config),
                      at=0.3, interval_s=0.7, timeout_s=180)
        # stall_s: a RabbitMQ node restarting on a busy 2-core machine (make test) was once
        # down longer than 10 s with every worker waiting on it, and the run was given up
        summary = run_sweep(env.make(**config), spec, "kind", tmp_path / "runs",
                            timeout_s=180, stall_s=30, during=chaos.run)
    finally:
        kube.close()
    faults = summary["faults"]
    assert faults and all("error" not in f for f in faults), faults
    assert summary["ok"], summary
    assert summary["chunks_missing"] == 0
    assert summary["result"]["sum"] == summary["expected_sum"]
    assert all(f.get("recovered_s") is not None for f in faults), faults
    kills = [r for r in kube.requests if r[0] == "DELETE"]
    if fault.startswith("worker-kill"):
        assert kills and all(b["gracePeriodSeconds"] == 0 for _, _, b, _ in kills)
        # the ReplicaSet replaced every killed pod
        assert len(kube.pods) == 3 or kube.serial >= 3 + len(kills)
    if fault == "graceful-stop":
        assert kills and all("gracePeriodSeconds" not in b for _, _, b, _ in kills)
        assert summary["executions"] == summary["chunks_done"]  # finished once, in hand
    if fault == "scale":
        patches = [b["spec"]["replicas"] for m, _, b, _ in kube.requests if m == "PATCH"]
        assert patches == [4, 5, 4, 3], patches
        assert kube.serial >= 5  # two more pods ran
    if fault == "broker-kill":
        assert [p for m, p, _, _ in kube.requests if m == "DELETE"] == [
            f"/api/v1/namespaces/{NS}/pods/ttg-broker-0"]
        assert kube.pods.get("ttg-broker-0")  # the StatefulSet brought it back
    if fault == "kill-after-write":
        assert faults[0]["exit_code"] == 137, faults  # the armed pod died by its hook


STATIC_FAULTS = ["worker-kill", "graceful-stop", "broker-kill"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", STATIC_FAULTS)
def test_kube_fault_on_static_redoes_only_the_victims_range(fault, redis_server, tmp_path):
    """static on Kubernetes: the workers are an Indexed Job; `KubePlatform` names its pods
    `worker-<index>` (what the static backend knows), a killed pod is replaced for the same
    index and redoes the chunk it died in. Exact sum, every chunk done."""
    from conftest import Env, wait_for
    from kubeapi import Kubelet

    from ttg.chaos import Chaos
    from ttg.controller import run_sweep
    from ttg.sweep import JobSpec

    env = Env("static", redis_server, tmp_path)
    run_id = f"kube-static-{fault}"
    logs = tmp_path / "pods"
    logs.mkdir()
    kube = Kubelet(run_id, env.env(run_id), logs, replicas=3, broker=redis_server,
                   indexed=True)
    try:
        # the armed pod of kill-after-write must start (a Python process: a second or more
        # on a busy machine) while chunks are left for it: a longer run for that fault
        work_ms = 10.0 if fault == "kill-after-write" else 3.0
        spec = JobSpec(run_id, 2000, 20, "reference", work_ms, 3)
        platform = KubePlatform(KubeApi(kube.url, token=TOKEN, namespace=NS), run_id,
                                poll_s=0.05, wait_s=60)
        config = {"min_idle_ms": 1000, "connect_timeout_s": 10, "retry_budget_s": 60}
        chaos = Chaos(fault, spec, platform, lambda: env.make(**config), at=0.3,
                      timeout_s=180)
        # stall_s: a RabbitMQ node restarting on a busy 2-core machine (make test) was once
        # down longer than 10 s with every worker waiting on it, and the run was given up
        summary = run_sweep(env.make(**config), spec, "kind", tmp_path / "runs",
                            timeout_s=180, stall_s=30, during=chaos.run)
        # every index's last pod exits 0 once its range is done (a moment after the run ends)
        wait_for(lambda: kube.completed == {0, 1, 2}, timeout=30, what="indexes complete")
    finally:
        kube.close()
    faults = summary["faults"]
    assert faults and all("error" not in f for f in faults), faults
    assert summary["ok"], summary
    assert summary["result"]["sum"] == summary["expected_sum"]
    assert faults[0]["target"].startswith("worker-") or fault == "broker-kill"
    if fault != "broker-kill":
        victim = int(faults[0]["target"].rpartition("-")[2])
        # the victim's index ran again in a pod of its own; the others in one pod each
        pods = sorted(p.stem for p in logs.glob("*.log"))
        per_index = [sum(f"-{run_id}-{i}-" in p for p in pods) for i in range(3)]
        assert per_index[victim] == 2 and sum(per_index) == 4, pods
        assert faults[0]["recovered_s"] is not None
        if fault == "worker-kill":
            assert faults[0]["held"], faults  # static can tell what the victim held
        else:  # SIGTERM: it finished its chunk in hand, then exited 75 (range not done)
            assert kube.failures == {victim: 1}, kube.failures
            assert summary["executions"] == summary["chunks_done"]
    assert kube.completed == {0, 1, 2}
