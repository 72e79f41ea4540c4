"""One broker user per role: the Redis ACL users of roles/redis (their rules read from the
role's defaults, applied to a real redis-server). A worker's credential completes a run but
cannot delete the run's streams, flush, reconfigure or list the server, nor rewrite the spec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex
import yaml
from conftest import Env, spec

from ttg.backends.redis_store import GROUP, Keys

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def acl_users() -> list[dict]:
    return yaml.safe_load((ROOT / "roles/redis/defaults/main.yml").read_text())["redis_acl_users"]


@pytest.fixture
def acl(tmp_path: Path):
    from brokers import RedisServer

    server = RedisServer(tmp_path / "redis")
    admin = server.client()
    creds = {}
    for u in acl_users():
        pw = "pw-" + os.urandom(8).hex()
        admin.execute_command("ACL", "SETUSER", u["name"], "reset", "on", f">{pw}",
                              *u["rules"].split())
        pwfile = tmp_path / f"{u['name']}.pass"
        pwfile.write_text(pw)
        pwfile.chmod(0o600)
        creds[u["name"]] = (f"redis://{u['name']}@127.0.0.1:{server.port}/0", pw, pwfile)
    yield server, creds
    server.stop()


def client(creds: dict, name: str) -> redis.Redis:
    url, pw, _f = creds[name]
    return redis.Redis.from_url(url, password=pw, decode_responses=True)


@pytest.mark.parametrize("backend", ["redis", "static"])
def test_workers_complete_a_run_with_the_worker_user_only(acl, tmp_path, backend):
    server, creds = acl
    ctl_url, ctl_pw, _ = creds["ttg-controller"]
    env = Env(backend, server, tmp_path)
    env.broker = type("B", (), {"url": ctl_url, "password": ctl_pw})()
    ctl = env.make()
    ctl.submit(spec("lp", params=200, chunk=10, workers=2, task="poison", max_attempts=2))
    w_url, _pw, w_file = creds["ttg-worker"]
    fleet = env.fleet("lp", 2, TTG_BROKER_URL=w_url, TTG_BROKER_PASSWORD_FILE=str(w_file),
                      TTG_POISON_PARAM="55")
    try:
        codes = [w.wait(timeout=90) for w in fleet]
    finally:
        env.stop_all()
    logs = "".join(Path(w.logfile).read_text()[-1500:] for w in fleet)  # type: ignore[attr-defined]
    assert codes == [0, 0], logs
    assert "NOPERM" not in logs
    p = ctl.progress("lp")
    # the retry, the rows and the poisoned point's last attempt (stored with its error) went
    # through with the worker's credential too
    assert (p.done, p.dead, p.retried) == (20, 0, 1)
    rows = ctl.take_rows("lp", 100)
    assert sorted(c for _t, c, _r in rows) == list(range(20))
    ctl.close()


def test_a_worker_credential_cannot_destroy_the_run(acl):
    server, creds = acl
    admin = server.client()
    k = Keys("lp2")
    ctl = client(creds, "ttg-controller")
    ctl.hset(k.meta, mapping={"run_id": "lp2", "params": "10", "chunk_size": "5"})
    ctl.xgroup_create(k.tasks, GROUP, id="0", mkstream=True)
    ctl.xadd(k.tasks, {"c": "0", "s": "0", "e": "5", "a": "1"})
    ctl.xadd(k.dlq, {"chunk": "1", "reason": "x"})
    w = client(creds, "ttg-worker")
    refused = [
        lambda: w.delete(k.tasks), lambda: w.unlink(k.dlq), lambda: w.flushall(),
        lambda: w.flushdb(), lambda: w.config_get("*"), lambda: w.keys("*"),
        lambda: w.scan(), lambda: w.xgroup_destroy(k.tasks, GROUP),
        lambda: w.xtrim(k.tasks, 0), lambda: w.hset(k.meta, "task", "os:_exit"),
        lambda: w.rename(k.tasks, "ttg:{lp2}:gone"), lambda: w.expire(k.tasks, 1),
        lambda: w.eval("return redis.call('DEL', KEYS[1])", 1, k.tasks),
        lambda: w.xadd("other:key", {"x": "1"}), lambda: w.acl_list(),
        lambda: w.execute_command("SHUTDOWN", "NOSAVE"),
    ]
    for i, call in enumerate(refused):
        # NOPERM, or (a script) "The user executing the script can't run this command"
        with pytest.raises(rex.ResponseError, match="NOPERM|no permissions|can't run"):
            call()
        assert admin.exists(k.tasks, k.dlq, k.meta) == 3, i
    assert admin.hget(k.meta, "task") is None
    # what it needs still works
    assert w.xreadgroup(GROUP, "w1", {k.tasks: ">"}, count=1)
    assert w.hgetall(k.meta)["run_id"] == "lp2"
    mon = client(creds, "ttg-monitor")
    assert mon.xlen(k.tasks) == 1 and mon.xpending(k.tasks, GROUP)["pending"] == 1
    for call in (lambda: mon.xadd(k.tasks, {"c": "1"}), lambda: mon.hset(k.meta, "a", "b"),
                 lambda: mon.keys("*"), lambda: mon.delete(k.tasks)):
        with pytest.raises(rex.NoPermissionError):
            call()
    c = client(creds, "ttg-controller")
    for call in (lambda: c.flushall(), lambda: c.config_get("*"), lambda: c.keys("*"),
                 lambda: c.set("not:ttg", "1")):
        with pytest.raises(rex.NoPermissionError):
            call()
    for conn in (w, mon, c, ctl, admin):
        conn.close()
