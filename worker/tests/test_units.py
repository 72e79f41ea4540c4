"""Pure logic: chunking, the expected sum, partials, tasks and the CLI's input checks."""

from __future__ import annotations

import json
import math

import pytest

from ttg.cli import main
from ttg.errors import ConfigError
from ttg.partial import Aggregator, Partial, decode_result, encode_result
from ttg.rows import run_chunk
from ttg.spaces import range_space
from ttg.sweep import JobSpec, reference_expected_sum, reference_value, static_range
from ttg.tasks import load_task


@pytest.mark.parametrize("params,chunk", [(10000, 100), (1000, 10), (1001, 10), (7, 3), (1, 5)])
def test_chunks_cover_every_parameter_once(params, chunk):
    spec = JobSpec("r", params, chunk)
    covered = [p for k in range(spec.chunks_total) for p in range(*spec.bounds(k))]
    assert covered == list(range(params))


def test_bounds_rejects_out_of_range_chunk():
    spec = JobSpec("r", 100, 10)
    with pytest.raises(ValueError):
        spec.bounds(10)


@pytest.mark.parametrize("params", [1, 999, 1000, 1001, 2555, 10000])
def test_expected_sum_matches_brute_force(params):
    brute = math.fsum(reference_value(p) for p in range(params))
    assert reference_expected_sum(params) == pytest.approx(brute, abs=1e-6)


def test_known_sums_from_design():
    assert reference_expected_sum(1000) == 500035.5
    assert reference_expected_sum(10000) == 5000355.0


def test_reference_formula_keeps_the_seed_quirk():
    # f"0.{p % 100}" reads 0.5 for p % 100 == 5 (not 0.05): kept bit for bit
    assert reference_value(5) == (5 * 7 + 13) % 1000 + 0.5
    assert reference_value(15) == (15 * 7 + 13) % 1000 + 0.15


@pytest.mark.parametrize("workers,chunks", [(3, 100), (4, 3), (1, 7), (5, 5)])
def test_static_ranges_partition_the_chunks(workers, chunks):
    seen = [c for i in range(workers) for c in static_range(i, workers, chunks)]
    assert seen == list(range(chunks))


def test_static_range_rejects_bad_index():
    with pytest.raises(ConfigError):
        static_range(3, 3, 10)


def test_aggregator_first_write_wins_and_sums_exactly():
    agg = Aggregator()
    spec = JobSpec("r", 1000, 10)
    for k in range(spec.chunks_total):
        part = run_chunk(load_task("reference"), range_space(1000), *spec.bounds(k),
                         work_ms=0).partial()
        assert agg.add(k, part)
    assert not agg.add(0, Partial(10, 1e9, 0, 1e9))  # a duplicate never counts
    assert agg.duplicates == 1
    assert agg.result() == {"count": 1000, "sum": 500035.5, "min": 0.41, "max": 999.98}


def test_result_encoding_round_trip():
    part = Partial.of([1.5, 2.5, -1.0])
    decoded, meta = decode_result(encode_result(part, worker="w", attempt=2))
    assert decoded == part
    assert meta["worker"] == "w" and meta["attempt"] == 2


def test_run_chunk_sleeps_work_ms_per_parameter():
    import time

    t0 = time.monotonic()
    run_chunk(load_task("noop"), range_space(20), 0, 20, work_ms=5)
    assert time.monotonic() - t0 >= 0.1


@pytest.mark.parametrize("path", ["nope", "os:does_not_exist", "no_such_module_x:f", ":f"])
def test_unknown_task_is_a_config_error(path):
    with pytest.raises(ConfigError):
        load_task(path)


def test_task_by_module_path():
    assert load_task("math:sqrt").call(16, None) == 4.0


@pytest.mark.parametrize("field,value", [("params", 0), ("params", -5), ("chunk_size", 0),
                                          ("workers", 0), ("work_ms", -1)])
def test_spec_validation(field, value):
    kw = {"run_id": "r", "params": 10, "chunk_size": 2, field: value}
    with pytest.raises(ConfigError):
        JobSpec(**kw).validate()


def test_spec_round_trips_through_fields():
    spec = JobSpec("run-1", 123, 7, "noop", 2.5, 4, 3)
    assert JobSpec.from_fields(spec.to_fields()) == spec
    assert spec.same_job(JobSpec("run-1", 123, 7, "noop", 2.5, 9, 3))
    assert not spec.same_job(JobSpec("run-1", 124, 7, "noop", 2.5, 4, 3))


