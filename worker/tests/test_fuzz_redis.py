"""Hostile and malformed Redis input: the '²' crash loop, then property tests of the parsers.

The rule: a malformed message is dead-lettered with the reason and the worker goes on; a
malformed job spec is one clear ConfigError. `make fuzz` runs the same properties with
TTG_FUZZ_EXAMPLES examples each (see fuzzing.py).
"""

from __future__ import annotations

import pytest
import redis
from conftest import spec
from fuzzing import examples, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from ttg.backends.redis_store import GROUP, Keys
from ttg.backends.redis_streams import MalformedMessage, RedisStreamsBackend, parse_task_entry
from ttg.errors import ConfigError
from ttg.sweep import JobSpec

pytestmark = pytest.mark.timeout(300 if examples() <= 1000 else 3600)  # make fuzz: longer


@pytest.fixture
def env(tmp_path):
    from brokers import RedisServer
    from conftest import Env

    server = RedisServer(tmp_path / "redis")
    e = Env("redis", server, tmp_path)
    yield e
    e.stop_all()
    server.stop()


# ---- the '²' crash loop (issue 15): real redis-server, real worker processes -------------

def test_superscript_two_is_dead_lettered_and_the_fleet_finishes(env):
    """`'²'.isdigit()` is true but `int('²')` raises: the old error path crashed the worker,
    which then took its own pending entry back first and crashed again, and so did every
    worker reclaiming it. Now it is dead-lettered once and the run completes."""
    b = env.make()
    b.submit(spec("sq", params=100, chunk=10, workers=2))
    r = env.broker.client()
    k = Keys("sq")
    r.xadd(k.tasks, {"c": "²"})
    r.xadd(k.tasks, {"c": "١٢"})  # Arabic-indic digits: int() accepts them, we must not
    fleet = env.fleet("sq", 2)
    assert [w.wait(timeout=60) for w in fleet] == [0, 0]
    p = b.progress("sq")
    assert p.done == 10
    dead = b.dead_letters("sq")
    assert [d.chunk for d in dead] == [-1] and len(r.xrange(k.dlq)) == 2
    raws = [f["raw"] for _i, f in r.xrange(k.dlq)]
    assert any("²" in x for x in raws) and any("١٢" in x for x in raws)
    assert all("chunk must be an integer" in f["reason"] for _i, f in r.xrange(k.dlq))
    assert r.xpending(k.tasks, GROUP)["pending"] == 0 and r.xlen(k.tasks) == 0
    b.close()


def test_superscript_two_held_by_a_dead_worker_is_dead_lettered_on_reclaim(env):
    """The entry sits in a dead consumer's pending list: the reclaiming worker dead-letters
    it (before the delivery-limit check, which a crash in parsing used to bypass)."""
    b = env.make(min_idle_ms=200)
    b.submit(spec("sq2", params=30, chunk=10, workers=1))
    r = env.broker.client()
    k = Keys("sq2")
    r.xadd(k.tasks, {"c": "²", "s": "0", "e": "10"})
    # a consumer takes everything and dies: the bad entry is now a reclaim, not a new read
    r.xreadgroup(GROUP, "ghost", {k.tasks: ">"}, count=10)
    w = env.worker("sq2", 0, "--exit-when-done", TTG_MIN_IDLE_MS="200")
    assert w.wait(timeout=60) == 0
    assert b.progress("sq2").done == 3
    assert len(r.xrange(k.dlq)) == 1 and r.xpending(k.tasks, GROUP)["pending"] == 0
    b.close()


def test_bytes_that_are_not_utf8_are_dead_lettered_not_a_client_crash(env):
    """With decode_responses the client used to raise UnicodeDecodeError inside XREADGROUP's
    reply, before any parser could dead-letter the entry: the same crash loop."""
    b = env.make()
    b.submit(spec("utf", params=20, chunk=10, workers=1))
    raw = redis.Redis(host="127.0.0.1", port=env.broker.port, password=env.broker.password)
    k = Keys("utf")
    raw.xadd(k.tasks, {b"c": b"\xff\xfe", b"\xc3": b"1"})
    w = env.worker("utf", 0, "--exit-when-done")
    assert w.wait(timeout=60) == 0
    assert b.progress("utf").done == 2
    (_i, f), = raw.xrange(k.dlq)
    assert b"malformed message" in f[b"reason"]
    raw.close()
    b.close()


def test_a_malformed_spec_in_the_broker_is_one_clear_line(env):
    """A worker reading a spec nobody could have submitted (params 'abc') exits 2 with one
    line naming the field, instead of a traceback."""
    r = env.broker.client()
    r.hset(Keys("badspec").meta, mapping={"run_id": "badspec", "params": "abc",
                                          "chunk_size": "10"})
    out = env.ttg("work", "--worker-index", "0", run_id="badspec", timeout=30)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ttg: error: the job spec of run badspec is malformed") \
        and "params" in last, out.stderr
    assert "Traceback" not in out.stderr


