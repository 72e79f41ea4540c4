"""Property tests of the parsers of records another process wrote (no broker needed):
result records, dead letters, the RabbitMQ task body, headers and records, faults files.

Each property: any input is either read as exactly what a writer of ours would have written,
or refused with a reason (a ValueError subclass / ConfigError), never another exception.
"""

from __future__ import annotations

import datetime
import json
import math

import pytest
from fuzzing import fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from ttg.backends.rabbitmq import (
    MalformedBody,
    RabbitMQBackend,
    _event,
    _header_int,
    parse_task_body,
)
from ttg.backends.redis_store import parse_dead_letter
from ttg.controller import parse_faults
from ttg.errors import ConfigError
from ttg.partial import MalformedResult, Partial, decode_result, encode_result
from ttg.sweep import JobSpec

SPEC = JobSpec("fuzz", params=1000, chunk_size=10, max_attempts=5)

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
hostile_text = st.sampled_from(["²", "١٢", "nan", "inf", "-inf", "1e400", "[" * 5000,
                                "{\"c\":" * 3000, "\ud800", "\x00", "", "null", "[]"])


def body_of(draw_value: object) -> bytes:
    return json.dumps(draw_value).encode()


# ---- result records (redis hash values, rabbitmq 'result' records) ---------------------

@fuzz_settings()
@given(st.one_of(json_values.map(body_of), st.binary(max_size=40),
                 hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.fixed_dictionaries({"count": json_scalars, "sum": json_scalars,
                                        "min": json_scalars, "max": json_scalars})
                 .map(body_of)))
def test_decode_result_reads_a_partial_or_refuses(raw):
    try:
        partial, meta = decode_result(raw)
    except MalformedResult as exc:
        assert str(exc).startswith("malformed result record: ")
        return
    assert isinstance(partial.count, int) and partial.count >= 0
    assert math.isfinite(partial.sum)
    assert partial.count == 0 or math.isfinite(partial.min) and math.isfinite(partial.max)


@fuzz_settings()
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=20),
       st.dictionaries(st.sampled_from(["worker", "task_s", "started"]), st.text(max_size=5)))
def test_decode_result_reads_every_record_encode_result_writes(values, meta):
    p = Partial.of(values)
    got, _meta = decode_result(encode_result(p, **meta))
    assert (got.count, got.min, got.max) == (p.count, p.min, p.max) and got.sum == p.sum


# ---- dead letters (redis dlq entries) ---------------------------------------------------

@fuzz_settings()
@given(st.dictionaries(st.sampled_from(["chunk", "reason", "attempts", "worker", "at", "raw"])
                       | st.text(max_size=5), st.text(max_size=12) | hostile_text))
def test_parse_dead_letter_never_raises(fields):
    d = parse_dead_letter(fields)
    assert isinstance(d.chunk, int) and isinstance(d.attempts, int) and d.attempts >= 0
    assert d.at is None or math.isfinite(d.at)
    if fields.get("chunk", "").isascii() and fields.get("chunk", "").isdigit():
        assert d.chunk == int(fields["chunk"])


# ---- the RabbitMQ task body, headers and records ----------------------------------------

task_dicts = st.dictionaries(st.sampled_from(["c", "s", "e", "a", "lost", "err"]),
                             json_scalars | st.integers(-3, 120) | json_values, max_size=6)


