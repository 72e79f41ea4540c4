"""The local control plane (`make k8s-up`, roles/local_k8s) against itself and against every
rendered manifest: real etcd, real kube-apiserver / controller-manager / scheduler built from the
pinned source, started through make and Ansible with an isolated state dir and free ports."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .helpers import BACKENDS, CRD_KINDS, PLATFORMS, ROOT, load_docs, run

# One cluster for the module: with pytest-xdist, `--dist loadgroup` keeps it on one worker.
# It needs the pinned binaries (`make k8s-build`, which .ci/run does; the fixture builds them
# when absent and skips, saying why, only where there is neither a cache nor a Go toolchain).
pytestmark = [pytest.mark.xdist_group("local_k8s")]

BUILD = ROOT / "tools" / "k8s" / "build.sh"
SCHEMAS = Path(__file__).parent / "schemas"
PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_PROGRAMS = ("containerd", "kubelet", "kube-proxy", "coredns", "volume-provisioner")
# What a node needs on this machine (roles/local_k8s/tasks/node.yml checks the same).
NODE_NEEDS = (
    "/usr/bin/containerd",
    "/usr/bin/ctr",
    "/usr/sbin/runc",
    "/usr/lib/cni/bridge",
    "/usr/sbin/iptables",
)


def node_missing() -> str:
    """Why this machine cannot run the local node ('' when it can)."""
    if os.geteuid() != 0:
        return "the local node needs root (containerd, network namespaces, iptables)"
    missing = [p for p in NODE_NEEDS if not Path(p).exists()]
    if missing:
        return (
            f"the local node needs {', '.join(missing)} "
            "(apt-get install containerd runc containernetworking-plugins iptables)"
        )
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "the local node's images come from Docker, and no Docker daemon answers"
    return ""


VARIANTS = [f"{p}/{b}{x}" for p in PLATFORMS for b in BACKENDS for x in ("", "-extras", "-chaos")]
# The CRDs of the optional extras, served from the subset schemas the offline tests use.
CRDS = {
    "keda-scaledobject.json": ("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
    "keda-triggerauthentication.json": (
        "keda.sh",
        "v1alpha1",
        "TriggerAuthentication",
        "triggerauthentications",
    ),
    "monitoring-podmonitor.json": (
        "monitoring.coreos.com",
        "v1",
        "PodMonitor",
        "podmonitors",
    ),
}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def paths() -> dict[str, str]:
    out = subprocess.run([str(BUILD), "--paths"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class Cluster:
    def __init__(self, state: Path, ports: list[int], bins: dict[str, str], node: bool) -> None:
        self.state = state
        self.node = node
        self.dir = state / "k8s"
        self.ports = ports
        self.version = bins["version"]
        self.kubectl = str(Path(bins["bin_dir"]) / "kubectl")
        self.kubeconfig = str(self.dir / "admin.kubeconfig")
        self.supervisor_conf = self.dir / "supervisor" / "supervisord.conf"

    def args(self) -> str:
        names = (
            "apiserver_port",
            "etcd_client_port",
            "etcd_peer_port",
            "controller_manager_port",
            "scheduler_port",
        )
        extra = [
            f"-e ttg_state_dir={self.state}",
            f"-e local_k8s_nodes={str(self.node).lower()}",
        ] + [f"-e local_k8s_{n}={p}" for n, p in zip(names, self.ports, strict=True)]
        return "ANSIBLE_ARGS=" + " ".join(extra)

    def make(self, *target: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run(["make", *target, self.args()], timeout=timeout)

    def kubectl_run(
        self, *args: str, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        r = self.kubectl_run(*args, stdin=stdin)
        assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stdout}{r.stderr}"
        return r.stdout

    def pids(self) -> dict[str, int]:
        """supervisord's pid and each program's, as supervisorctl reports them."""
        ctl = [
            str(ROOT / ".venv" / "bin" / "supervisorctl"),
            "-c",
            str(self.supervisor_conf),
        ]
        out = {"supervisord": int(subprocess.check_output([*ctl, "pid"], text=True))}
        for p in PROGRAMS + (NODE_PROGRAMS if self.node else ()):
            out[p] = int(subprocess.check_output([*ctl, "pid", f"ttg-k8s:{p}"], text=True))
        return out

    def server(self) -> str:
        """The API server's URL, from the admin kubeconfig (the node's address with a node)."""
        config = json.loads(self.ok("config", "view", "-o", "json"))
        return config["clusters"][0]["cluster"]["server"]

    def wait_for_default_serviceaccount(self, namespace: str) -> None:
        """The ServiceAccount admission plugin refuses pods until the controller manager has
        created the namespace's `default` ServiceAccount."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                self.kubectl_run("-n", namespace, "get", "serviceaccount", "default").returncode
                == 0
            ):
                return
            time.sleep(1)
        pytest.fail(f"no default ServiceAccount in {namespace} after 60 s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bins = paths()
    if not Path(bins["bin_dir"], "kube-apiserver").exists() and not shutil.which("go"):
        pytest.skip(
            f"the Kubernetes binaries are not in {bins['bin_dir']} and there is no go "
            "toolchain to build them (tools/k8s/build.sh)"
        )
    built = run([str(BUILD)], timeout=4 * 3600)  # a no-op when cached
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    c = Cluster(tmp_path_factory.mktemp("k8s"), free_ports(5), bins, not node_missing())
    up = c.make("k8s-up")
    try:
        assert up.returncode == 0, up.stdout[-6000:] + up.stderr[-3000:]
        yield c
    finally:
        down = c.make("k8s-down", "PURGE=yes")
        assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-2000:]


