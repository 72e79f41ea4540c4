"""Values written into the workers' supervisord program cannot rewrite their environment.

The real template (roles/fleet/templates/program.conf.j2) is rendered by a real
ansible-playbook with the role's own check (tasks/check_env.yml), and the result is read by
supervisor's own config parser: every value arrives exactly as given, or the play refuses it
with one line before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(180)

# Each of these used to rewrite the environment: a '"' closed the quoted value, a ',' after
# it started a new KEY=value, a '%' was a supervisord expansion (or a config error).
ACCEPTED = {
    "TTG_RUN_ID": 'r1",TTG_BROKER_URL="redis://evil:1/0',
    "TTG_POISON_PARAM": "a,b=c,TTG_BACKEND=static",
    "TTG_X": "100%(here)s %(ENV_HOME)s %",
    "TTG_Y": "it's = fine, \\ too",
    "TTG_Z": "",
    "TTG_U": "ünï ²",
}
REFUSED = ["two\nlines", "both \" and '", 'ends with "', "a ;comment"]


def playbook(tmp: Path, extra_env: dict[str, str], run_id: str = "r1") -> Path:
    out = tmp / "conf.d"
    out.mkdir(parents=True, exist_ok=True)
    vars_ = {
        "fleet_workers": 2, "fleet_run_id": run_id, "fleet_backend": "redis",
        "fleet_broker_url": "redis://127.0.0.1:1/0", "fleet_password_file": str(tmp / "pw"),
        "fleet_log_format": "json", "fleet_ttg": "/opt/ttg/bin/ttg",
        "fleet_program": "ttg-fleet", "fleet_stopwaitsecs": 5, "fleet_log_dir": str(tmp),
        "fleet_supervisor_dir": str(tmp), "fleet_min_idle_ms": 3000,
        "fleet_task": "", "fleet_code": "", "fleet_ca_file": "", "fleet_extra_env": extra_env,
    }
    play = [{
        "hosts": "localhost", "gather_facts": False, "vars": vars_,
        "tasks": [
            {"name": "check", "ansible.builtin.include_role": {"name": "fleet",
                                                               "tasks_from": "check_env"}},
            {"name": "render", "ansible.builtin.template": {
                "src": str(ROOT / "roles/fleet/templates/program.conf.j2"),
                "dest": str(out / "ttg-fleet.conf"), "mode": "0600"}},
        ],
    }]
    path = tmp / "play.yml"
    path.write_text(json.dumps(play))
    return path


def render(tmp: Path, extra_env: dict[str, str], run_id: str = "r1"
           ) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", f"ansible_python_interpreter={sys.executable}",
         str(playbook(tmp, extra_env, run_id))],
        env=env, capture_output=True, text=True, timeout=150, check=False)


def supervisor_environment(conf: Path) -> list[dict[str, str]]:
    """The environment of each process, as supervisord itself reads the file."""
    from supervisor.options import ServerOptions, UnhosedConfigParser

    parser = UnhosedConfigParser()
    parser.read_string(conf.read_text())
    opts = ServerOptions()
    opts.here = str(conf.parent)
    procs = opts.processes_from_section(parser, "program:ttg-fleet", "ttg-fleet")
    return [p.environment for p in procs]


def test_hostile_values_reach_the_workers_unchanged(tmp_path: Path) -> None:
    run_id = ACCEPTED["TTG_RUN_ID"]
    extra = {k: v for k, v in ACCEPTED.items() if k != "TTG_RUN_ID"}
    out = render(tmp_path, extra, run_id)
    assert out.returncode == 0, out.stdout[-3000:]
    envs = supervisor_environment(tmp_path / "conf.d/ttg-fleet.conf")
    assert len(envs) == 2
    for i, e in enumerate(envs):
        assert e["TTG_RUN_ID"] == run_id
        assert e["TTG_BROKER_URL"] == "redis://127.0.0.1:1/0"  # not the injected one
        assert e["TTG_BACKEND"] == "redis" and e["TTG_WORKER_INDEX"] == str(i)
        for k, v in extra.items():
            assert e[k] == v, (k, e[k], v)


@pytest.mark.parametrize("value", REFUSED)
def test_values_no_quoting_can_hold_are_refused_before_writing(tmp_path: Path,
                                                               value: str) -> None:
    out = render(tmp_path, {"TTG_POISON_PARAM": value})
    assert out.returncode != 0
    # the project's stdout callback puts a failure's reason on stderr, last
    assert "cannot be written into the supervisord program safely" in out.stderr
    assert not (tmp_path / "conf.d/ttg-fleet.conf").exists()