@fuzz_settings()
@given(st.one_of(task_dicts.map(body_of), json_values.map(body_of), st.binary(max_size=40),
                 hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_rabbitmq_task_body_is_run_or_refused_with_a_reason(body):
    try:
        data, chunk, start, end, attempt, lost = parse_task_body(SPEC, body)
    except MalformedBody as exc:
        assert str(exc) and exc.chunk >= -1
        return
    assert data["c"] == chunk and not isinstance(data["c"], bool)
    assert (start, end) == SPEC.bounds(chunk) and 1 <= attempt <= 5 and 0 <= lost


@fuzz_settings()
@given(st.integers(0, SPEC.chunks_total - 1), st.integers(1, 5), st.integers(0, 9))
def test_rabbitmq_task_body_takes_every_body_the_backend_writes(chunk, attempt, lost):
    s, e = SPEC.bounds(chunk)
    body = json.dumps({"c": chunk, "s": s, "e": e, "a": attempt, "err": "x", "lost": lost})
    assert parse_task_body(SPEC, body.encode())[1:] == (chunk, s, e, attempt, lost)


headers = st.dictionaries(st.sampled_from(["k", "chunk", "x-delivery-count", "x-death",
                                           "x-stream-offset"]) | st.text(max_size=4),
                          json_values | st.datetimes(), max_size=5)


@fuzz_settings()
@given(headers, st.sampled_from(["chunk", "x-delivery-count", "x-stream-offset"]))
def test_rabbitmq_header_int_never_raises(h, key):
    assert isinstance(_header_int(h, key), int)


def test_rabbitmq_header_int_regressions():
    # make fuzz (10,000 examples) found the first: int(inf) raised OverflowError
    for value in (float("inf"), float("-inf"), float("nan"), "x", [1], None):
        assert _header_int({"x-stream-offset": value}, "x-stream-offset") == 0
    assert _header_int({"chunk": 7}, "chunk") == 7


@fuzz_settings()
@given(headers, st.one_of(task_dicts.map(body_of), json_values.map(body_of),
                          st.binary(max_size=30)))
def test_rabbitmq_dead_letter_records_never_raise(h, body):
    h = {**h, "x-death": h.get("x-death") if isinstance(h.get("x-death"), list) else [
        {"reason": "delivery_limit", "count": 2,
         "time": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)}]}
    try:
        d = RabbitMQBackend._parse_dead(h, body)
    except Exception as exc:  # noqa: BLE001 - the property is that nothing escapes
        pytest.fail(f"_parse_dead raised {exc!r} on headers={h!r} body={body!r}")
    assert isinstance(d.chunk, int) and isinstance(d.attempts, int)


@fuzz_settings()
@given(json_scalars, st.dictionaries(st.sampled_from(["chunk", "worker"]), json_scalars))
def test_rabbitmq_event_records_never_raise(ts, data):
    try:
        e = _event("reclaimed", ts, data)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"_event raised {exc!r} on ts={ts!r} data={data!r}")
    assert isinstance(e["chunk"], int) and (e["ts"] is None or isinstance(e["ts"], float))


# ---- faults files -----------------------------------------------------------------------

@fuzz_settings()
@given(st.one_of(json_values.map(json.dumps), st.text(max_size=40), hostile_text,
                 st.lists(st.dictionaries(st.sampled_from(["type", "at", "at_progress",
                                                           "recovered_s", "outage_s"]),
                                          json_scalars), max_size=3).map(json.dumps)))
def test_parse_faults_reads_a_fault_list_or_one_line(text):
    try:
        faults = parse_faults(text, "--faults f.json")
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("--faults f.json: ") and "\n" not in msg and len(msg) < 400
        return
    assert isinstance(faults, list)
    for f in faults:
        assert isinstance(f["type"], str)
        for key in ("at", "at_progress", "recovered_s", "outage_s"):
            assert f.get(key) is None or (isinstance(f[key], float) and math.isfinite(f[key]))


def test_parse_faults_regressions():
    """Found by the fuzzer: a deeply nested list was a RecursionError traceback, a list or
    NaN where a number belongs was taken as it was."""
    for text in ["[" * 100000, '[{"type": "x", "at": [1]}]', '[{"type": "x", "at": NaN}]',
                 '[{"type": "x", "recovered_s": true}]']:
        with pytest.raises(ConfigError):
            parse_faults(text, "f")


# ---- BrokerConfig's repr ----------------------------------------------------------------

@fuzz_settings()
@given(st.text(min_size=6, max_size=30).filter(lambda p: p.strip() == p and "'" not in p),
       st.sampled_from(["redis://127.0.0.1:16379/0", "amqp://ttg@127.0.0.1:5673/ttg"]))
def test_broker_config_repr_never_shows_the_password(password, url):
    from urllib.parse import quote

    from ttg.backends.base import BrokerConfig

    with_pw = url.replace("://", f"://u:{quote(password, safe='')}@", 1).replace("ttg@", "")
    # a password that is part of any config's repr anyway ("=None, ", "127.0.0") proves nothing
    # (the same two configs with the password "x": a replace() in the URL would also
    # rewrite its host where the password is part of it, as "127.0." is)
    plain = "".join(repr(BrokerConfig(u, "x")) for u in (
        url, url.replace("://", "://u:x@", 1).replace("ttg@", "")))
    assume(password not in plain and quote(password, safe="") not in plain)
    for cfg in (BrokerConfig(url, password), BrokerConfig(with_pw, password)):
        text = repr(cfg) + str(cfg) + f"{cfg}"
        assert password not in text and quote(password, safe="") not in text
        assert "password='***'" in text
