"""Every manifest of every platform x backend, rendered through Ansible (the k8s_app role's
`render` entry point, the inventories' own variables), validated offline for the pinned
Kubernetes version and held to the Pod Security Standard "restricted" and to TTG's policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from .helpers import (
    BACKENDS,
    CRD_KINDS,
    PLATFORMS,
    ROOT,
    kubernetes_version,
    pod_specs,
    run,
    tool,
)

VARIANTS = [
    f"{p}/{b}{x}" for p in PLATFORMS for b in BACKENDS for x in ("", "-extras", "-chaos")
]
SCHEMAS = Path(__file__).parent / "schemas"
PLACEHOLDER = "rendered-offline-not-a-secret"
BASE = [
    "00-namespace.yml",
    "01-secrets.yml",
    "02-networkpolicies.yml",
    "03-broker.yml",
    "04-workers.yml",
    "09-sweep-job.yml",
]


def docs_of(manifests: dict, variant: str) -> list[dict]:
    return [d for docs in manifests[variant].values() for d in docs]


def test_every_platform_backend_and_variant_is_rendered(manifests: dict) -> None:
    assert sorted(manifests) == sorted(VARIANTS)
    for variant, files in manifests.items():
        queue = "static" not in variant
        expected = set(BASE) | ({"05-pdb.yml"} if queue else set())
        if variant.endswith("-extras"):
            expected |= {"07-podmonitor.yml"} | ({"06-keda.yml"} if queue else set())
        if variant.endswith("-chaos"):
            expected |= {"08-chaos-access.yml"}
        assert set(files) == expected, variant


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kubernetes_validate_strict(render_dir: Path, platform: str) -> None:
    """kubernetes-validate --strict against the pinned version, every built-in kind."""
    files = sorted(
        str(f)
        for f in (render_dir / platform).glob("*/*.yml")
        if f.name not in {"06-keda.yml", "07-podmonitor.yml"}
    )
    version = kubernetes_version()
    result = run(
        [tool("kubernetes-validate"), "--strict", "-k", version, *files], timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    passed = re.findall(r"passed for resource", result.stdout + result.stderr)
    docs = sum(len(ds) for ds in _docs_of_files(files))
    assert len(passed) == docs, f"{len(passed)} validated of {docs} documents"


def _docs_of_files(files: list[str]) -> list[list[dict]]:
    from .helpers import load_docs

    return [load_docs(Path(f)) for f in files]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("-extras")])
def test_optional_custom_resources_match_their_schemas(
    manifests: dict, variant: str
) -> None:
    """KEDA and Prometheus Operator kinds are not in the Kubernetes schema: checked against
    the CRDs' own schema (the fields TTG uses, unknown fields rejected)."""
    schemas = {
        "ScaledObject": "keda-scaledobject.json",
        "TriggerAuthentication": "keda-triggerauthentication.json",
        "PodMonitor": "monitoring-podmonitor.json",
    }
    seen = set()
    for doc in docs_of(manifests, variant):
        if doc["kind"] in CRD_KINDS:
            schema = json.loads((SCHEMAS / schemas[doc["kind"]]).read_text())
            jsonschema.validate(doc, schema)
            seen.add(doc["kind"])
    assert "PodMonitor" in seen
    if "static" not in variant:
        assert {"ScaledObject", "TriggerAuthentication"} <= seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_keda_counts_in_flight_work(manifests: dict, variant: str) -> None:
    for doc in docs_of(manifests, variant):
        if doc["kind"] != "ScaledObject":
            continue
        triggers = doc["spec"]["triggers"]
        if "rabbitmq" in variant:
            # The management API's count is ready + unacknowledged; AMQP's is ready only.
            assert [t["metadata"]["protocol"] for t in triggers] == ["http"]
            assert triggers[0]["metadata"]["mode"] == "QueueLength"
        else:
            keys = {k for t in triggers for k in t["metadata"]}
            assert {"lagCount", "pendingEntriesCount"} <= keys
        down = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
            "scaleDown"
        ]
        assert down["stabilizationWindowSeconds"] >= 60


