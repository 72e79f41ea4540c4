"""Tasks: `module:function` taking one point and returning a float or a dict of scalars.

How a point is passed is decided once, from the function's signature (`Task`): parameters
named after the space's axes (or `**kwargs`) get the values by name (`def run(alpha, beta)`,
and every built-in, `def f(p)`, over the range space); otherwise a range space passes the
index itself (the original `f(int) -> float` form) and any other space the point as one dict.

Built-ins (usable by short name): `reference` (the seed formula), `noop`, `cpu` (a CPU-bound
example), and three fault hooks for chaos tests, inert unless named as the task:
`poison` (raises for the parameter in TTG_POISON_PARAM), `crash` (kills its own process there)
and `slow` (sleeps TTG_SLOW_S there). The `work_ms` of a job is simulated work added by the
runner after each parameter, on a deadline so it does not drift.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import time
from collections.abc import Callable
from typing import Any

from ttg.errors import ConfigError
from ttg.sweep import reference_value

TaskFn = Callable[..., Any]


def reference(p: int) -> float:
    return reference_value(p)


def noop(p: int) -> float:
    return 0.0


def noop2(p: int) -> dict:
    """No work, two float outputs: what the results path costs per row."""
    return {"x": 0.0, "y": 1.0}


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
    "noop2": noop2,
    "cpu": cpu,
    "poison": poison,
    "crash": crash,
    "slow": slow,
}



def resolve(path: str) -> TaskFn:
    """Resolve a built-in name or `module:function`; a clear ConfigError otherwise."""
    if path in BUILTINS:
        return BUILTINS[path]
    check_task_name(path)
    module_name, _, func_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the import raised is the reason
        raise ConfigError(f"task {path!r}: cannot import module {module_name!r}: "
                          f"{exc.__class__.__name__}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        where = getattr(module, "__file__", None) or "built into Python"
        raise ConfigError(f"task {path!r}: {module_name} ({where}) has no function "
                          f"{func_name!r}; if that is not your module, yours is shadowed by it: "
                          "rename yours")
    return fn


def check_task_name(path: str) -> str:
    """The syntax of a task name (built-in, or `package.module:function`), without importing."""
    if path in BUILTINS:
        return path
    module_name, sep, func_name = (path or "").partition(":")
    if (not sep or not func_name.isidentifier()
            or not all(part.isidentifier() for part in module_name.split("."))):
        raise ConfigError(
            f"unknown task {path!r}: use one of {', '.join(BUILTINS)} or 'module:function'"
        )
    return path


def is_builtin(path: str) -> bool:
    return path in BUILTINS


class Task:
    """A resolved task and how it takes a point of a given space (see the module doc)."""

    def __init__(self, path: str, fn: TaskFn, names: tuple[str, ...], kind: str) -> None:
        self.path = path
        self.fn = fn
        self.names = names
        self.kind = kind
        self.style = _call_style(fn, names, kind)

    def call(self, index: int, point: dict | None) -> Any:
        if self.style == "index":
            return self.fn(index)
        if point is None:
            point = {"p": index}
        if self.style == "kwargs":
            return self.fn(**point)
        return self.fn(point)


def _call_style(fn: TaskFn, names: tuple[str, ...], kind: str) -> str:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature (math.sqrt)
        return "index" if kind == "range" else "dict"
    params = list(params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if kind == "range" and params and params[0].name == "p" and params[0].kind in (
            params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return "index"  # f(p): the fastest call, and the same values
    if any(p.kind == p.VAR_KEYWORD for p in params) or (names and set(names) <= named):
        return "kwargs"
    return "index" if kind == "range" else "dict"


def load_task(path: str, names: tuple[str, ...] = ("p",), kind: str = "range") -> Task:
    """The task `path` for points with these axis names, from a space of this kind."""
    return Task(path, resolve(path), names, kind)
