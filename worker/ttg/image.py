"""The worker image's build context and its content-derived tag (`ttg image`).

The context is the worker package (worker/) plus, under `code/`, the user's code directory
(`CODE`), whose `requirements.txt` the Dockerfile installs into the image's venv. The tag is
`<version>-<12 hex digits>`: a sha256 over every file that goes in (path and bytes), so a
changed task or requirement always gives a new image that reaches the cluster, and an
unchanged one is not rebuilt.
"""

from __future__ import annotations

import hashlib
import shutil
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
