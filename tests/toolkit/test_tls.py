"""TLS=yes on the local platform, through the README's command (`make chaos TLS=yes`): the
brokers listen with TLS only, the controller and every worker verify them against the CA the
playbooks made, and the chaos table holds over TLS (nothing lost, exact sums)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from pathlib import Path

import pytest

from .helpers import Platform, run
from .test_examples import rabbitmq_args

# Redis: the whole table. RabbitMQ: every fault but poison, whose ~60 s are its retry tiers'
# delays (the same policy over TLS as without; test_rabbitmq and make chaos cover it).
CASES = [
    ("redis", "all"),
    ("rabbitmq", "worker-kill,worker-kill-repeat,kill-after-write,graceful-stop,broker-kill,"
                 "slow-chunk,scale"),
]


def _port(args: str, name: str, default: int) -> int:
    words = args.split()
    for i, w in enumerate(words):
        if w == "-e" and words[i + 1].startswith(f"{name}="):
            return int(words[i + 1].split("=", 1)[1])
    return default


def _handshake(port: int, cafile: str | None) -> str:
    """'ok TLSv1.x', or why the handshake failed."""
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return f"ok {s.version()}"
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {exc}"


def _plain_is_refused(port: int, backend: str) -> bool:
    """A plaintext client gets no protocol answer from a TLS-only listener."""
    hello = b"PING\r\n" if backend == "redis" else b"AMQP\x00\x00\x09\x01"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hello)
        try:
            data = s.recv(64)
        except (ConnectionResetError, TimeoutError):
            return True
    return not data.startswith((b"+PONG", b"-NOAUTH", b"AMQP", b"\x01\x00\x00"))


@pytest.mark.e2e
@pytest.mark.parametrize(("backend", "faults"), CASES, ids=[c[0] for c in CASES])
def test_chaos_table_over_tls(platform: Platform, backend: str, faults: str) -> None:
    args = platform.ansible_args + (rabbitmq_args() if backend == "rabbitmq" else "")
    prefix = f"tls-{backend}-{os.urandom(2).hex()}"
    r = run(["make", "chaos", f"BACKEND={backend}", "TLS=yes", f"FAULT={faults}",
             "PARAMS=4000", "CHUNK=40", f"RUN_ID={prefix}", f"ANSIBLE_ARGS={args}"],
            timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]

    # the table: every fault's run verified, from its own summary
    summaries = sorted(platform.runs_dir.glob(f"{prefix}-*/summary.json"))
    expected = 8 if faults == "all" else len(faults.split(","))
    assert len(summaries) == expected, [p.parent.name for p in summaries]
    for path in summaries:
        s = json.loads(path.read_text())
        assert s["ok"] and s["chunks_missing"] == 0, (path.parent.name, s)
        assert s["faults"] and all("error" not in f for f in s["faults"]), s["faults"]
        if not path.parent.name.endswith("-poison"):
            assert s["result"]["sum"] == s["expected_sum"], path.parent.name

    # what made it TLS: the workers were given the TLS URL and the CA ...
    tls = platform.state_dir / "tls"
    fleet = (platform.state_dir / "supervisor" / "conf.d" / "ttg-fleet.conf").read_text()
    scheme = "rediss://" if backend == "redis" else "amqps://"
    assert f'TTG_BROKER_URL="{scheme}ttg-worker@127.0.0.1:' in fleet
    assert f'TTG_BROKER_CA_FILE="{tls / "ca.crt"}"' in fleet
    # ... the listener speaks TLS with the project's CA, refuses a client that trusts only
    # the system's store, and answers no plaintext client
    port = (_port(args, "ttg_redis_port", 16379) if backend == "redis"
            else _port(args, "ttg_rabbitmq_port", 5673))
    assert _handshake(port, str(tls / "ca.crt")).startswith("ok TLSv1."), port
    assert "CERTIFICATE_VERIFY_FAILED" in _handshake(port, None)
    assert _plain_is_refused(port, backend)
    # ... and ttg itself, given no CA, stops at once with the reason (exit 2), no retry loop
    secret = platform.state_dir / "secrets" / ("redis.pass" if backend == "redis"
                                               else "rabbitmq.pass")
    url = (f"rediss://127.0.0.1:{port}/0" if backend == "redis"
           else f"amqps://ttg@127.0.0.1:{port}/ttg")
    st = run([str(Path(sys.executable).parent / "ttg"), "status", "--run-id", prefix],
             TTG_BACKEND=backend, TTG_BROKER_URL=url, TTG_BROKER_PASSWORD_FILE=str(secret),
             TTG_BROKER_CA_FILE="")
    assert st.returncode == 2, st.stdout + st.stderr
    assert "certificate did not verify" in st.stderr.strip().splitlines()[-1]
