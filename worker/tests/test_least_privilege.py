"""One broker user per role: the Redis ACL users of roles/redis and the RabbitMQ users of
roles/rabbitmq (their rules read from the roles' defaults, applied to a real redis-server and
a real RabbitMQ node). A worker's credential completes a run but cannot delete the run's
streams or queues, flush, reconfigure or list the server, nor rewrite the spec."""

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
    _finished_with_the_worker_credential(env, ctl, fleet, "lp", ("NOPERM",))


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


# ---- RabbitMQ: the users of roles/rabbitmq (rabbitmq_users) --------------------------------
def rabbit_worker_user() -> dict:
    users = yaml.safe_load((ROOT / "roles/rabbitmq/defaults/main.yml").read_text())
    return next(u for u in users["rabbitmq_users"] if u["name"] == "ttg-worker")


@pytest.fixture
def rabbit_worker(tmp_path: Path):
    """(Env of a vhost of its own as the controller, worker URL, worker password file): the
    worker user has exactly the role's permissions on that vhost, and no tags."""
    from brokers import shared_rabbit_lease

    lease = shared_rabbit_lease()
    env = Env("rabbitmq", lease, tmp_path)
    u = rabbit_worker_user()
    name, pw = f"ttg-worker-{lease.vhost}", "pw-" + os.urandom(8).hex()
    lease.ctl("add_user", name, pw)
    lease.ctl("set_permissions", "-p", lease.vhost, name, u["configure"], u["write"], u["read"])
    lease.ctl("set_user_tags", name, *u["tags"])
    pwfile = tmp_path / "worker.pass"
    pwfile.write_text(pw)
    pwfile.chmod(0o600)
    try:
        yield env, f"amqp://{name}@127.0.0.1:{lease.port}/{lease.vhost}", pw, pwfile
    finally:
        env.stop_all()
        lease.ctl("delete_user", name)


def test_rabbitmq_workers_complete_a_run_with_the_worker_user_only(rabbit_worker):
    env, w_url, _pw, w_file = rabbit_worker
    # started before the submission: a worker may not declare the run's queues, it waits
    fleet = env.fleet("lpr", 2, TTG_BROKER_URL=w_url, TTG_BROKER_PASSWORD_FILE=str(w_file),
                      TTG_POISON_PARAM="55")
    ctl = env.make(options={"retry_tiers_ms": [200, 400]})
    ctl.submit(spec("lpr", params=200, chunk=10, workers=2, task="poison", max_attempts=2))
    _finished_with_the_worker_credential(env, ctl, fleet, "lpr", ("ACCESS_REFUSED", "403"))


def test_rabbitmq_worker_credential_cannot_destroy_the_run(rabbit_worker):
    import pika
    import pika.exceptions as pex

    from ttg.backends.rabbitmq.messages import Names

    env, w_url, pw, _f = rabbit_worker
    ctl = env.make()
    ctl.submit(spec("lpr2", params=50, chunk=10, workers=1))
    n = Names("lpr2")
    user, port = w_url[len("amqp://"):].split("@")[0], env.broker.port
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", port, env.broker.vhost, pika.PlainCredentials(user, pw)))
    refused = [
        lambda ch: ch.queue_delete(n.tasks), lambda ch: ch.queue_delete(n.meta),
        lambda ch: ch.queue_delete(n.results), lambda ch: ch.queue_delete(n.dlq),
        # redeclaring (or creating) a queue needs configure too
        lambda ch: ch.queue_declare(n.tasks, durable=True,
                                    arguments={"x-queue-type": "quorum"}),
        lambda ch: ch.queue_declare("ttg.lpr2.other", durable=True),
        lambda ch: ch.exchange_declare("ttg.lpr2.x", "fanout"),
        lambda ch: ch.queue_bind(n.tasks, "amq.fanout"),
        # reading what it does not consume: the dead letters and the rows
        lambda ch: ch.basic_get(n.dlq), lambda ch: ch.basic_get(n.rows),
    ]
    for i, call in enumerate(refused):
        ch = conn.channel()
        with pytest.raises(pex.ChannelClosedByBroker) as exc:
            call(ch)
        assert exc.value.reply_code == 403, (i, exc.value)
    # what it needs still works: find the run's queues, take a task
    ch = conn.channel()
    for q in (n.tasks, n.meta, n.presence, n.results, n.dlq):
        ch.queue_declare(q, passive=True)
    method, _props, _body = ch.basic_get(n.tasks)
    assert method is not None
    ch.basic_nack(method.delivery_tag, requeue=True)
    conn.close()
    # nothing of the run went away
    assert ctl.progress("lpr2").chunks_total == 5
    admin = pika.BlockingConnection(pika.URLParameters(env.broker.url_with_password))
    ach = admin.channel()
    for q in (n.tasks, n.meta, n.presence, n.results, n.dlq, n.rows):
        ach.queue_declare(q, passive=True)
    assert ach.queue_declare(n.tasks, passive=True).method.message_count == 5
    admin.close()
    ctl.close()


def _finished_with_the_worker_credential(env, ctl, fleet, run: str,  # noqa: ANN001
                                         refused: tuple[str, ...]) -> None:
    """The fleet (two workers, 20 chunks, one poisoned point retried once) ends the run with
    nothing refused: the retry, the rows and the poisoned point's stored failure all went
    through with the worker's credential."""
    try:
        codes = [w.wait(timeout=90) for w in fleet]
    finally:
        env.stop_all()
    logs = "".join(Path(w.logfile).read_text()[-1500:] for w in fleet)
    assert codes == [0, 0], logs
    assert not [word for word in refused if word in logs], logs
    p = ctl.progress(run)
    assert (p.done, p.dead, p.retried) == (20, 0, 1)
    rows = ctl.take_rows(run, 100)
    assert sorted(c for _t, c, _r in rows) == list(range(20))
    ctl.close()