def test_server_reports_the_pinned_release(cluster: Cluster) -> None:
    pinned = run([str(BUILD), "--version"]).stdout.strip()
    assert pinned.startswith("v1.")
    version = json.loads(cluster.ok("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned
    assert version["serverVersion"]["minor"] == pinned.split(".")[1]


def test_admin_is_master_and_rbac_refuses_others(cluster: Cluster) -> None:
    assert cluster.ok("auth", "can-i", "*", "*").strip() == "yes"
    r = cluster.kubectl_run("auth", "can-i", "create", "pods", "--as=system:kube-scheduler")
    assert r.stdout.strip() == "no", r.stdout + r.stderr
    # No anonymous access: the server refuses a client without a certificate.
    ctx = ssl.create_default_context(cafile=str(cluster.dir / "pki" / "ca.crt"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.server()}/readyz", context=ctx, timeout=30)
    assert refused.value.code == 401


def _pod(name: str, namespace: str, compliant: bool) -> str:
    container: dict = {"name": "c", "image": "registry.invalid/ttg/none:1"}
    if compliant:
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    else:  # (privileged: true never reaches PodSecurity: the API server refuses it itself)
        container["securityContext"] = {"allowPrivilegeEscalation": True, "runAsUser": 0}
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [container]},
        }
    )