# ---- Pod Security Standard "restricted", and TTG's own rules -------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_restricted(manifests: dict, variant: str) -> None:
    pods = [p for doc in docs_of(manifests, variant) for p in pod_specs(doc)]
    assert pods, variant
    for where, spec in pods:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, where
        assert isinstance(psc.get("runAsGroup"), int) and psc["runAsGroup"] > 0, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert (
            not spec.get("hostNetwork")
            and not spec.get("hostPID")
            and not spec.get("hostIPC")
        )
        # Only the chaos Job talks to the API (its own ServiceAccount and Role).
        chaos = spec.get("serviceAccountName") == "ttg-chaos"
        assert spec.get("automountServiceAccountToken") is chaos, where
        assert not chaos or variant.endswith("-chaos"), where
        for vol in spec.get("volumes", []):
            allowed = {
                "name",
                "emptyDir",
                "configMap",
                "secret",
                "projected",
                "persistentVolumeClaim",
                "downwardAPI",
            }
            assert set(vol) <= allowed, (
                f"{where}: volume {vol['name']} is {set(vol) - allowed}"
            )
        for c in spec.get("initContainers", []) + spec["containers"]:
            name = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("privileged") is not True, name
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, name
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), (
                name
            )
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{name}: {kind}"
            image = c["image"]
            assert re.match(r"^[^:@]+(:[^:@]+)?(@sha256:[0-9a-f]{64})?$", image), name
            assert ":" in image.rsplit("/", 1)[-1] or "@" in image, (
                f"{name}: unpinned {image}"
            )
            assert not image.endswith(":latest"), f"{name}: {image}"
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for m in c.get("volumeMounts", []):
                vol = vols.get(m["name"])
                if (
                    vol is None
                ):  # a StatefulSet's volumeClaimTemplate: the broker's data
                    assert where.startswith("StatefulSet/") and m["name"] == "data", (
                        name
                    )
                elif not m.get("readOnly"):
                    assert "emptyDir" in vol, (
                        f"{name}: writable mount {m['mountPath']} is not an emptyDir"
                    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_long_running_containers_have_probes(manifests: dict, variant: str) -> None:
    for doc in docs_of(manifests, variant):
        long_running = doc["kind"] in {"Deployment", "StatefulSet"} or (
            doc["kind"] == "Job" and doc["spec"].get("completionMode") == "Indexed"
        )
        if not long_running:
            continue
        for where, spec in pod_specs(doc):
            for c in spec["containers"]:
                assert "livenessProbe" in c and "readinessProbe" in c, (
                    f"{where}/{c['name']}"
                )


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespace_enforces_restricted(manifests: dict, variant: str) -> None:
    ns = [d for d in docs_of(manifests, variant) if d["kind"] == "Namespace"]
    assert len(ns) == 1
    labels = ns[0]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    cluster_scoped = {"Namespace", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert all(
        d["metadata"].get("namespace") == ns[0]["metadata"]["name"]
        for d in docs_of(manifests, variant)
        if d["kind"] not in cluster_scoped
    )
    # the only cluster-scoped objects but the namespace carry its name (one per namespace)
    assert all(d["metadata"]["name"].endswith("." + ns[0]["metadata"]["name"])
               for d in docs_of(manifests, variant)
               if d["kind"] in cluster_scoped - {"Namespace"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_plain_text_credentials(manifests: dict, variant: str) -> None:
    """The password is only ever in a Secret; pods read it from a mounted file or a
    secretKeyRef; no env var that looks like a credential has a literal value."""
    for doc in docs_of(manifests, variant):
        text = json.dumps(doc)
        if doc["kind"] == "Secret":
            assert "stringData" not in doc
            continue
        assert PLACEHOLDER not in text, f"{doc['kind']}/{doc['metadata']['name']}"
        assert "guest" not in text.replace("loopback_users.guest = true", ""), doc[
            "kind"
        ]
        for where, spec in pod_specs(doc):
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    if re.search(r"PASS|SECRET|TOKEN|AUTH|COOKIE", e["name"]) and not e[
                        "name"
                    ].endswith("_FILE"):
                        assert "value" not in e and "secretKeyRef" in e.get(
                            "valueFrom", {}
                        ), f"{where}: {e['name']}"
                for arg in c.get("args", []) + c.get("command", []):
                    assert not re.search(
                        r"(?i)--?(requirepass|password)\b", str(arg)
                    ), where
                    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(arg)), where
                for e in c.get("env", []):
                    assert not re.search(
                        r"://[^/@\s]+:[^/@\s]+@", str(e.get("value", ""))
                    ), where


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies(manifests: dict, variant: str) -> None:
    docs = docs_of(manifests, variant)
    pols = {
        d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"
    }
    deny = pols["ttg-default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {
        "Ingress",
        "Egress",
    }
    assert "ingress" not in deny and "egress" not in deny
    dns = pols["ttg-allow-dns"]
    assert dns["policyTypes"] == ["Egress"]
    assert {p["port"] for r in dns["egress"] for p in r["ports"]} == {53}
    # a policy per component, selecting each workload's pods
    for doc in docs:
        for where, _spec in pod_specs(doc):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            own = [
                n
                for n, p in pols.items()
                if n not in {"ttg-default-deny", "ttg-allow-dns"}
                and all(
                    labels.get(k) == v
                    for k, v in p["podSelector"]["matchLabels"].items()
                )
            ]
            assert own, f"{where} has no NetworkPolicy of its own"
    broker = pols["ttg-broker"]
    assert broker["egress"] == []
    port = 5672 if "rabbitmq" in variant else 6379
    client_rule = broker["ingress"][0]
    assert client_rule["from"] == [
        {"podSelector": {"matchLabels": {"ttg.io/broker-client": "true"}}}
    ]
    assert [p["port"] for p in client_rule["ports"]] == [port]
    for name in ("ttg-worker", "ttg-controller"):
        egress = pols[name]["egress"]
        assert len(egress) == 1 and [p["port"] for p in egress[0]["ports"]] == [port], (
            name
        )
    if not variant.endswith("-extras"):
        assert len(broker["ingress"]) == 1
        assert (
            pols["ttg-worker"]["ingress"] == []
            and pols["ttg-controller"]["ingress"] == []
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_broker_is_a_statefulset_with_a_pvc(manifests: dict, variant: str) -> None:
    docs = manifests[variant]["03-broker.yml"]
    sts = [d for d in docs if d["kind"] == "StatefulSet"]
    assert len(sts) == 1
    spec = sts[0]["spec"]
    claim = spec["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"]
    platform = variant.split("/")[0]
    assert (
        claim.get("storageClassName")
        == {"kind": "standard", "aks": "managed-csi"}[platform]
    )
    services = {
        d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"
    }
    headless = [s for s in services.values() if s.get("clusterIP") == "None"]
    assert len(headless) == 1 and len(services) == 2
    assert spec["serviceName"] in services
    c = spec["template"]["spec"]["containers"][0]
    assert "startupProbe" in c
    if "rabbitmq" in variant:
        conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["10-ttg.conf"]
        assert "default_queue_type = quorum" in conf
        timeout = int(re.search(r"consumer_timeout = (\d+)", conf).group(1))
        assert timeout >= 900000
        assert {p["name"] for p in c["ports"]} >= {"amqp", "management"}
        assert (
            c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"]
            >= 120
        )
    else:
        conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["redis.conf"]
        assert "appendonly yes" in conf and re.search(
            r"appendfsync (everysec|always)", conf
        )
        assert (
            "include /etc/redis/secret/auth.conf" in conf and "requirepass" not in conf
        )
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = " ".join(c[probe]["exec"]["command"])
            assert "redis-cli" in cmd and "cat /etc/redis/secret/password" in cmd
        # the password is a mounted file, not an environment variable (checkov CKV_K8S_35)
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))


@pytest.mark.parametrize("variant", VARIANTS)
def test_workers(manifests: dict, variant: str) -> None:
    docs = manifests[variant]["04-workers.yml"]
    assert len(docs) == 1
    w = docs[0]
    pod = w["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TTG_BROKER_PASSWORD_FILE"].startswith("/var/run/secrets/")
    chunk_s = 100 * 1 / 1000  # inventories: 100 params per chunk x 1 ms
    assert pod["terminationGracePeriodSeconds"] > chunk_s
    if "static" in variant:
        assert w["kind"] == "Job"
        assert w["spec"]["completionMode"] == "Indexed"
        assert w["spec"]["completions"] == w["spec"]["parallelism"] == 3
        assert w["spec"]["backoffLimitPerIndex"] >= 1
        assert pod["restartPolicy"] == "Never"
    else:
        assert w["kind"] == "Deployment"
        assert (
            "replicas" not in w["spec"]
            if variant.endswith("-extras")
            else w["spec"]["replicas"] == 3
        )
        pdb = manifests[variant]["05-pdb.yml"][0]
        assert pdb["kind"] == "PodDisruptionBudget"
        assert (
            pdb["spec"]["selector"]["matchLabels"]
            == w["spec"]["selector"]["matchLabels"]
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_sweep_runs_in_cluster_with_the_worker_image(
    manifests: dict, variant: str
) -> None:
    job = manifests[variant]["09-sweep-job.yml"][0]
    workers = manifests[variant]["04-workers.yml"][0]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == workers["spec"]["template"]["spec"]["containers"][0]["image"]
    if variant.endswith("-chaos"):
        assert c["args"][:6] == ["chaos", "--fault", "poison", "--at", "0.3", "--json"]
    else:
        assert c["args"][:2] == ["sweep", "--json"]
    assert c["args"][c["args"].index("--platform") + 1] == variant.split("/")[0]
    assert job["spec"]["activeDeadlineSeconds"] > 0


def test_aks_uses_the_registry_image(manifests: dict) -> None:
    image = manifests["aks/redis"]["04-workers.yml"][0]["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert re.match(r"^ttg[0-9a-f]+\.azurecr\.io/ttg-worker:\d+\.\d+\.\d+$", image), (
        image
    )
    kind = manifests["kind/redis"]["04-workers.yml"][0]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert (
        kind["image"] == "ttg-worker:0.1.0"
        and kind["imagePullPolicy"] == "IfNotPresent"
    )


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.endswith("-chaos")])
def test_chaos_has_only_the_access_it_needs(manifests: dict, variant: str) -> None:
    """`make chaos` on Kubernetes: the in-cluster `ttg chaos` Job alone gets an API token, its
    Role grants exactly the verbs the faults use in the namespace, the API server is the
    only new egress, and the fault's hook reaches the workers' environment."""
    access = {d["kind"]: d for d in manifests[variant]["08-chaos-access.yml"]}
    assert set(access) == {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
                           "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    # RBAC cannot say which pods it may create: the admission policy does, for it alone
    vap = access["ValidatingAdmissionPolicy"]["spec"]
    assert vap["failurePolicy"] == "Fail"
    assert "system:serviceaccount:ttg:ttg-chaos" in vap["matchConditions"][0]["expression"]
    rules = " ".join(v["expression"] for v in vap["validations"])
    workers = manifests[variant]["04-workers.yml"][0]["spec"]["template"]["spec"]
    assert f"'{workers['containers'][0]['image']}'" in rules
    assert "'ttg-worker'" in rules and "'ttg-broker-worker'" in rules
    vapb = access["ValidatingAdmissionPolicyBinding"]["spec"]
    assert vapb["policyName"] == access["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert vapb["validationActions"] == ["Deny"]
    assert access["ServiceAccount"]["automountServiceAccountToken"] is False
    rules = {
        (r["apiGroups"][0], res): (set(r["verbs"]), tuple(r.get("resourceNames", [])))
        for r in access["Role"]["rules"]
        for res in r["resources"]
    }
    assert rules == {
        ("", "pods"): ({"get", "list", "delete", "create"}, ()),
        ("apps", "deployments"): ({"get"}, ("ttg-workers",)),
        ("apps", "deployments/scale"): ({"get", "patch"}, ("ttg-workers",)),
    }
    binding = access["RoleBinding"]
    assert binding["roleRef"]["name"] == "ttg-chaos"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ttg-chaos", "namespace": "ttg"}
    ]
    pol = access["NetworkPolicy"]["spec"]
    assert pol["policyTypes"] == ["Egress"]
    assert {p["port"] for r in pol["egress"] for p in r["ports"]} == {443, 6443}
    job = manifests[variant]["09-sweep-job.yml"][0]
    tmpl = job["spec"]["template"]
    assert tmpl["spec"]["serviceAccountName"] == "ttg-chaos"
    assert all(
        tmpl["metadata"]["labels"].get(k) == v
        for k, v in pol["podSelector"]["matchLabels"].items()
    )
    env = {e["name"]: e for e in tmpl["spec"]["containers"][0]["env"]}
    assert env["TTG_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    workers = manifests[variant]["04-workers.yml"][0]["spec"]["template"]["spec"]
    wenv = {e["name"]: e.get("value") for e in workers["containers"][0]["env"]}
    assert wenv["TTG_POISON_PARAM"] == "300"
    # the plain variant of the same backend has none of it
    plain = manifests[variant.removesuffix("-chaos")]
    assert "08-chaos-access.yml" not in plain
    assert "TTG_POISON_PARAM" not in json.dumps(plain["04-workers.yml"])


def _secrets(manifests: dict, variant: str) -> dict[str, dict[str, str]]:
    import base64

    return {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
            for d in manifests[variant]["01-secrets.yml"]}


def _mounted_secrets(doc: dict) -> set[str]:
    names = set()
    for _where, spec in pod_specs(doc):
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
            for src in v.get("projected", {}).get("sources", []):
                if "secret" in src:
                    names.add(src["secret"]["name"])
    return names


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_broker_user_per_client(manifests: dict, variant: str) -> None:
    """The workers log in as ttg-worker and mount only its password; the sweep Job as the
    controller with its own; the broker's users carry the local roles' rules (one definition
    for both platforms); KEDA reads with the monitor's credentials."""
    secrets = _secrets(manifests, variant)
    rabbit = "rabbitmq" in variant
    own = _broker_secret(variant)
    worker = manifests[variant]["04-workers.yml"][0]
    job = manifests[variant]["09-sweep-job.yml"][0]
    assert _mounted_secrets(worker) == {"ttg-broker-worker"}
    assert _mounted_secrets(job) == {"ttg-broker-controller"}
    url = {e["name"]: e.get("value") for e in pod_specs(worker)[0][1]["containers"][0]["env"]}
    assert url["TTG_BROKER_URL"].startswith(("amqps://ttg-worker@", "rediss://ttg-worker@"))
    job_env = {e["name"]: e.get("value") for e in pod_specs(job)[0][1]["containers"][0]["env"]}
    assert job_env["TTG_BROKER_URL"].startswith(("amqps://ttg@", "rediss://ttg-controller@"))
    pw = {c: secrets[f"ttg-broker-{c}"]["password"] for c in ("controller", "worker")}
    assert len(set(pw.values()) | {secrets[own]["password"]}) == 3
    if rabbit:
        defs = json.loads(secrets[own]["definitions.json"])
        role = yaml.safe_load((ROOT / "roles/rabbitmq/defaults/main.yml").read_text())
        want = {u["name"]: u for u in role["rabbitmq_users"][1:]}
        perms = {p["user"]: p for p in defs["permissions"]}
        users = {u["name"]: u for u in defs["users"]}
        assert set(users) == {"ttg", "ttg-worker", "ttg-monitor"}
        assert users["ttg-worker"]["password"] == pw["worker"]
        assert users["ttg"]["password"] == pw["controller"]
        assert "administrator" not in json.dumps(defs)
        for name, u in want.items():
            assert {k: perms[name][k] for k in ("configure", "write", "read")} == {
                k: u[k] for k in ("configure", "write", "read")}, name
            assert users[name]["tags"] == ",".join(u["tags"])
        assert perms["ttg-worker"]["configure"] == "^$"
        assert "load_definitions" in secrets[own]["20-definitions.conf"]
    else:
        acl = secrets[own]["auth.conf"].splitlines()
        role = yaml.safe_load((ROOT / "roles/redis/defaults/main.yml").read_text())
        lines = {ln.split()[1]: ln for ln in acl if ln.startswith("user ")}
        assert set(lines) == {u["name"] for u in role["redis_acl_users"]}
        for u in role["redis_acl_users"]:
            assert lines[u["name"]].endswith(" ".join(u["rules"].split())), u["name"]
        assert f">{pw['worker']} " in lines["ttg-worker"]
        assert f">{pw['controller']} " in lines["ttg-controller"]
    if "extras" in variant and "static" not in variant:
        keda = secrets["ttg-keda-auth"]
        assert ("ttg-monitor:" in keda["host"]) if rabbit else keda["username"] == "ttg-monitor"


def _broker_secret(variant: str) -> str:
    """The broker's own Secret: named as its Service, so each broker of a namespace that has
    run both backends keeps its own (one shared name left the other's pod unable to start)."""
    return "ttg-rabbitmq" if "rabbitmq" in variant else "ttg-redis"


def _items(doc: dict) -> dict[str, set[str]]:
    """Per mounted Secret of a pod: the keys it projects."""
    out: dict[str, set[str]] = {}
    for _where, spec in pod_specs(doc):
        for v in spec.get("volumes", []):
            srcs = [v] if "secret" in v else v.get("projected", {}).get("sources", [])
            for src in srcs:
                sec = src.get("secret")
                if sec:
                    name = sec.get("secretName") or sec.get("name")
                    out.setdefault(name, set()).update(i["key"] for i in sec.get("items", []))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_broker_traffic_is_tls_by_default(manifests: dict, variant: str) -> None:
    """On kind/aks/k8s every client speaks TLS to the broker and verifies it against the
    deployment's CA; the broker has no plain listener; only the broker holds its key."""
    secrets = _secrets(manifests, variant)
    rabbit = "rabbitmq" in variant
    own = _broker_secret(variant)
    broker = next(d for d in manifests[variant]["03-broker.yml"] if d["kind"] == "StatefulSet")
    conf = next(d for d in manifests[variant]["03-broker.yml"] if d["kind"] == "ConfigMap")
    assert _items(broker)[own] >= {"tls.crt", "tls.key", "ca.crt"}
    if rabbit:
        text = conf["data"]["10-ttg.conf"]
        assert "listeners.tcp = none" in text and "listeners.ssl.default = 5672" in text
        assert "management.ssl.port = 15672" in text and "management.tcp" not in text
    else:
        text = conf["data"]["redis.conf"]
        assert "\nport 0\n" in "\n" + text and "tls-port 6379" in text
        probes = json.dumps(broker["spec"]["template"]["spec"]["containers"][0])
        assert probes.count("--tls --cacert /etc/redis/secret/ca.crt") == 3
    for name, doc, secret in [("workers", manifests[variant]["04-workers.yml"][0],
                               "ttg-broker-worker"),
                              ("sweep", manifests[variant]["09-sweep-job.yml"][0],
                               "ttg-broker-controller")]:
        env = {e["name"]: e.get("value") for e in pod_specs(doc)[0][1]["containers"][0]["env"]}
        assert env["TTG_BROKER_URL"].split("://")[0] in ("rediss", "amqps"), name
        assert env["TTG_BROKER_CA_FILE"] == "/var/run/secrets/ttg/ca.crt", name
        assert _items(doc)[secret] == {"password", "ca.crt"}, name
        assert "tls.key" not in secrets[secret]
        assert secrets[secret]["ca.crt"] == secrets[own]["ca.crt"]
    if "extras" in variant and "static" not in variant:
        keda = secrets["ttg-keda-auth"]
        assert keda["tls"] == "enable" and keda["ca"] == secrets[own]["ca.crt"]
        if rabbit:
            assert keda["host"].startswith("https://ttg-monitor:")
        auth = next(d for d in manifests[variant]["06-keda.yml"]
                    if d["kind"] == "TriggerAuthentication")
        params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
        assert {"tls", "ca"} <= params
