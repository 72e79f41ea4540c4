"""The worker image (worker/Dockerfile), built and run with Docker under the same security
context as the pods: UID 10001, read-only root, no capabilities, no new privileges, no network
(or the host's loopback for the sweep against a local Redis). Skipped, with the reason, where
no Docker daemon is reachable.

Base image: python:3.11.13-slim-bookworm when the daemon has it, else the local one that
scripts/build-base-image.sh makes offline (debootstrap + docker import); the build never
touches the network (the pinned wheels are downloaded beforehand into the build context)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ttg import image as ttg_image

from .helpers import ROOT, run

DEFAULT_BASE = "python:3.11.13-slim-bookworm"
LOCAL_BASE = "ttg-base:bookworm-py311"
# One tag per pytest-xdist worker: a worker removes its image when its tests are done, and
# must never remove the one another worker's tests are still running.
TAG = f"ttg-worker:test-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
# The seed's image was 186 MB; per-point results need pyarrow in the image (the in-cluster
# controller writes results.parquet, workers encode their rows as Arrow IPC): about +150 MB.
MAX_BYTES = 300 * 1000 * 1000
SECURE = [
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--user",
    "10001:10001",
]

pytestmark = pytest.mark.docker


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, DOCKER_BUILDKIT="0")


def _daemon() -> str | None:
    if not shutil.which("docker"):
        return "docker is not installed"
    r = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    return None if r.returncode == 0 else "no Docker daemon reachable (start dockerd)"


def _has(image: str) -> bool:
    return docker("image", "inspect", image, timeout=30).returncode == 0


def dockerfile_pins() -> list[str]:
    return ttg_image.dockerfile_pins(ROOT / "worker" / "Dockerfile")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = _daemon()
    if reason:
        pytest.skip(f"worker image not built: {reason}")
    base = DEFAULT_BASE if _has(DEFAULT_BASE) else LOCAL_BASE
    if not _has(base):
        made = run(["bash", str(ROOT / "scripts" / "build-base-image.sh")], timeout=900)
        assert made.returncode == 0, made.stdout + made.stderr
    ctx = tmp_path_factory.mktemp("ctx")
    shutil.copytree(
        ROOT / "worker",
        ctx,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", ".*cache"),
    )
    shutil.copy(ROOT / "worker" / ".dockerignore", ctx / ".dockerignore")
    # a user's code, as `ttg image` stages it (make CODE=dir): under code/ in the context
    (ctx / "code").mkdir()
    (ctx / "code" / "tinysim.py").write_text(
        "def run(p):\n    return {'double': 2.0 * p, 'odd': p % 2 == 1}\n")
    # what `ttg image --wheelhouse` puts in a context: the Dockerfile's pins, pip, setuptools
    ttg_image.fill_wheelhouse(ctx)
    argv = [
        "build",
        "--network",
        "none",
        "--tag",
        TAG,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        "VERSION=0.1.0",
        "--build-arg",
        "REVISION=test",
        "--build-arg",
        "CREATED=2026-01-01T00:00:00Z",
        str(ctx),
    ]
    built = docker(*argv, timeout=900)
    if built.returncode != 0 and "No such image" in built.stderr:
        # a cached layer went away under the build (the legacy builder and another build or
        # clean-up in the same daemon, seen once in CI): build again from no cache
        built = docker(*argv[:1], "--no-cache", *argv[1:], timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    image_id = docker("image", "inspect", "--format", "{{.Id}}", TAG).stdout.strip()
    yield TAG
    # by id, so that no untagged copy is left behind on the developer's machine
    docker("image", "rm", "--force", TAG, timeout=120)
    if image_id:
        docker("image", "rm", "--force", image_id, timeout=120)
    # the build stage, untagged, labelled by the Dockerfile: only the project's own go
    docker("image", "prune", "--force", "--filter", "label=ttg.io/stage=build", timeout=120)


def test_help_and_validate_as_uid_10001_read_only(image: str) -> None:
    r = docker("run", "--rm", *SECURE, "--network", "none", image, "--help")
    assert r.returncode == 0 and "usage: ttg" in r.stdout, r.stderr
    r = docker(
        "run",
        "--rm",
        *SECURE,
        "--network",
        "none",
        image,
        "validate",
        "--params",
        "1000",
        "--chunk-size",
        "10",
        "--workers",
        "2",
        "--work-ms",
        "0",
    )
    assert r.returncode == 0 and "job spec ok" in r.stdout, r.stdout + r.stderr
    r = docker("run", "--rm", *SECURE, "--network", "none", "--entrypoint", "id", image)
    assert r.stdout.strip() == "uid=10001(ttg) gid=10001(ttg) groups=10001(ttg)", r.stdout


def test_the_users_code_is_in_the_image_and_runs(image: str) -> None:
    r = docker("run", "--rm", *SECURE, "--network", "none", image, "validate", "--task",
               "tinysim:run", "--params", "10", "--chunk-size", "5")
    assert r.returncode == 0 and "job spec ok: task tinysim:run" in r.stdout, r.stdout + r.stderr
    r = docker("run", "--rm", *SECURE, "--network", "none", "--entrypoint", "python3", image,
               "-c", "import os, sys; sys.path.insert(0, os.environ['TTG_CODE']); "
               "import tinysim; print(os.environ['TTG_CODE'], tinysim.run(21))")
    assert r.stdout.strip() == "/opt/ttg/code {'double': 42.0, 'odd': True}", r.stderr


def test_image_metadata_and_size(image: str) -> None:
    r = docker("image", "inspect", image)
    info = json.loads(r.stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["ttg"]
    labels = config["Labels"]
    for key in ("version", "revision", "created"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    size = info["Size"]
    print(f"\nworker image size: {size / 1e6:.1f} MB ({size} bytes)")
    assert size < MAX_BYTES, f"{size / 1e6:.1f} MB"


def test_no_build_tools_in_the_final_stage(image: str) -> None:
    r = docker(
        "run",
        "--rm",
        *SECURE,
        "--network",
        "none",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for t in pip pip3 gcc cc make git; do command -v $t; done; "
        "ls /opt/ttg/bin; python3 -c 'import pip' 2>/dev/null && echo HAS-PIP; true",
    )
    assert r.returncode == 0, r.stderr
    assert "HAS-PIP" not in r.stdout and "/usr/bin/gcc" not in r.stdout
    assert not any(
        line.endswith(("/pip", "/pip3", "/gcc", "/make")) for line in r.stdout.split()
    )


def test_dockerfile_pins_match_the_lock() -> None:
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            lock[name.lower().replace("_", "-")] = version.strip()
    pins = dockerfile_pins()
    text = (ROOT / "worker" / "Dockerfile").read_text()
    assert pins
    for pin in pins:
        name, version = pin.split("==")
        conditional = re.search(rf'"{re.escape(pin)}; python_full_version', text)
        if (
            not conditional
        ):  # a marker-guarded pin (redis's own) need not be in the lock
            assert lock.get(name.lower().replace("_", "-")) == version, pin
    text = (ROOT / "worker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim", text, re.MULTILINE)
    assert "USER 10001:10001" in text and 'ENTRYPOINT ["ttg"]' in text
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "secret"
    secret.mkdir()
    password_file = secret / "password"
    password_file.write_text("image-test-" + str(port))
    password_file.chmod(0o644)
    secret.chmod(0o755)
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            password_file.read_text(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    yield port, secret
    proc.terminate()
    proc.wait(timeout=10)


def test_sweep_with_containerised_workers_against_local_redis(
    image: str, redis_server: tuple[int, Path]
) -> None:
    """Two workers and the sweep, each a locked-down container on the host's loopback: the
    reference sum over 1,000 parameters is exact."""
    port, secret = redis_server
    run_id = f"imgtest-{port}"
    common = [
        *SECURE,
        "--tmpfs",
        "/tmp",
        "--network",
        "host",
        "-v",
        f"{secret}:/run/secrets/ttg:ro",
        "-e",
        "TTG_BACKEND=redis",
        "-e",
        f"TTG_BROKER_URL=redis://127.0.0.1:{port}/0",
        "-e",
        "TTG_BROKER_PASSWORD_FILE=/run/secrets/ttg/password",
        "-e",
        f"TTG_RUN_ID={run_id}",
    ]
    names = [f"ttg-imgtest-{port}-{i}" for i in range(2)]
    try:
        for i, name in enumerate(names):
            r = docker(
                "run",
                "--detach",
                "--name",
                name,
                *common,
                "-e",
                f"TTG_WORKER_ID=w{i}",
                "-e",
                "TTG_EXIT_WHEN_DONE=1",
                image,
                "work",
            )
            assert r.returncode == 0, r.stderr
        r = docker(
            "run",
            "--rm",
            *common,
            "--tmpfs",
            "/work/runs:uid=10001,gid=10001",
            image,
            "sweep",
            "--json",
            "--params",
            "1000",
            "--chunk-size",
            "50",
            "--work-ms",
            "0",
            "--workers",
            "2",
            "--timeout",
            "240",
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["ok"] is True, summary
        assert summary["result"]["count"] == 1000
        assert summary["result"]["sum"] == 500035.5
        assert summary["chunks_done"] == summary["chunks_total"] == 20
    finally:
        for name in names:
            docker("rm", "--force", name, timeout=60)
