"""Real brokers for tests: processes of our own on free loopback ports, stopped by PID.

Never the machine's shared Redis (6379) or RabbitMQ (5672). Each broker object has the same
small interface, so a test can run against any backend:

    url, password, backend names it serves, kill(sig), restart(), stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A redis-server with a password and AOF, in its own directory."""

    def __init__(self, workdir: Path, appendfsync: str = "everysec") -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = "test-" + os.urandom(8).hex()
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--requirepass", self.password, "--appendonly", "yes",
            "--appendfsync", self.appendfsync, "--dir", str(self.dir), "--save", "",
            "--logfile", str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def client(self):  # noqa: ANN201 - a redis.Redis
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           decode_responses=True)


RABBIT_BIN = Path(os.environ.get("TTG_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


class RabbitNode:
    """A RabbitMQ node of our own: own node name, epmd, ports, data and log dirs, loopback only.

    The user `ttg` (random password) is created on first boot with permissions on the vhost
    `ttg` only; `guest` is not created. `stop()` / `kill()` act on the process group we
    started, by PID; `restart()` boots again on the same data directory, so durable queues
    survive. `management=True` also enables the management plugin on `mgmt_port`.
    """

    user = "ttg"
    vhost = "ttg"

    def __init__(self, workdir: Path, management: bool = False) -> None:
        server = RABBIT_BIN / "rabbitmq-server"
        if not server.exists():
            pytest.skip(f"RabbitMQ is not installed ({server} missing: apt-get install "
                        "rabbitmq-server)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.mgmt_port = free_port() if management else None
        self.nodename = f"ttgtest-{self.port}@localhost"
        self.password = "test-" + os.urandom(8).hex()
        self.proc: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        (self.dir / "home").mkdir(exist_ok=True)
        conf = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            f"default_user = {self.user}",
            f"default_pass = {self.password}",
            f"default_vhost = {self.vhost}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "default_user_tags.administrator = true",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            # a test machine's disk may be nearly full: do not block publishers on it
            "disk_free_limit.absolute = 1MB",
            "vm_memory_high_watermark.relative = 0.8",
        ]
        if self.mgmt_port:
            conf += [f"management.tcp.port = {self.mgmt_port}", "management.tcp.ip = 127.0.0.1",
                     "collect_statistics_interval = 500"]
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        plugins = "[rabbitmq_management]." if management else "[]."
        (self.dir / "enabled_plugins").write_text(plugins + "\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://{self.user}@127.0.0.1:{self.port}/{self.vhost}"

    @property
    def url_with_password(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.vhost}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.dir / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node (same node name, epmd port and cookie)."""
        out = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.nodename, *args],
                             env=self.env(), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr or out.stdout}")
        return out.stdout

    def _port_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> None:
        if self.epmd is None or self.epmd.poll() is not None:
            # our own epmd, in the foreground, so it is a child we can stop by PID
            epmd = shutil.which("epmd") or "/usr/bin/epmd"
            self.epmd = subprocess.Popen([epmd, "-port", str(self.epmd_port), "-address",
                                          "127.0.0.1"], env=self.env(),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(self.epmd_port)
        log = open(self.dir / "server.out", "ab")  # noqa: SIM115 - kept by the process
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        try:
            wait_port(self.port, timeout=90)
            self.wait_ready()
        except (TimeoutError, RuntimeError):
            self.kill()
            tail = (self.dir / "server.out").read_text()[-2000:]
            raise RuntimeError(f"RabbitMQ node {self.nodename} did not start:\n{tail}") from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the user can open a connection (the listener opens a little early)."""
        import pika

        params = pika.URLParameters(self.url_with_password)
        params.connection_attempts = 1
        deadline = time.monotonic() + timeout
        while True:
            try:
                pika.BlockingConnection(params).close()
                return
            except Exception as exc:  # noqa: BLE001 - any failure: try again until the deadline
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node up but no AMQP session: {exc}") from exc
                time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group we started (the server script, beam, its helpers).

        Before a SIGKILL the node's Ra metadata is synced to disk: RabbitMQ 3.10 saves it
        every 5 s, and a node killed within 5 s of creating its first stream queue comes back
        with its stream coordinator unregistered and every stream "down or inaccessible".
        A crash test wants a node that has been up a while, not that corner.
        """
        if self.proc is None:
            return
        if sig == signal.SIGKILL and self.alive():
            try:
                self.ctl("eval", "[dets:sync(T) || T <- dets:all()].", timeout=15)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (beam after its script exited)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                if sig != signal.SIGKILL and time.monotonic() > deadline - 20:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                time.sleep(0.05)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while self._port_open() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(timeout=10)
        self.epmd = None


class RabbitLease:
    """A vhost of its own on the session's shared RabbitNode, with the broker interface.

    `kill()`, `restart()` and `stop()` act on the node itself. A `stop()` made by the test
    fixture's teardown (conftest `_env`) only releases the lease, so the node outlives the
    test; `release()` does the same explicitly.
    """

    def __init__(self, node: RabbitNode, vhost: str) -> None:
        self.node = node
        self.vhost = vhost
        self.password = node.password
        self.user = node.user

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def url(self) -> str:
        return f"amqp://{self.user}@127.0.0.1:{self.node.port}/{self.vhost}"

    @property
    def url_with_password(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.node.port}/{self.vhost}"

    def ctl(self, *args: str) -> str:
        return self.node.ctl(*args)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.node.kill(sig)

    def restart(self) -> None:
        self.node.restart()

    def release(self) -> None:
        """End the lease; the node keeps running for the next test."""

    def stop(self) -> None:
        import sys

        caller = sys._getframe(1).f_code.co_name
        if caller == "_env":  # the fixture's teardown: end the lease, keep the node
            self.release()
            return
        self.node.stop()


_SHARED: dict[str, object] = {}


def shared_rabbit_lease() -> RabbitLease:
    """A lease on the session's RabbitMQ node (started on first use, stopped at exit)."""
    import atexit
    import tempfile

    node = _SHARED.get("node")
    if node is None:
        workdir = Path(tempfile.mkdtemp(prefix="ttg-rabbit-"))
        node = RabbitNode(workdir)
        _SHARED.update(node=node, vhosts=[], n=0)

        def _stop() -> None:
            node.stop()
            shutil.rmtree(workdir, ignore_errors=True)

        atexit.register(_stop)
    assert isinstance(node, RabbitNode)
    if not node.alive():
        node.start()
    vhosts: list = _SHARED["vhosts"]  # type: ignore[assignment]
    if not vhosts:  # one rabbitmqctl call (about a second) makes ten vhosts
        first = int(_SHARED["n"])  # type: ignore[arg-type]
        names = [f"ttg-t{i}" for i in range(first, first + 10)]
        _SHARED["n"] = first + 10
        expr = " ".join(
            f'rabbit_vhost:add(<<"{v}">>, <<"tests">>), '
            f'rabbit_auth_backend_internal:set_permissions(<<"{node.user}">>, <<"{v}">>, '
            f'<<".*">>, <<".*">>, <<".*">>, <<"tests">>),' for v in names)
        node.ctl("eval", expr + " ok.")
        vhosts.extend(names)
    return RabbitLease(node, vhosts.pop(0))
