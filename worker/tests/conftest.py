"""Fixtures: real brokers on free ports, and real `ttg work` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from brokers import RedisServer  # noqa: E402

from ttg.backends import get_backend  # noqa: E402
from ttg.backends.base import Backend, BrokerConfig  # noqa: E402
from ttg.sweep import JobSpec  # noqa: E402

# ansible-playbook reads ansible.cfg from its working directory: the tests that run it get the
# project's (its stdout callback puts a failure's reason last, on stderr) wherever pytest was
# started (`make test` runs from the root; `cd worker && pytest` works the same).
os.environ.setdefault("ANSIBLE_CONFIG", str(Path(__file__).resolve().parents[2] / "ansible.cfg"))

QUEUE_BACKENDS = ["redis", "rabbitmq"]
ALL_BACKENDS = ["redis", "rabbitmq", "static"]


def _rabbit_node(tmp: Path):  # noqa: ANN202 - a RabbitLease
    """A lease on one RabbitMQ node shared by the session (a node takes seconds to boot).

    Each lease gets a fresh vhost, so tests reusing a run id do not see each other. The
    lease's kill/restart/stop act on the real node; the next lease restarts a node a test
    left down. `_env`'s teardown call to `stop()` only ends the lease (see RabbitLease).
    Tests that must own their broker use `brokers.RabbitNode(tmp)` directly.
    """
    from brokers import shared_rabbit_lease

    return shared_rabbit_lease()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


class Env:
    """A broker for one backend plus helpers to run workers and make backend objects."""

    def __init__(self, backend: str, broker, tmp: Path) -> None:  # noqa: ANN001
        self.backend = backend
        self.broker = broker
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.pwfile = tmp / "broker.pass"
        self.pwfile.write_text(broker.password)
        self.pwfile.chmod(0o600)

    def config(self, **kw: object) -> BrokerConfig:
        kw.setdefault("min_idle_ms", 600)
        kw.setdefault("connect_timeout_s", 5)
        kw.setdefault("retry_budget_s", 20)
        return BrokerConfig(url=self.broker.url, password=self.broker.password, **kw)

    def make(self, **kw: object) -> Backend:
        return get_backend(self.backend, self.config(**kw))

    def env(self, run_id: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "TTG_BACKEND": self.backend,
            "TTG_BROKER_URL": self.broker.url,
            "TTG_BROKER_PASSWORD_FILE": str(self.pwfile),
            "TTG_RUN_ID": run_id,
            "TTG_MIN_IDLE_MS": "600",
            "TTG_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def ttg(self, *args: str, run_id: str = "none", timeout: float = 120,
            **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ttg.cli", *args],
                              env=self.env(run_id, **extra), capture_output=True, text=True,
                              timeout=timeout)

    def worker(self, run_id: str, index: int, *args: str, **extra: str) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{run_id}-{index}-{len(self.procs)}.log", "w")  # noqa: SIM115
        p = subprocess.Popen(
            [sys.executable, "-m", "ttg.cli", "work", "--worker-index", str(index), *args],
            env=self.env(run_id, **extra), stdout=log, stderr=subprocess.STDOUT,
        )
        p.logfile = log.name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def fleet(self, run_id: str, n: int, *args: str, **extra: str) -> list[subprocess.Popen]:
        return [self.worker(run_id, i, "--exit-when-done", *args, **extra) for i in range(n)]

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    yield from _env(request.param, tmp_path)


@pytest.fixture(params=QUEUE_BACKENDS)
def queue_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    yield from _env(request.param, tmp_path)


def _env(name: str, tmp: Path) -> Iterator[Env]:
    broker = _rabbit_node(tmp / "rabbit") if name == "rabbitmq" else RedisServer(tmp / "redis")
    env = Env(name, broker, tmp)
    try:
        yield env
    finally:
        env.stop_all()
        broker.stop()


def wait_for(cond, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spec(run_id: str, params: int = 200, chunk: int = 10, **kw: object) -> JobSpec:
    kw.setdefault("work_ms", 0)
    kw.setdefault("workers", 3)
    return JobSpec(run_id=run_id, params=params, chunk_size=chunk, **kw)  # type: ignore[arg-type]
