"""`ttg`: submit, work, sweep, status, wait, aggregate, reconcile, dlq, report, check, validate,
results, image, serve.

The broker, run and job options (and those whose help names one) have a `TTG_*` environment
variable; flags win over the environment; a bad value is one line, exit 2.
"""
# This module is the command line's parser (shown above by `ttg --help`); the commands
# themselves are in ttg.cli.

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NoReturn

from ttg.backends import BACKENDS
from ttg.chaos import FAULTS
from ttg.errors import ConfigError

DEFAULT_URLS = {
    "redis": "redis://127.0.0.1:16379/0",
    "static": "redis://127.0.0.1:16379/0",
    "rabbitmq": "amqp://ttg@127.0.0.1:5673/ttg",
}


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(value: str) -> int:
    if not (value.strip().lstrip("-").isascii() and value.strip().lstrip("-").isdigit()):
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None


def _float(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(out):
        raise argparse.ArgumentTypeError(f"not a finite number: {value!r}")
    return out


def _env_typed(name: str, default: str | None, conv: Any, what: str) -> Any:
    """A TTG_* number, converted like its flag (`_int`, `_float`: ASCII digits, finite); a bad
    one is a ConfigError naming the variable (one line, exit 2), even for `ttg --help`."""
    value = env(name, default)
    if value is None:
        return None
    try:
        return conv(value)
    except argparse.ArgumentTypeError:
        raise ConfigError(f"{name}={value!r} is not {what}: unset it or give {what}") from None


def env_int(name: str, default: str | None) -> int | None:
    """A TTG_* variable holding an integer; a bad value is a ConfigError naming it."""
    return _env_typed(name, default, _int, "a whole number")


def env_float(name: str, default: str | None) -> float | None:
    """A TTG_* variable holding a number; a bad value is a ConfigError naming it."""
    return _env_typed(name, default, _float, "a number")


class _Parser(argparse.ArgumentParser):
    """argparse, with its error one line even when a bad argument holds a newline."""

    def error(self, message: str) -> NoReturn:
        super().error(message.replace("\n", "\\n"))


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("broker and run (each also a TTG_* variable)")
    g.add_argument("--backend", default=env("TTG_BACKEND", "redis"),
                   help=f"one of {', '.join(BACKENDS)} (TTG_BACKEND, default redis)")
    g.add_argument("--broker-url", default=env("TTG_BROKER_URL"),
                   help="redis[s]://[user[:password]@]host:port/db or amqp[s]://user[:password]@"
                        "host:port/vhost; rediss/amqps: TLS (TTG_BROKER_URL)")
    g.add_argument("--broker-password-file", default=env("TTG_BROKER_PASSWORD_FILE"),
                   help="file holding the broker password (TTG_BROKER_PASSWORD_FILE)")
    g.add_argument("--broker-ca-file", default=env("TTG_BROKER_CA_FILE"),
                   help="CA certificate that signed the broker's, for rediss:// and amqps:// "
                        "URLs (TTG_BROKER_CA_FILE; default: the system's trust store)")
    g.add_argument("--run-id", default=env("TTG_RUN_ID"), help="run id (TTG_RUN_ID)")
    g.add_argument("--log-format", choices=["text", "json"],
                   default=env("TTG_LOG_FORMAT", "text"), help="TTG_LOG_FORMAT")
    g.add_argument("--log-level", default=env("TTG_LOG_LEVEL", "INFO"), help="TTG_LOG_LEVEL")
    g.add_argument("--connect-timeout", type=_float,
                   default=env_float("TTG_CONNECT_TIMEOUT", "10"),
                   help="seconds of retries before 'broker unreachable' (TTG_CONNECT_TIMEOUT)")
    g.add_argument("--min-idle-ms", type=_int, default=env_int("TTG_MIN_IDLE_MS", "3000"),
                   help="a lease idle this long is reclaimed (TTG_MIN_IDLE_MS, default 3000)")
    g.add_argument("--code", type=Path, default=env("TTG_CODE"),
                   help="directory of your task's code, put first on the import path "
                        "(TTG_CODE)")
    g.add_argument("--prefetch", type=_int, default=env_int("TTG_PREFETCH", "0"),
                   help="chunks taken ahead per worker (TTG_PREFETCH; 0 = backend default)")
    return p


def job_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("job (each also a TTG_* variable)")
    g.add_argument("--params", type=_int, default=env_int("TTG_PARAMS", "10000"))
    g.add_argument("--chunk-size", type=_int, default=env_int("TTG_CHUNK_SIZE", "100"))
    g.add_argument("--task", default=env("TTG_TASK", "reference"),
                   help="built-in name or module:function (TTG_TASK)")
    g.add_argument("--work-ms", type=_float, default=env_float("TTG_WORK_MS", None),
                   help="simulated work per point (TTG_WORK_MS; default 1 for the built-in "
                        "tasks, 0 for your own)")
    g.add_argument("--space", type=Path, default=env("TTG_SPACE"),
                   help="parameter space file, YAML or JSON: range, grid, file or random "
                        "(TTG_SPACE; default: the range 0..params-1)")
    g.add_argument("--objective", default=env("TTG_OBJECTIVE", ""),
                   help="the numeric output summarized in the run's result (TTG_OBJECTIVE; "
                        "default: value, or the first numeric output)")
    g.add_argument("--workers", type=_int, default=env_int("TTG_WORKERS", "3"),
                   help="fleet size: the static split and the utilization (TTG_WORKERS)")
    g.add_argument("--max-attempts", type=_int, default=env_int("TTG_MAX_ATTEMPTS", "5"),
                   help="executions before a chunk is dead-lettered (TTG_MAX_ATTEMPTS)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common, job = common_parser(), job_parser()
    parser = _Parser(prog="ttg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("validate", parents=[common, job],
                   help="check a job spec offline: the space, and that the task imports here")
    sub.add_parser("check", parents=[common], help="connect and authenticate to the broker")
    sub.add_parser("submit", parents=[common, job], help="submit a job (idempotent per run id)")

    w = sub.add_parser("work", parents=[common], help="run a worker")
    w.add_argument("--task", default=env("TTG_TASK"),
                   help="the task(s) this worker may run, comma-separated (TTG_TASK; default: "
                        "the built-ins only): a job naming another is refused")
    w.add_argument("--worker-id", default=env("TTG_WORKER_ID"))
    w.add_argument("--worker-index", type=_int,
                   default=(env_int("TTG_WORKER_INDEX", None) if env("TTG_WORKER_INDEX")
                            else env_int("JOB_COMPLETION_INDEX", None)))
    w.add_argument("--exit-when-done", action="store_true",
                   default=env("TTG_EXIT_WHEN_DONE", "0") == "1")
    w.add_argument("--exit-after-first-write", action="store_true",
                   default=env("TTG_EXIT_AFTER_FIRST_WRITE", "0") == "1",
                   help="a fault for `make chaos` (kill-after-write): exit 137 once the first "
                        "result is durable, before its delivery is acked where the backend "
                        "acks apart from the write (TTG_EXIT_AFTER_FIRST_WRITE)")
    w.add_argument("--metrics-port", type=_int, default=env_int("TTG_METRICS_PORT", "0"),
                   help="serve Prometheus metrics on this port (TTG_METRICS_PORT; 0 = off)")
    w.add_argument("--metrics-addr", default=env("TTG_METRICS_ADDR", "127.0.0.1"),
                   help="address for the metrics port (TTG_METRICS_ADDR, default 127.0.0.1)")

    s = sub.add_parser("sweep", parents=[common, job],
                       help="submit, wait with progress, aggregate, write the run summary")
    s.add_argument("--platform", default=env("TTG_PLATFORM", "local"))
    s.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))
    s.add_argument("--timeout", type=_float, default=None, help="give up after S seconds")
    s.add_argument("--stall-timeout", type=_float, default=60.0,
                   help="reconcile after S seconds without progress")
    s.add_argument("--faults", type=Path, help="JSON list of fault records for the summary")
    s.add_argument("--faults-json", default=None,
                   help="the same list inline (an in-cluster Job has no file to read)")
    s.add_argument("--json", action="store_true", help="print only the JSON summary")
    s.add_argument("--hold-for-fetch", type=_float, default=0.0, metavar="S",
                   help="after the run, keep running up to S seconds until runs/<id>/.fetched "
                        "exists (a cluster Job whose run directory is copied out)")
    s.add_argument("--metrics-port", type=_int, default=0,
                   help="serve the run's progress gauges on this port (0 = off)")
    s.add_argument("--metrics-addr", default=env("TTG_METRICS_ADDR", "127.0.0.1"))
    s.add_argument("--report", action=argparse.BooleanOptionalAction, default=False,
                   help="write runs/<id>/report.md and its plots at the end")

    st = sub.add_parser("status", parents=[common], help="progress of a run")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="redraw until the run finishes")

    wt = sub.add_parser("wait", parents=[common], help="wait for a run, with progress")
    wt.add_argument("--timeout", type=_float, default=None)
    wt.add_argument("--watch", action="store_true", help="(default) show progress")
    wt.add_argument("--metrics-port", type=_int, default=0,
                    help="serve the run's progress gauges on this port (0 = off)")
    wt.add_argument("--metrics-addr", default=env("TTG_METRICS_ADDR", "127.0.0.1"))

    rp = sub.add_parser("report", help="write runs/<id>/report.md with plots from a run dir")
    rp.add_argument("--run-dir", type=Path, help="runs/<run_id> (default: the latest run)")
    rp.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")),
                    help="where runs live; the latest one is reported (TTG_RUNS_DIR)")
    rp.add_argument("--objective", default=None,
                    help="output to rank the best points by (default: the run's objective)")
    rp.add_argument("--goal", choices=["min", "max"], default=env("TTG_GOAL", "min"),
                    help="best = smallest (min, default) or largest (max) objective (TTG_GOAL)")

    c = sub.add_parser("chaos", parents=[common, job],
                       help="a sweep with one fault injected, measured and verified")
    c.add_argument("--fault", required=True, help="one of: " + ", ".join(FAULTS))
    c.add_argument("--at", type=_float, default=0.3, help="progress at which to strike")
    c.add_argument("--interval", type=_float, default=1.0, help="worker-kill-repeat period")
    c.add_argument("--platform", default=env("TTG_PLATFORM", "local"))
    c.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))
    c.add_argument("--timeout", type=_float, default=900.0)
    c.add_argument("--stall-timeout", type=_float, default=30.0)
    c.add_argument("--supervisor-config", default=env("TTG_SUPERVISOR_CONFIG"),
                   help="local platform: the project's supervisord.conf")
    c.add_argument("--supervisorctl", default=env("TTG_SUPERVISORCTL", "supervisorctl"))
    c.add_argument("--fleet-program", default="ttg-fleet")
    c.add_argument("--broker-program", default=None, help="default: ttg-<backend's broker>")
    c.add_argument("--namespace", default=env("TTG_NAMESPACE"),
                   help="kind/aks: the project's namespace (default: the pod's own)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--report", action=argparse.BooleanOptionalAction, default=False,
                   help="write runs/<id>/report.md and its plots at the end")

    bn = sub.add_parser("bench", help="measure the backends against the performance targets")
    bn.add_argument("--backends", default="redis,rabbitmq,static")
    bn.add_argument("--redis-url", default=env("TTG_REDIS_URL", DEFAULT_URLS["redis"]))
    bn.add_argument("--redis-password-file", default=env("TTG_REDIS_PASSWORD_FILE"))
    bn.add_argument("--rabbitmq-url", default=env("TTG_RABBITMQ_URL", DEFAULT_URLS["rabbitmq"]))
    bn.add_argument("--rabbitmq-password-file", default=env("TTG_RABBITMQ_PASSWORD_FILE"))
    bn.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))
    bn.add_argument("--quick", action="store_true", help="a tenth of the sizes (a smoke run)")
    bn.add_argument("--log-level", default="WARNING")

    ce = sub.add_parser("chaos-plan", parents=[common, job],
                        help="print (JSON) the faults to run and the worker env each needs")
    ce.add_argument("--fault", default="all", help="comma-separated, or all that apply")

    ct = sub.add_parser("chaos-table", help="fault x backend table of chaos runs")
    ct.add_argument("summaries", nargs="*", type=Path, help="summary.json files")
    ct.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))

    a = sub.add_parser("aggregate", parents=[common], help="merge the results of a run")
    a.add_argument("--json", action="store_true")
    a.add_argument("--export", type=Path, help="write per-chunk partials to this file")
    a.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")

    sub.add_parser("purge", parents=[common],
                   help="delete a finished run's data from the broker (its summary stays)")

    sub.add_parser("reconcile", parents=[common],
                   help="re-enqueue chunks neither done, queued, in flight nor dead")

    im = sub.add_parser("image", help="stage the worker image's build context with your code "
                                      "and print its content-derived tag")
    im.add_argument("--worker-dir", type=Path, default=Path(__file__).resolve().parents[1])
    im.add_argument("--code", type=Path, default=env("TTG_CODE"))
    im.add_argument("--context", type=Path, required=True, help="directory to write it to")
    im.add_argument("--version", default="0.1.0")
    im.add_argument("--wheelhouse", action="store_true",
                    help="also download every wheel the build installs into the context, for a "
                         "base image without pip and a build without an index")

    sh = sub.add_parser("show", help="the human summary of a finished run (exit 1 if not ok)")
    sh.add_argument("run", help="run id or run directory ('latest' for the latest run)")
    sh.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))

    rs = sub.add_parser("results", help="export a finished run's per-point results")
    rs.add_argument("run", help="run id or run directory ('latest' for the latest run)")
    rs.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")))
    rs.add_argument("--format", choices=["parquet", "csv", "jsonl"], default="csv")
    rs.add_argument("-o", "--output", type=Path, help="default: runs/<id>/results.<format>")
    rs.add_argument("--failures", action="store_true", help="the failed points instead")

    sv = sub.add_parser("serve", parents=[common],
                        help="a live, read-only web view of the runs (127.0.0.1 by default)")
    sv.add_argument("--runs-dir", type=Path, default=Path(env("TTG_RUNS_DIR", "runs")),
                    help="where runs live (TTG_RUNS_DIR)")
    sv.add_argument("--host", default=env("TTG_SERVE_HOST", "127.0.0.1"),
                    help="address to bind (TTG_SERVE_HOST, default 127.0.0.1)")
    sv.add_argument("--port", type=_int, default=env_int("TTG_SERVE_PORT", "8765"),
                    help="port (TTG_SERVE_PORT, default 8765; 0 = any free port)")
    sv.add_argument("--live", action="store_true",
                    help="also read a running run's progress and dead letters from the broker")

    d = sub.add_parser("dlq", parents=[common], help="dead-lettered chunks")
    dsub = d.add_subparsers(dest="dlq_cmd", required=True)
    dl = dsub.add_parser("list", parents=[common])
    dl.add_argument("--json", action="store_true")
    dr = dsub.add_parser("replay", parents=[common])
    dr.add_argument("--chunk", type=_int, action="append", help="only this chunk (repeatable)")
    return parser


