"""The CLI and its TTG_* environment under bad input: one clear line, exit 2, never a
traceback (`TTG_PARAMS=abc ttg --help` was one)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from ttg import cli

NUMERIC_ENV = ["TTG_PARAMS", "TTG_CHUNK_SIZE", "TTG_WORK_MS", "TTG_WORKERS", "TTG_MAX_ATTEMPTS",
               "TTG_MIN_IDLE_MS", "TTG_PREFETCH", "TTG_CONNECT_TIMEOUT", "TTG_METRICS_PORT",
               "TTG_WORKER_INDEX"]
hostile = st.sampled_from(["abc", "²", "١٢", "nan", "inf", "-1", "0", "1e400", " ", "1_0",
                           "9" * 5000, "\t7", "0x10", "3.5", "10"]) | st.text(max_size=12)


def test_bad_environment_with_help_is_one_line_exit_2():
    env = {**os.environ, "TTG_PARAMS": "abc"}
    out = subprocess.run([sys.executable, "-m", "ttg.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("ttg: error: TTG_PARAMS='abc' is not a whole number: unset it "
                                  "or give a whole number")
    assert out.stdout == ""


def test_bad_worker_index_is_one_line_exit_2():
    env = {**os.environ, "JOB_COMPLETION_INDEX": "²", "TTG_WORKER_INDEX": ""}
    out = subprocess.run([sys.executable, "-m", "ttg.cli", "work"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr.strip()) == (
        2, "ttg: error: JOB_COMPLETION_INDEX='²' is not a whole number: unset it or give a "
           "whole number")


@contextlib.contextmanager
def environ(values: dict[str, str]):  # noqa: ANN201
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's own errors: usage, then one error line, 2
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@fuzz_settings()
@given(st.dictionaries(st.sampled_from(NUMERIC_ENV), hostile, min_size=1, max_size=3),
       st.sampled_from([["--help"], ["validate"], ["work", "--help"]]))
def test_any_numeric_environment_is_accepted_or_one_line(values, argv):
    values = {k: v.replace("\x00", "") for k, v in values.items()}
    with environ({"TTG_TASK": "reference", "TTG_LOG_FORMAT": "text", **values}):
        code, out, err = run_main(argv)
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        last = err.strip().split("\n")[-1]
        assert last.startswith(("ttg: error: ", "usage: ")) or ": error: " in last, err


@fuzz_settings()
@given(st.lists(st.sampled_from(["--params", "--chunk-size", "--work-ms", "--workers",
                                 "--max-attempts", "--run-id"]) | hostile, max_size=6))
def test_any_validate_arguments_are_accepted_or_one_line(args):
    args = [a.replace("\x00", "") for a in args]
    with environ({"TTG_TASK": "reference"}):
        code, out, err = run_main(["validate", *args])
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 0:
        assert out.startswith("job spec ok")
    else:
        assert ": error: " in err.strip().split("\n")[-1]
