"""The worker image's build context and its content-derived tag (`ttg image`).

The context is the worker package (worker/) plus, under `code/`, the user's code directory
(`CODE`), whose `requirements.txt` the Dockerfile installs into the image's venv. The tag is
`<version>-<12 hex digits>`: a sha256 over every file that goes in (path and bytes), so a
changed task or requirement always gives a new image that reaches the cluster, and an
unchanged one is not rebuilt.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ttg.errors import ConfigError

IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".git", ".venv", "tests",
                "build", "dist", "wheelhouse"}
IGNORED_SUFFIXES = (".pyc", ".egg-info")


def _files(root: Path, skip_tests: bool) -> list[Path]:
    out = []
    for path in sorted(root.rglob("*")):
        parts = set(path.relative_to(root).parts)
        skip = IGNORED_DIRS if skip_tests else IGNORED_DIRS - {"tests"}
        if parts & skip or any(p.endswith(IGNORED_SUFFIXES) for p in parts):
            continue
        if path.is_file():
            out.append(path)
    return out


def content_tag(worker_dir: Path, code_dir: Path | None, version: str) -> str:
    h = hashlib.sha256()
    for label, root, skip in (("worker", worker_dir, True), ("code", code_dir, False)):
        if root is None:
            continue
        for path in _files(root, skip):
            h.update(f"{label}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return f"{version}-{h.hexdigest()[:12]}"


def stage(worker_dir: Path, code_dir: Path | None, dest: Path, version: str) -> str:
    """Write the build context into `dest` (replacing it); return the image tag."""
    if code_dir is not None and not code_dir.is_dir():
        raise ConfigError(f"CODE={code_dir}: not a directory")
    tag = content_tag(worker_dir, code_dir, version)
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns(*IGNORED_DIRS, "*.pyc", "*.egg-info")
    shutil.copytree(worker_dir, dest, ignore=ignore)
    if code_dir is not None:
        shutil.copytree(code_dir, dest / "code",
                        ignore=shutil.ignore_patterns(*(IGNORED_DIRS - {"tests"}), "*.pyc"))
    return tag


def dockerfile_pins(dockerfile: Path) -> list[str]:
    """Every `name==version` the Dockerfile installs (markers left out: the image's Python,
    not this one, decides which apply)."""
    return re.findall(r'\b([A-Za-z0-9_.-]+==[0-9][^\s;\\"]*)', dockerfile.read_text())


def fill_wheelhouse(context: Path, python: str = sys.executable) -> Path:
    """Download into `context/wheelhouse` what the Dockerfile installs, pip and setuptools, and
    the code's requirements, as binary wheels: the build then needs no index and no pip in the
    base image (scripts/build-base-image.sh's Debian root). pip's cache makes a rerun cheap."""
    wheels = context / "wheelhouse"
    wheels.mkdir(exist_ok=True)
    download = [python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--dest", str(wheels)]
    pins = dockerfile_pins(context / "Dockerfile")
    steps = [[*download, "--no-deps", "pip", "setuptools", *pins]]
    requirements = context / "code" / "requirements.txt"
    if requirements.is_file():
        steps.append([*download, "--requirement", str(requirements)])
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"cannot download the image's wheels: {done.stderr.strip()[-800:]}")
    return wheels
