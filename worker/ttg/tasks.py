"""Tasks: `module:function` taking one parameter index and returning a float.

Built-ins (usable by short name): `reference` (the seed formula), `noop`, `cpu` (a CPU-bound
example), and three fault hooks for chaos tests, inert unless named as the task:
`poison` (raises for the parameter in TTG_POISON_PARAM), `crash` (kills its own process there)
and `slow` (sleeps TTG_SLOW_S there). The `work_ms` of a job is simulated work added by the
runner after each parameter, on a deadline so it does not drift.
"""

from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Callable

from ttg.errors import ConfigError
from ttg.partial import Partial
from ttg.sweep import reference_value

TaskFn = Callable[[int], float]


def reference(p: int) -> float:
    return reference_value(p)


def noop(p: int) -> float:
    return 0.0


def cpu(p: int) -> float:
    """A CPU-bound example: about 20k floating point operations per parameter."""
    acc = 0.0
    for i in range(1, 2001):
        acc += math.sqrt(p + i) / i
    return acc


def _hook_param(var: str) -> int:
    return int(os.environ.get(var, "0"))


def poison(p: int) -> float:
    """`reference`, except it raises for the parameter TTG_POISON_PARAM (default 0)."""
    if p == _hook_param("TTG_POISON_PARAM"):
        raise ValueError(f"poisoned parameter {p}")
    return reference_value(p)


def crash(p: int) -> float:
    """`reference`, except the process dies (exit 137) at TTG_CRASH_PARAM (default 0)."""
    if p == _hook_param("TTG_CRASH_PARAM"):
        os._exit(137)
    return reference_value(p)


def slow(p: int) -> float:
    """`reference`, except parameter TTG_SLOW_PARAM (default 0) sleeps TTG_SLOW_S seconds."""
    if p == _hook_param("TTG_SLOW_PARAM"):
        time.sleep(float(os.environ.get("TTG_SLOW_S", "10")))
    return reference_value(p)


# Built-ins whose values are the reference formula's (the fault hooks only add a failure, a
# crash or a delay), so a run of them has a known exact sum.
REFERENCE_VALUED = frozenset({"reference", "poison", "crash", "slow"})

BUILTINS = {
    "reference": reference,
    "noop": noop,
    "cpu": cpu,
    "poison": poison,
    "crash": crash,
    "slow": slow,
}


def load_task(path: str) -> TaskFn:
    """Resolve a built-in name or `module:function`; a clear ConfigError otherwise."""
    if path in BUILTINS:
        return BUILTINS[path]
    module_name, sep, func_name = (path or "").partition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(
            f"unknown task {path!r}: use one of {', '.join(BUILTINS)} or 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task {path!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"task {path!r}: {module_name} has no function {func_name!r}")
    return fn


def run_chunk(
    fn: TaskFn,
    start: int,
    end: int,
    work_ms: float,
) -> Partial:
    """Run `fn` over [start, end); sleep `work_ms` per parameter on a fixed deadline."""
    values = []
    step = work_ms / 1000.0
    t0 = time.monotonic()
    for i, p in enumerate(range(start, end)):
        values.append(float(fn(p)))
        if step:
            delay = t0 + (i + 1) * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return Partial.of(values)