@pytest.mark.parametrize("argv,needle", [
    (["validate", "--params", "-5"], "params must be a positive integer"),
    (["validate", "--task", "kafka:nope"], "cannot import module"),
    (["validate", "--work-ms", "-1"], "work_ms must be >= 0"),
    (["check", "--backend", "kafka"], "valid backends are redis, rabbitmq, static"),
    (["status"], "no run id"),
    (["sweep", "--broker-url", "redis://127.0.0.1:1/0", "--faults-json", "{oops"],
     "--faults-json: not a readable JSON"),
    (["sweep", "--broker-url", "redis://127.0.0.1:1/0", "--faults", "/nonexistent/f.json"],
     "--faults /nonexistent/f.json: not a readable JSON file"),
])
def test_cli_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cli_unreachable_broker_fails_after_bounded_retries(capsys):
    import time

    from brokers import free_port

    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    rc = main(["check", "--broker-url", f"redis://127.0.0.1:{port}/0", "--connect-timeout", "1"])
    assert rc == 2
    assert time.monotonic() - t0 < 10
    assert "unreachable" in capsys.readouterr().err


def test_fault_records_given_from_outside_are_measured_against_the_results(tmp_path):
    from ttg.controller import measure_faults

    chunks = tmp_path / "chunks.jsonl"
    chunks.write_text("".join(
        json.dumps({"chunk": i, "finished": t}) + "\n"
        for i, t in enumerate([100.0, 101.0, 102.5, 130.0, 131.0])))
    faults = [
        {"type": "infra-crash", "at": 120.0, "recovered_s": None},
        {"type": "worker-kill", "at": 101.5, "recovered_s": 0.4},  # measured already: kept
        {"type": "late", "at": 200.0, "recovered_s": None},  # nothing after it
    ]
    out = measure_faults(faults, chunks, chunks_total=10)
    assert out[0]["recovered_s"] == 10.0
    assert out[0]["at_progress"] == 0.3  # 3 of 10 chunks had a result before it
    assert out[0]["last_result_before"] == 102.5
    assert out[0]["outage_s"] == 27.5
    assert out[1] == {"type": "worker-kill", "at": 101.5, "recovered_s": 0.4}
    assert out[2]["recovered_s"] is None and "outage_s" not in out[2]


@pytest.mark.parametrize("content,needle", [
    ("not json", "not a readable JSON file"),
    ('{"type": "x"}', "expected a JSON list"),
    ('[{"target": "x"}]', "expected a JSON list"),
    ('[{"type": "x", "at": "soon"}]', "is not a number"),
])
def test_bad_faults_file_is_a_clear_error(tmp_path, content, needle):
    from ttg.controller import load_faults

    path = tmp_path / "faults.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_faults(path)


def test_faults_file_numbers_written_as_strings_are_read_as_numbers(tmp_path):
    from ttg.controller import load_faults

    path = tmp_path / "faults.json"
    path.write_text('[{"type": "infra-crash", "at": "12.5", "at_progress": "0.25"}]')
    assert load_faults(path) == [{"type": "infra-crash", "at": 12.5, "at_progress": 0.25}]


def _chaos_summary(backend: str, held: object, sum_: float = 10.0) -> dict:
    return {"backend": backend, "platform": "local", "chunks_missing": 0, "chunks_done": 10,
            "chunks_dead_lettered": 0, "executions": 11, "ok": sum_ == 10.0,
            "result": {"sum": sum_}, "expected_sum": 10.0,
            "faults": [{"type": "worker-kill", "held": held, "recovered_s": 0.5}]}


def test_chaos_table_says_what_it_does_not_know():
    from ttg.chaos import table

    lines = table([_chaos_summary("redis", [4]), _chaos_summary("rabbitmq", None),
                   _chaos_summary("static", [], 11.0)]).splitlines()
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert rows["redis"][4:6] == ["1", "1"]  # one chunk interrupted, one redundant execution
    assert rows["rabbitmq"][4] == "?"  # the broker does not say what a consumer held
    assert rows["static"][6:8] == ["SUM", "WRONG"] and rows["static"][-1] == "NO"


def test_the_retry_policy_is_the_same_for_every_backend():
    """One place decides: the last attempt is dead-lettered, not retried; a chunk that has
    lost its worker is charged for it, and dead-lettered with the count and its last error
    once attempts plus losses pass max_attempts."""
    from ttg.backends import policy

    spec = JobSpec("r", 100, 10, max_attempts=3)
    assert [policy.exhausted(spec, a) for a in (1, 2, 3)] == [False, False, True]
    assert policy.lost_too_often(spec, 1, 2) is None  # its third execution may run
    assert policy.lost_too_often(spec, 1, 3) == (
        "delivery limit: the chunk lost its worker 3 time(s)")
    assert policy.lost_too_often(spec, 2, 2, "ValueError: x") == (
        "delivery limit: the chunk lost its worker 2 time(s); last error: ValueError: x")


def test_backoff_doubles_to_its_cap_and_spends_exactly_its_budget():
    """Delays double from 0.1 s up to the cap; the last one is cut to what is left of the
    budget (so the last try is at its end), then `wait` says no without sleeping."""
    from ttg.backends.backoff import Backoff

    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(round(s, 6))
        clock[0] += s

    b = Backoff(2.0, cap_s=0.4, sleep=sleep, clock=lambda: clock[0])
    while b.wait():
        pass
    assert slept == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.1]
    assert b.remaining() == 0.0 and not b.wait() and len(slept) == 7
    b.reset()
    assert b.remaining() == 2.0 and b.delay == 0.1
