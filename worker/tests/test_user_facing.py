"""What a user reads: TTG_* variables with a bad value, and utilization under `scale`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from ttg import cli_parser as cli  # the parser and its TTG_* variables
from ttg.controller import worker_seconds


@pytest.mark.parametrize(
    ("var", "value", "cmd"),
    [
        ("TTG_PARAMS", "abc", ["--help"]),
        ("TTG_CONNECT_TIMEOUT", "soon", ["sweep", "--help"]),
        ("TTG_METRICS_PORT", "9x", ["work", "--help"]),
    ],
)
def test_bad_ttg_variable_is_one_line_not_a_traceback(var: str, value: str, cmd: list[str]) -> None:
    env = {**os.environ, var: value}
    out = subprocess.run([sys.executable, "-m", "ttg.cli", *cmd], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines == [f"ttg: error: {var}={value!r} is not "
                     f"{'a number' if 'TIMEOUT' in var else 'a whole number'}: unset it or give "
                     f"{'a number' if 'TIMEOUT' in var else 'a whole number'}"], out.stderr


def test_every_variable_the_help_names_is_read() -> None:
    """Each `TTG_X` that an option's help names changes that option's default."""
    parser = cli.build_parser()
    checked = 0
    for sub in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            names = re.findall(r"\b(TTG_[A-Z_]+)\b", action.help or "")
            if not names or not action.option_strings or action.choices:
                continue
            var = names[0]
            flag = action.nargs == 0  # a switch: "1" turns it on
            probe = "1" if flag else (
                "7" if action.type in (cli._int, cli._float) else "probe-value")  # noqa: SLF001
            old = os.environ.get(var)
            os.environ[var] = probe
            try:
                fresh = cli.build_parser()
                try:
                    ns = fresh.parse_args([sub.prog.split()[-1], *_required(sub)])
                except SystemExit:  # a command with sub-commands of its own (dlq)
                    continue
            finally:
                if old is None:
                    del os.environ[var]
                else:
                    os.environ[var] = old
            value = getattr(ns, action.dest)
            assert (value is True) if flag else str(value) in (probe, "7.0"), (
                sub.prog, action.dest, var, value)
            checked += 1
    assert checked >= 15


def _required(sub) -> list[str]:
    args: list[str] = []
    for action in sub._actions:  # noqa: SLF001
        if action.required and action.option_strings:
            args += [action.option_strings[0], action.choices[0] if action.choices else "x"]
    return args


def test_scale_utilization_counts_the_workers_that_existed() -> None:
    # 3 workers for 10 s; +2 from t=2 to t=6 (stopped at 6.5): 30 + 2 * (8 - 3.5) = 39 s
    t0 = 1000.0
    faults = [{"type": "scale-up", "at": t0 + 2, "workers_delta": 2},
              {"type": "scale-down", "at": t0 + 6, "stopped_at": t0 + 6.5, "workers_delta": -2},
              {"type": "worker-kill", "at": t0 + 1}]
    assert worker_seconds(3, 10.0, faults, t0 + 10) == pytest.approx(39.0)
    assert worker_seconds(3, 10.0, [], t0 + 10) == 30.0