def test_pod_security_restricted_is_enforced(cluster: Cluster) -> None:
    ns = "ttg-pss-restricted"
    cluster.ok("create", "namespace", ns)
    cluster.ok("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    cluster.wait_for_default_serviceaccount(ns)
    refused = cluster.kubectl_run("create", "-f", "-", stdin=_pod("bad", ns, False))
    assert refused.returncode != 0, refused.stdout
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    assert "allowPrivilegeEscalation" in refused.stderr
    assert cluster.kubectl_run("-n", ns, "get", "pod", "bad").returncode != 0
    accepted = cluster.ok(
        "create",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        stdin=_pod("good", ns, True),
    )
    assert json.loads(accepted)["metadata"]["namespace"] == ns
    # The same violating pod is admitted where nothing is enforced: the refusal was PodSecurity's.
    cluster.wait_for_default_serviceaccount("default")
    cluster.ok("create", "--dry-run=server", "-f", "-", stdin=_pod("bad", "default", False))


def _structural(schema: dict) -> dict:
    """A CRD's structural OpenAPI schema from a test JSON schema (const -> enum; CRDs prune
    and, with kubectl's strict field validation, refuse unknown fields themselves)."""
    out: dict = {}
    for key, value in schema.items():
        if key in ("$schema", "description"):
            continue
        if key == "const":
            out["enum"] = [value]
            out.setdefault("type", "string")
        elif key == "properties":
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key in ("items",) or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _structural(value)
        elif key == "additionalProperties":
            continue
        elif key == "type" and isinstance(value, list):  # ["string", "null"]: one type
            out["type"] = next(t for t in value if t != "null")
            if "null" in value:
                out["nullable"] = True
        else:
            out[key] = copy.deepcopy(value)
    if out.get("type") == "array" and "items" not in out:  # structural: items are typed
        out["items"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if "enum" in out and "type" not in out:  # a structural schema types every field
        kinds = {type(v) for v in out["enum"]}
        out["type"] = (
            {str: "string", int: "integer", bool: "boolean"}.get(kinds.pop(), "string")
            if len(kinds) == 1
            else "string"
        )
    return out


def _crd(schema_file: str) -> dict:
    group, version, kind, plural = CRDS[schema_file]
    schema = json.loads((SCHEMAS / schema_file).read_text())
    props = {k: _structural(v) for k, v in schema["properties"].items() if k != "metadata"}
    props["metadata"] = {"type": "object"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": props,
                            "required": [r for r in schema.get("required", []) if r != "metadata"],
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> list[str]:
    """KEDA's and the Prometheus operator's CRDs, from tests/k8s/schemas/ (the subset TTG
    renders), installed so the -extras variants go through the server too."""
    docs = [_crd(f) for f in sorted(CRDS)]
    assert {d["spec"]["names"]["kind"] for d in docs} == CRD_KINDS
    cluster.ok(
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )
    names = [d["metadata"]["name"] for d in docs]
    cluster.ok(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *[f"crd/{n}" for n in names],
    )
    return names


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_pass_a_server_side_dry_run(
    cluster: Cluster, crds: list[str], render_dir: Path, variant: str
) -> None:
    """Everything `make manifests` renders, through the real API server's validation,
    admission (PodSecurity at the namespace's own level) and defaulting, without persisting."""
    d = render_dir / variant
    files = sorted(d.glob("*.yml"))
    assert files and files[0].name == "00-namespace.yml", [f.name for f in files]
    # The namespace for real (a dry run of it would not make it exist for the rest).
    cluster.ok("apply", "-f", str(files[0]))
    ns = [doc["metadata"]["name"] for doc in load_docs(files[0]) if doc["kind"] == "Namespace"]
    for n in ns:
        cluster.wait_for_default_serviceaccount(n)
    args = ["apply", "--dry-run=server", "-o", "json"]
    for f in files[1:]:
        args += ["-f", str(f)]
    r = cluster.kubectl_run(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    # PodSecurity refuses pods but only warns on the workloads that would create them.
    assert "would violate PodSecurity" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    applied = out["items"] if out.get("kind") == "List" else [out]
    expected = sum(len(load_docs(f)) for f in files[1:])
    assert len(applied) == expected, f"{len(applied)} of {expected} objects went through"
    kinds = {o["kind"] for o in applied}
    assert {"Secret", "NetworkPolicy", "Job"} <= kinds, kinds


def test_the_chaos_job_may_create_only_the_armed_worker(cluster: Cluster,
                                                       render_dir: Path) -> None:
    """RBAC lets ttg-chaos create pods but cannot say which, and a pod may mount any Secret of
    its namespace: the admission policy of chaos-access.yml decides. On the real API server
    (as the chaos ServiceAccount, server-side dry runs): the armed worker's shape passes; a
    pod with another ServiceAccount, a token, another image or the broker's Secret is
    refused with the policy's message."""
    ns = "ttg-vap"
    d = render_dir / "kind" / "redis-chaos"

    def moved(docs: list[dict]) -> list[dict]:  # the rendered namespace `ttg` -> ns
        text = json.dumps(docs).replace('"ttg"', f'"{ns}"')
        text = text.replace("system:serviceaccount:ttg:", f"system:serviceaccount:{ns}:")
        return json.loads(text.replace("ttg-chaos-pods.ttg", f"ttg-chaos-pods.{ns}"))

    setup = moved(load_docs(d / "00-namespace.yml") + load_docs(d / "08-chaos-access.yml"))
    assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= {
        x["kind"] for x in setup}
    cluster.ok("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": setup}))
    try:
        cluster.wait_for_default_serviceaccount(ns)
        template = load_docs(d / "04-workers.yml")[0]["spec"]["template"]
        armed = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"generateName": "ttg-armed-", "namespace": ns,
                              "labels": template["metadata"]["labels"]},
                 "spec": {**template["spec"], "restartPolicy": "Never"}}

        def create(pod: dict, as_chaos: bool = True) -> subprocess.CompletedProcess[str]:
            who = [f"--as=system:serviceaccount:{ns}:ttg-chaos"] if as_chaos else []
            return cluster.kubectl_run("create", "--dry-run=server", "-o", "name", "-f", "-",
                                       *who, stdin=json.dumps(pod))

        # a new policy takes a moment to reach the admission chain: wait until it refuses
        probe = dict(armed, spec={**armed["spec"], "serviceAccountName": "default"})
        deadline = time.monotonic() + 60
        while create(probe).returncode == 0:
            assert time.monotonic() < deadline, "the admission policy never came into force"
            time.sleep(1)
        ok = create(armed)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        spec = armed["spec"]
        c0 = spec["containers"][0]
        refused = {
            "run as ttg-worker": {**spec, "serviceAccountName": "ttg-chaos"},
            "without a token": {**spec, "automountServiceAccountToken": True},
            "of the worker image": {**spec, "containers": [{**c0, "image": "busybox:1"}]},
            "no Secret but the workers' own": {**spec, "volumes": [
                *spec.get("volumes", []),
                {"name": "loot", "secret": {"secretName": "ttg-redis"}}]},
            "no Secret through their environment": {**spec, "containers": [{**c0, "env": [
                *c0.get("env", []), {"name": "X", "valueFrom": {"secretKeyRef": {
                    "name": "ttg-redis", "key": "password"}}}]}]},
        }
        for why, bad_spec in refused.items():
            r = create(dict(armed, spec=bad_spec))
            assert r.returncode != 0, why
            assert "ttg-chaos-pods" in r.stderr and why in r.stderr, r.stderr
        # the policy binds the chaos ServiceAccount only: the admin may still create such pods
        r = create(dict(armed, spec=refused["of the worker image"]), as_chaos=False)
        assert r.returncode == 0, r.stderr
    finally:
        cluster.kubectl_run("delete", "namespace", ns, "--wait=false")
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            cluster.kubectl_run("delete", kind, f"ttg-chaos-pods.{ns}", "--ignore-not-found")


