"""TLS to the brokers (ttg/backends/tls.py) against a real redis-server listening with TLS
only: the server is verified by chain *and* name, and every way that cannot work ends at
once in one clear line (exit 2), never in a retry loop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import RedisServer, free_port, wait_port

from ttg.backends import get_backend
from ttg.backends.base import BrokerConfig
from ttg.backends.tls import check_ca_file, redis_kwargs
from ttg.errors import BrokerUnavailable, ConfigError

BIN = Path(sys.executable).parent


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for IP:127.0.0.1 only (not 'localhost')."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server", cwd=d)
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "other.key", "-out", "other.crt", "-days", "2", "-subj", "/CN=other",
             cwd=d)
    return d


@pytest.fixture(scope="module")
def tls_redis(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    d = tmp_path_factory.mktemp("tls-redis")
    port, password = free_port(), "tls-" + os.urandom(6).hex()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "no",
         "--requirepass", password, "--dir", str(d), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, password
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _check(url: str, password: str, ca_file: str | None, timeout: float = 2.0) -> None:
    cfg = BrokerConfig(url=url, password=password, ca_file=ca_file, connect_timeout_s=timeout,
                       retry_budget_s=timeout)
    get_backend("redis", cfg).check()


def test_a_verified_server_answers(tls_redis: tuple[int, str], pki: Path) -> None:
    port, password = tls_redis
    _check(f"rediss://127.0.0.1:{port}/0", password, str(pki / "ca.crt"))


@pytest.mark.parametrize(("host", "ca", "why"), [
    ("127.0.0.1", None, "self-signed certificate"),        # the system store knows no such CA
    ("127.0.0.1", "other.crt", "self-signed certificate"),  # another CA
    ("localhost", "ca.crt", "localhost"),                   # a name the certificate lacks
])
def test_an_unverified_server_is_one_clear_error(tls_redis: tuple[int, str], pki: Path,
                                                 host: str, ca: str | None, why: str) -> None:
    port, password = tls_redis
    with pytest.raises(ConfigError) as err:
        _check(f"rediss://{host}:{port}/0", password, str(pki / ca) if ca else None,
               timeout=30)  # would retry for 30 s if it were taken for an outage
    assert "certificate did not verify" in str(err.value) and why in str(err.value)


def test_tls_to_a_plain_server_says_what_to_check(tmp_path: Path, pki: Path) -> None:
    """A plain Redis answers a TLS handshake with silence, which looks like an outage: it is
    retried for the budget, and the error says what to check."""
    plain = RedisServer(tmp_path / "plain")
    try:
        with pytest.raises(BrokerUnavailable, match="does the server listen with TLS"):
            _check(f"rediss://127.0.0.1:{plain.port}/0", plain.password, str(pki / "ca.crt"),
                   timeout=1)
    finally:
        plain.stop()


def test_plain_to_a_tls_server_is_refused(tls_redis: tuple[int, str]) -> None:
    port, password = tls_redis
    with pytest.raises(BrokerUnavailable, match="use rediss:// or amqps://"):
        _check(f"redis://127.0.0.1:{port}/0", password, None, timeout=1)


def test_a_ca_file_with_a_plain_url_or_unreadable_is_a_config_error(pki: Path) -> None:
    with pytest.raises(ConfigError, match="use rediss:// for TLS"):
        check_ca_file("redis://127.0.0.1:1/0", str(pki / "ca.crt"))
    with pytest.raises(ConfigError, match="cannot use the broker CA file"):
        check_ca_file("rediss://127.0.0.1:1/0", str(pki / "missing.crt"))
    with pytest.raises(ConfigError, match="cannot use the broker CA file"):
        check_ca_file("amqps://u@127.0.0.1:1/v", str(pki / "ext"))  # not a certificate
    check_ca_file("amqps://u@127.0.0.1:1/v", str(pki / "ca.crt"))
    check_ca_file("redis://127.0.0.1:1/0", None)
    assert redis_kwargs("redis://h:1/0", "x") == {}
    assert redis_kwargs("rediss://h:1/0", "ca")["ssl_check_hostname"] is True


def test_the_cli_stops_with_the_reason_last(tls_redis: tuple[int, str], pki: Path,
                                            tmp_path: Path) -> None:
    port, password = tls_redis
    (tmp_path / "pass").write_text(password)
    env = {**os.environ, "TTG_BACKEND": "redis", "TTG_BROKER_URL": f"rediss://127.0.0.1:{port}/0",
           "TTG_BROKER_PASSWORD_FILE": str(tmp_path / "pass"), "TTG_BROKER_CA_FILE": "",
           "TTG_CONNECT_TIMEOUT": "30"}
    r = subprocess.run([BIN / "ttg", "status", "--run-id", "r1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "certificate did not verify" in r.stderr.strip().splitlines()[-1]
    env["TTG_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
    env["TTG_BROKER_CA_FILE"] = str(pki / "ca.crt")
    r = subprocess.run([BIN / "ttg", "status", "--run-id", "r1"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "use rediss:// for TLS" in r.stderr.strip().splitlines()[-1]
