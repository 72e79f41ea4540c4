"""The Kubernetes path's playbooks and roles: syntax with the kind and aks inventories,
ansible-lint (production profile, the repository's empty skip list), yamllint, the roles'
documentation, and the fail-fast promise: no Docker/kind or no Azure login -> one clear line,
nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .helpers import ROOT, run, tool

OWN_ROLES = ["k8s_app", "kind_cluster", "aks_cluster"]
OWN_PATHS = [
    "roles/k8s_app",
    "roles/kind_cluster",
    "roles/aks_cluster",
    "inventories/kind",
    "inventories/aks",
    "playbooks/render-manifests.yml",
]
PLAYBOOKS = sorted(
    [
        "site.yml",
        *(str(p.relative_to(ROOT)) for p in (ROOT / "playbooks").glob("*.yml")),
    ]
)


@pytest.mark.parametrize("inventory", ["kind", "aks"])
@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(inventory: str, playbook: str) -> None:
    result = run(
        [
            tool("ansible-playbook"),
            "--syntax-check",
            "-i",
            f"inventories/{inventory}",
            playbook,
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("inventory", ["kind", "aks"])
def test_inventory_groups_and_concerns(inventory: str) -> None:
    result = run(
        [tool("ansible-inventory"), "-i", f"inventories/{inventory}", "--list"]
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert "localhost" in data["ttg_controller"]["hosts"]
    files = {
        p.stem
        for p in (ROOT / "inventories" / inventory / "group_vars" / "all").glob("*.yml")
    }
    assert {"cluster", "backend", "workers", "chaos"} <= files
    groups = [g for g in data if g not in {"_meta", "all", "ungrouped"}]
    assert all("-" not in g for g in groups), groups


@pytest.mark.parametrize("role", OWN_ROLES)
def test_role_is_documented_and_specified(role: str) -> None:
    base = ROOT / "roles" / role
    defaults = yaml.safe_load((base / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())[
        "argument_specs"
    ]
    readme = (base / "README.md").read_text()
    for name in defaults:
        assert name.startswith(f"{role}_"), name
        assert f"`{name}`" in readme, f"{name} missing from the README"
        for entry, spec in specs.items():
            assert name in spec["options"], (
                f"{name} missing from the {entry} argument spec"
            )
    for entry in specs:
        if entry != "main":
            assert (base / "tasks" / f"{entry}.yml").exists(), entry
    assert (base / "molecule" / "default" / "molecule.yml").exists()
    assert "Molecule" in readme


@pytest.mark.lint
def test_ansible_lint_production() -> None:
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    assert config["profile"] == "production" and not config.get("skip_list")
    result = run([tool("ansible-lint"), *OWN_PATHS], timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]


@pytest.mark.lint
def test_yamllint() -> None:
    result = run([tool("yamllint"), "--strict", *OWN_PATHS], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _playbook(
    tmp_path: Path, role: str, role_vars: dict | None = None, tasks_from: str | None = None
) -> Path:
    """A one-play playbook running `role` (or one of its entry points) with `role_vars`."""
    if tasks_from:
        run_it = {"tasks": [{
            "name": f"{role} {tasks_from}",
            "ansible.builtin.include_role": {"name": role, "tasks_from": tasks_from},
            "vars": role_vars or {},
        }]}  # fmt: skip
    else:
        run_it = {"roles": [{"role": role, "vars": role_vars or {}}]}
    book = tmp_path / "play.yml"
    book.write_text(
        yaml.safe_dump(
            [
                {
                    "name": f"Run {role}",
                    "hosts": "ttg_controller",
                    "gather_facts": False,
                    **run_it,
                }
            ]
        )
    )
    return book


def test_kind_fails_fast_without_docker_and_kind(tmp_path: Path) -> None:
    """PLATFORM=kind where kind (or Docker) is missing: one clear line, nothing created."""
    state = tmp_path / "state"
    result = run(
        [
            tool("ansible-playbook"),
            "-i",
            "inventories/kind",
            str(_playbook(tmp_path, "kind_cluster")),
            "-e",
            f"ttg_state_dir={state}",
            "-e",
            "kind_cluster_kind_bin=/nonexistent/kind",
        ],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]  # the reason is what a person reads last
    assert "PLATFORM=kind needs" in last and "kind on PATH" in last
    assert "nothing was created" in last
    assert not state.exists()


def test_aks_fails_fast_without_azure_credentials(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run(
        [
            tool("ansible-playbook"),
            "-i",
            "inventories/aks",
            str(_playbook(tmp_path, "aks_cluster")),
            "-e",
            f"ttg_state_dir={state}",
            "-e",
            "aks_cluster_az_bin=/nonexistent/az",
        ],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        AZURE_SUBSCRIPTION_ID="",
        AZURE_CLIENT_ID="",
        timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]  # the reason is what a person reads last
    assert "PLATFORM=aks needs" in last and "nothing was created" in last
    assert not state.exists()


def test_kind_config_renders(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run(
        [
            tool("ansible-playbook"),
            "-i",
            "inventories/kind",
            str(_playbook(tmp_path, "kind_cluster")),
            "-e",
            f"ttg_state_dir={state}",
            "-e",
            "kind_cluster_render_only=true",
        ],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    config = yaml.safe_load((state / "kind" / "kind-config.yml").read_text())
    assert [n["role"] for n in config["nodes"]] == ["control-plane"] + ["worker"] * 3
    assert {n["image"] for n in config["nodes"]} == {"kindest/node:v1.32.2"}
    assert all(n.get("labels") for n in config["nodes"])


def _dead_cluster(tmp_path: Path) -> list[str]:
    """-e arguments pointing the kind inventory at an API server that is not there (a closed
    loopback port): a play that reaches the cluster fails at its first API call."""
    (tmp_path / "state").mkdir()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:9"}}],
                "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
                "current-context": "dead",
                "users": [{"name": "u", "user": {"token": "none"}}],
            }
        )
    )
    return [
        "-e", f"ttg_state_dir={tmp_path / 'state'}",
        "-e", f"ttg_runs_dir={tmp_path / 'runs'}",
        "-e", f"ttg_kubeconfig={kubeconfig}",
        "-e", "ttg_kube_context=dead",
    ]  # fmt: skip


def test_sweep_on_kind_goes_to_the_cluster_not_to_supervisord(tmp_path: Path) -> None:
    """playbooks/sweep.yml with the kind inventory: the k8s_app fleet and sweep entry points,
    never the local fleet role (whose supervisord program would be written to the state dir)."""
    result = run(
        [tool("ansible-playbook"), "-i", "inventories/kind", "playbooks/sweep.yml",
         *_dead_cluster(tmp_path)],
        ANSIBLE_STDOUT_CALLBACK="default",  # the task names (what ran), as make VERBOSE=1
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Start the worker fleet in the cluster" in result.stdout
    assert "Apply the manifests of the stage fleet" in result.stdout
    assert "127.0.0.1', port=9" in result.stdout.replace("''", "'")
    assert "supervisord" not in result.stdout
    assert not (tmp_path / "state" / "supervisor").exists()


def test_chaos_on_kind_runs_the_fault_through_the_cluster(tmp_path: Path) -> None:
    """The chaos role with the kind inventory plans the fault locally, then goes to the
    cluster with the fault's hooks (k8s_app fleet with the worker env), not to supervisord."""
    book = _playbook(
        tmp_path, "chaos", {"chaos_run_prefix": "kt", "chaos_faults": "poison"}
    )
    result = run(
        [tool("ansible-playbook"), "-v", "-i", "inventories/kind", str(book),
         *_dead_cluster(tmp_path)],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        ANSIBLE_STDOUT_CALLBACK="default",  # the task names (what ran), as make VERBOSE=1
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert '"fault": "poison", "env": {"TTG_POISON_PARAM"' in result.stdout
    assert "Start the workers in the cluster, with the fault's hooks" in result.stdout
    assert "Apply the manifests of the stage fleet" in result.stdout
    assert not (tmp_path / "state" / "supervisor").exists()


def test_recovered_crash_reaches_the_in_cluster_sweep(tmp_path: Path) -> None:
    """recover-infra's fault record (k8s_app_faults) is passed to the sweep Job as one JSON
    argument that ttg parses back to the same records."""
    fault = {"type": "infra-crash", "at": "{{ 12.5 | float }}",
             "target": "kind: the cluster was down", "recovered_s": None}
    book = _playbook(
        tmp_path,
        "k8s_app",
        {"k8s_app_run_id": "r1", "k8s_app_render_dir": str(tmp_path / "out"),
         "k8s_app_faults": [fault]},
        tasks_from="render.yml",
    )  # fmt: skip
    result = run(
        [tool("ansible-playbook"), "-i", "inventories/kind", str(book),
         "-e", f"ttg_state_dir={tmp_path / 'state'}"],
        ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    (job,) = yaml.safe_load_all((tmp_path / "out" / "09-sweep-job.yml").read_text())
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "sweep"
    from ttg.controller import parse_faults

    faults = parse_faults(args[args.index("--faults-json") + 1], "test")
    assert faults == [
        {"type": "infra-crash", "at": 12.5, "target": "kind: the cluster was down",
         "recovered_s": None}
    ]  # fmt: skip


def test_status_on_kind_says_when_the_cluster_does_not_answer(tmp_path: Path) -> None:
    """make status on a Kubernetes platform lists the labelled objects; a cluster that does
    not answer is one clear line and a non-zero exit, not a silent empty list."""
    result = run(
        [tool("ansible-playbook"), "-i", "inventories/kind", "playbooks/status.yml",
         *_dead_cluster(tmp_path)],
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cluster      unreachable:" in result.stdout
    assert "the kind cluster did not answer" in result.stderr.strip().splitlines()[-1]
    assert "runs         0 (0 with a summary), latest none" in result.stdout


def _pod(name: str, phase: str, waiting: str | None = None, ready: bool = False,
         message: str = "") -> dict:
    state = {"waiting": {"reason": waiting, "message": message}} if waiting else {"running": {}}
    return {"metadata": {"name": name},
            "status": {"phase": phase,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                       "containerStatuses": [{"name": "worker", "state": state}]}}


def test_fleet_wait_sees_a_pod_that_cannot_start_and_counts_the_running() -> None:
    """The fleet's wait (roles/k8s_app/filter_plugins): a pod whose image cannot be pulled or
    that crash-loops is named with its reason (so the play fails at once); ContainerCreating
    is only slow; a Job pod that failed is the Job's to retry (failed=False)."""
    import importlib.util

    path = ROOT / "roles/k8s_app/filter_plugins/k8s_app_pods.py"
    spec = importlib.util.spec_from_file_location("k8s_app_pods", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pods = [
        _pod("w-1", "Running", ready=True),
        _pod("w-2", "Pending", "ContainerCreating"),
        _pod("w-3", "Pending", "ImagePullBackOff", message='Back-off pulling image "x:1"'),
        _pod("w-4", "Running", "CrashLoopBackOff", message="back-off 10s restarting"),
        {"metadata": {"name": "w-5"}, "status": {"phase": "Failed", "reason": "Evicted"}},
        {"metadata": {"name": "w-6"}, "status": {"phase": "Succeeded"}},
    ]
    assert mod.k8s_app_stuck_pods(pods) == [
        'w-3: ImagePullBackOff: Back-off pulling image "x:1"',
        "w-4: CrashLoopBackOff: back-off 10s restarting",
        "w-5: Evicted",
    ]
    assert mod.k8s_app_stuck_pods(pods, False)[-1].startswith("w-4")
    assert mod.k8s_app_started_pods(pods) == 2  # w-1 ready, w-6 done
    assert mod.k8s_app_stuck_pods(pods[:2]) == []