BASE_IMAGE = "ttg-base:bookworm-py311"  # scripts/build-base-image.sh (debootstrap)
LOAD_IMAGES = ROOT / "roles" / "local_k8s" / "files" / "load_images.sh"
# A server that writes to its claim and serves it, a client that finds it by its Service's name
# (CoreDNS, kube-proxy) and asks the API server for its version with its ServiceAccount token.
CLIENT = """
import ssl, time, urllib.request
for _ in range(120):
    try:
        body = urllib.request.urlopen("http://echo/file", timeout=2).read().decode()
        break
    except OSError as exc:
        time.sleep(1)
print("served:", body.strip(), flush=True)
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
req = urllib.request.Request("https://kubernetes.default.svc/version",
                             headers={"Authorization": "Bearer " + open(sa + "/token").read()})
version = urllib.request.urlopen(req, context=ctx, timeout=10).read().decode()
print("api:", version.replace("\\n", " "), flush=True)
"""


def _restricted(name: str, command: list[str], **extra: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "c",
                    "image": BASE_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    **extra.pop("container", {}),  # type: ignore[dict-item]
                }
            ],
            **extra,
        },
    }


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> Cluster:
    if not cluster.node:
        pytest.skip(node_missing())
    image = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False
    )
    if image.returncode != 0:
        pytest.skip(f"no {BASE_IMAGE} image (scripts/build-base-image.sh builds it)")
    socket_path = cluster.dir / "containerd" / "containerd.sock"
    loaded = run([str(LOAD_IMAGES), str(socket_path), BASE_IMAGE], timeout=300)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    return cluster


