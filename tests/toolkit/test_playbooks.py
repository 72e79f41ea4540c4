"""Every playbook parses; lint holds the production profile with an empty skip list."""

from __future__ import annotations

import pytest
import yaml

from .helpers import ROOT, run, tool

PLAYBOOKS = sorted(
    [
        "site.yml",
        *(str(p.relative_to(ROOT)) for p in (ROOT / "playbooks").glob("*.yml")),
    ]
)


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook: str) -> None:
    result = run([tool("ansible-playbook"), "--syntax-check", playbook], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_site_imports_the_steps_in_order() -> None:
    site = yaml.safe_load((ROOT / "site.yml").read_text())
    assert [p["ansible.builtin.import_playbook"] for p in site] == [
        "playbooks/preflight.yml",
        "playbooks/provision.yml",
        "playbooks/backend.yml",
        "playbooks/sweep.yml",
    ]
    assert all(p.get("name") for p in site)


@pytest.mark.parametrize(
    "role", sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir())
)
def test_role_is_documented_and_specified(role: str) -> None:
    """Each default is prefixed, has an argument spec (in the entry point that reads it:
    main, or e.g. local_k8s's `down`) and a line in the README."""
    base = ROOT / "roles" / role
    defaults = yaml.safe_load((base / "defaults" / "main.yml").read_text()) or {}
    entry_points = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())[
        "argument_specs"
    ]
    assert "main" in entry_points
    options = {k for spec in entry_points.values() for k in spec.get("options", {})}
    readme = (base / "README.md").read_text()
    assert (base / "molecule" / "default" / "molecule.yml").exists()
    for name in defaults:
        assert name.startswith(f"{role}_"), name
        assert name in options, f"{name} missing from meta/argument_specs.yml"
        assert f"`{name}`" in readme, f"{name} missing from README.md"


@pytest.mark.lint
def test_yamllint() -> None:
    result = run([tool("yamllint"), "--strict", "."], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.lint
def test_ansible_lint_production_profile() -> None:
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    assert not config.get("skip_list") and not config.get("warn_list")
    result = run([tool("ansible-lint")], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