def test_a_spec_naming_another_run_is_refused(env):
    r = env.broker.client()
    r.hset(Keys("mine").meta, mapping=JobSpec("other", 10, 5).to_fields())
    b = env.make()
    with pytest.raises(ConfigError, match="names run 'other'"):
        b.load_spec("mine")
    b.close()


# ---- properties ------------------------------------------------------------------------

SPEC = JobSpec("fuzz", params=1000, chunk_size=10, max_attempts=5)
text = st.text(max_size=30)
field_value = st.one_of(text, st.integers().map(str), st.sampled_from(
    ["²", "١٢", " 1", "1_0", "+1", "-1", "0", "99", "100", "1e3", "nan", "", "\x00", "5"]))


@st.composite
def task_fields(draw) -> dict:  # noqa: ANN001
    keys = draw(st.lists(st.sampled_from(["c", "s", "e", "a", "err"]) | text, max_size=6))
    return {k: draw(field_value) for k in keys}


@fuzz_settings()
@given(task_fields())
def test_parse_task_entry_accepts_or_rejects_with_a_reason(fields):
    try:
        chunk, start, end, attempt, _err = parse_task_entry(SPEC, fields)
    except MalformedMessage as exc:
        assert str(exc) and exc.chunk >= -1
        return
    # what is accepted is exactly a well-formed entry of this job
    assert fields["c"] == str(chunk) and (start, end) == SPEC.bounds(chunk)
    assert 1 <= attempt <= SPEC.max_attempts
    assert set(fields) <= {"c", "s", "e", "a", "err"}


@fuzz_settings()
@given(st.integers(0, SPEC.chunks_total - 1), st.integers(1, 5))
def test_parse_task_entry_takes_every_entry_the_backend_writes(chunk, attempt):
    s, e = SPEC.bounds(chunk)
    fields = {"c": str(chunk), "s": str(s), "e": str(e), "a": str(attempt), "err": "boom"}
    assert parse_task_entry(SPEC, fields) == (chunk, s, e, attempt, "boom")


spec_value = st.one_of(text, st.integers().map(str), st.floats().map(str), st.sampled_from(
    ["²", "0", "-1", "1", "10", "nan", "inf", "1e400", "os:_exit", "a:b:c", "", "fuzz"]))


@fuzz_settings()
@given(st.dictionaries(st.sampled_from(["run_id", "params", "chunk_size", "task", "work_ms",
                                        "workers", "max_attempts", "junk"]),
                       spec_value, max_size=8))
def test_job_spec_from_fields_is_checked_fully(data):
    try:
        s = JobSpec.from_fields(data)
    except ConfigError as exc:
        assert str(exc).startswith("the job spec is malformed: ") and "\n" not in str(exc)
        return
    assert s.check() is s and 0 < s.chunks_total <= 10**8 and s.params > 0
    assert JobSpec.from_fields(s.to_fields()) == s  # what it reads, it writes back the same


@fuzz_settings()
@given(st.builds(JobSpec, run_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"),
                 params=st.integers(1, 10**8), chunk_size=st.integers(1, 10**6),
                 task=st.sampled_from(["reference", "noop", "cpu", "pkg.mod:fn"]),
                 work_ms=st.floats(0, 1e4), workers=st.integers(1, 1000),
                 max_attempts=st.integers(1, 100)))
def test_job_spec_round_trips_through_the_broker_fields(s):
    assert JobSpec.from_fields(s.to_fields(), s.run_id) == s


# ---- the same against a real server: entries written by another client -----------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from brokers import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp("fuzzredis"))
    yield srv
    srv.stop()


raw_bytes = st.binary(max_size=12) | st.sampled_from([b"\xb2", "²".encode(), b"\xff", b"7"])


@fuzz_settings(scale=0.05, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from([b"c", b"s", b"e", b"a", b"err"]) | raw_bytes,
                       raw_bytes, min_size=1, max_size=5))
def test_any_entry_in_a_real_stream_is_run_or_dead_lettered(server, fields):
    """Whatever bytes another client XADDs, the worker's next_delivery returns a valid
    delivery or dead-letters the entry (acked and deleted); it never raises."""
    from ttg.backends.base import BrokerConfig

    raw = redis.Redis(host="127.0.0.1", port=server.port, password=server.password)
    raw.flushall()
    b = RedisStreamsBackend(BrokerConfig(url=server.url, password=server.password,
                                         min_idle_ms=60000, retry_budget_s=5))
    try:
        b.submit(JobSpec("fz", params=20, chunk_size=10))
        k = Keys("fz")
        for entry_id, _f in raw.xrange(k.tasks):  # only the hostile entry stays
            raw.xdel(k.tasks, entry_id)
        raw.xadd(k.tasks, fields)
        b.start_consuming("fz", "w", None)
        d = b.next_delivery(0.2)
        if d is None:
            assert raw.xlen(k.dlq) == 1 and raw.xlen(k.tasks) == 0
            assert b.dead_letters("fz")[0].reason.startswith("malformed message: ")
        else:
            assert (d.start, d.end) == (d.chunk * 10, d.chunk * 10 + 10)
            assert raw.xlen(k.dlq) == 0
    finally:
        b.close()
        raw.close()