def test_node_runs_restricted_pods_with_a_volume_dns_services_and_the_api(node: Cluster) -> None:
    """The real kubelet, containerd and runc run pods the restricted profile admits; the
    provisioner binds a claim; CoreDNS and kube-proxy take a pod to another by its Service's
    name; a pod reaches the API server through the kubernetes Service."""
    ns = "ttg-node-probe"
    node.ok("create", "namespace", ns)
    node.ok("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    node.wait_for_default_serviceaccount(ns)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    server = _restricted(
        "echo",
        [
            "sh",
            "-c",
            "echo persisted-$(hostname) > /data/file"
            " && cd /data && exec python3 -m http.server 8080",
        ],
        container={
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        },
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
    )
    client = _restricted("client", ["python3", "-c", CLIENT], restartPolicy="Never")
    items = {"apiVersion": "v1", "kind": "List", "items": [claim, service, server, client]}
    node.ok("-n", ns, "apply", "-f", "-", stdin=json.dumps(items))
    node.ok("-n", ns, "wait", "--for=condition=Ready", "pod/echo", "--timeout=120s")
    node.ok(
        "-n", ns, "wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/client", "--timeout=180s"
    )
    log = node.ok("-n", ns, "logs", "client")
    assert "served: persisted-echo" in log, log
    assert f'"gitVersion": "{node.version}"' in log, log
    volume = node.ok("-n", ns, "get", "pvc", "data", "-o", "jsonpath={.spec.volumeName}")
    path = json.loads(node.ok("get", "pv", volume, "-o", "json"))["spec"]["hostPath"]["path"]
    assert Path(path, "file").read_text().strip() == "persisted-echo"
    # Deleting the namespace releases the claim: the provisioner removes the volume and its data.
    node.ok("delete", "namespace", ns, "--timeout=120s")
    deadline = time.monotonic() + 60
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert not Path(path).exists(), f"{path} is still there after its claim went"


DEMO_PARAMS = 3000


@pytest.fixture(scope="module")
def demo_env(node: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What `make demo PLATFORM=k8s` is given here: the module's cluster by KUBECONFIG (as a
    user of any cluster gives theirs), its state dir and a runs dir of the module's own."""
    runs = tmp_path_factory.mktemp("k8s-runs")
    return {
        "KUBECONFIG": node.kubeconfig,
        "ANSIBLE_ARGS": f"-e ttg_state_dir={node.state} -e ttg_runs_dir={runs}",
        "runs": str(runs),
    }


@pytest.mark.parametrize("backend", ["redis", "rabbitmq", "static"])
def test_make_demo_runs_on_the_local_cluster_to_the_exact_sum(
    node: Cluster, demo_env: dict[str, str], backend: str
) -> None:
    """`make demo PLATFORM=k8s`: images built and loaded into the node, the broker a
    StatefulSet on a provisioned volume, the fleet, the in-cluster sweep Job, and the run
    directory copied back, every point's result in it once."""
    run_id = f"k8s-demo-{backend}"
    r = run(
        [
            "make",
            "demo",
            "PLATFORM=k8s",
            f"BACKEND={backend}",
            f"PARAMS={DEMO_PARAMS}",
            "CHUNK=100",
            "WORKERS=2",
            f"RUN_ID={run_id}",
            f"ANSIBLE_ARGS={demo_env['ANSIBLE_ARGS']}",
        ],
        timeout=1200,
        KUBECONFIG=demo_env["KUBECONFIG"],
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert f"target: {node.server()}" in r.stdout, r.stdout[-3000:]
    run_dir = Path(demo_env["runs"]) / run_id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["platform"] == "k8s" and summary["backend"] == backend
    assert summary["chunks_done"] == summary["chunks_total"] == DEMO_PARAMS // 100
    assert summary["result"]["count"] == DEMO_PARAMS
    assert "verdict  OK" in r.stdout, r.stdout[-3000:]
    table = pq.read_table(run_dir / "results.parquet")
    indices = table.column("index").to_pylist()
    assert sorted(indices) == list(range(DEMO_PARAMS)), "one row per point, none missing"
    assert summary["results"]["path"] == str(run_dir / "results.parquet")
    # The broker's data is on a volume the provisioner made for its claim.
    broker = "rabbitmq" if backend == "rabbitmq" else "redis"
    volume = node.ok(
        "-n", "ttg", "get", "pvc", f"data-ttg-{broker}-0", "-o", "jsonpath={.spec.volumeName}"
    )
    assert volume.startswith("pvc-"), volume


def test_a_fleet_whose_image_cannot_be_pulled_fails_at_once_with_the_reason(
    node: Cluster, demo_env: dict[str, str]
) -> None:
    """A worker image the node does not have (and may not pull: no traffic leaves the
    machine): the fleet's wait ends on the pods' ErrImageNeverPull, and the last line names
    the pod and the reason, instead of a wait until its timeout and a sweep that never
    starts."""
    t0 = time.monotonic()
    r = run(
        [
            "make",
            "demo",
            "PLATFORM=k8s",
            "BACKEND=redis",
            "PARAMS=1000",
            "CHUNK=100",
            "WORKERS=2",
            "RUN_ID=k8s-no-image",
            f"ANSIBLE_ARGS={demo_env['ANSIBLE_ARGS']} -e k8s_app_image=ttg.local/no-such:0"
            " -e k8s_app_image_pull_policy=Never -e k8s_app_wait_timeout=300",
        ],
        timeout=900,
        KUBECONFIG=demo_env["KUBECONFIG"],
    )
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stdout[-3000:]
    # the last line before make's own "Error 2"
    last = ([x for x in r.stderr.strip().splitlines() if not x.startswith("make")] or [""])[-1]
    assert "the worker fleet cannot start: ttg-workers-" in last, r.stderr[-3000:]
    assert "ErrImageNeverPull" in last, last
    assert took < 300, f"{took:.0f} s: the wait ran to its timeout instead of ending on the pods"
    # the pods that cannot start are not left behind to retry for ever
    node.ok("-n", "ttg", "delete", "deployment", "ttg-workers", "--ignore-not-found")


def test_make_clean_leaves_no_pod_or_job_and_purge_no_claim(
    node: Cluster, demo_env: dict[str, str]
) -> None:
    """`make clean PLATFORM=k8s`: the project's objects go with their dependents (a Job's pods
    too); the brokers' claims stay unless purged, and a purge leaves no claim and no volume."""
    argv = ["make", "clean", "PLATFORM=k8s", "CONFIRM=yes"]
    env = {"KUBECONFIG": demo_env["KUBECONFIG"]}
    r = run([*argv, f"ANSIBLE_ARGS={demo_env['ANSIBLE_ARGS']}"], timeout=900, **env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    left = json.loads(node.ok("-n", "ttg", "get", "pods,jobs", "-o", "json"))["items"]
    assert not left, [f"{o['kind']} {o['metadata']['name']}" for o in left]
    claims = json.loads(node.ok("-n", "ttg", "get", "pvc", "-o", "json"))["items"]
    assert claims, "the brokers' data is kept without purge"
    purge = f"ANSIBLE_ARGS={demo_env['ANSIBLE_ARGS']} --tags purge"
    r = run([*argv, purge], timeout=900, **env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert node.kubectl_run("get", "namespace", "ttg").returncode != 0
    deadline = time.monotonic() + 60
    volumes: list = ["?"]
    while volumes and time.monotonic() < deadline:
        volumes = json.loads(node.ok("get", "pv", "-o", "json"))["items"]
        time.sleep(1)
    assert not volumes, [v["metadata"]["name"] for v in volumes]


def test_second_k8s_up_changes_nothing(cluster: Cluster) -> None:
    """`make k8s-up` on a running cluster (node included) is idempotent: no task changes."""
    again = cluster.make("k8s-up")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "changed)" not in again.stdout, again.stdout[-4000:]


def test_down_leaves_no_process_of_the_cluster(cluster: Cluster) -> None:
    """Last in this module: `make k8s-down` stops supervisord and every program, by pid."""
    before = cluster.pids()
    assert all(pid > 0 for pid in before.values()), before
    for pid in before.values():
        assert Path(f"/proc/{pid}").exists()
    down = cluster.make("k8s-down")
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-2000:]
    deadline = time.monotonic() + 30
    alive = before
    while alive and time.monotonic() < deadline:
        alive = {n: p for n, p in before.items() if _running(p)}
        time.sleep(0.5)
    assert not alive, f"still running after make k8s-down: {alive}"
    if cluster.node:  # nothing of the node is left on the machine
        assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _pod_process(p, cluster)]
        mounts = Path("/proc/self/mounts").read_text()
        assert str(cluster.dir) + "/" not in mounts, mounts
        assert (
            subprocess.run(
                ["ip", "link", "show", "dev", "ttg0"], capture_output=True, check=False
            ).returncode
            != 0
        )
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        assert "KUBE-" not in rules and "ttg-k8s" not in rules, rules
        assert not Path("/run/ttg-k8s-node.owner").exists()
    # The data stays without PURGE=yes: the CA and etcd's data dir are still there.
    assert (cluster.dir / "pki" / "ca.crt").exists()
    assert any((cluster.dir / "etcd").iterdir())


def _pod_process(cmdline: Path, cluster: Cluster) -> bool:
    """A containerd shim of the cluster's containerd, or a pod's pause process."""
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    socket_path = str(cluster.dir / "containerd" / "containerd.sock").encode()
    return socket_path in argv or argv[0] == b"/pause"


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
