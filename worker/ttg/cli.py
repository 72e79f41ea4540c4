"""`ttg`: submit, work, sweep, status, wait, aggregate, reconcile, dlq, report, check, validate.

The broker, run and job options (and those whose help names one) have a `TTG_*` environment
variable; flags win over the environment; a bad value is one line, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ttg import log as tlog
from ttg.backends import BACKENDS, get_backend
from ttg.backends.base import Backend, BrokerConfig
from ttg.chaos import FAULTS, Platform
from ttg.errors import ConfigError, TTGError
from ttg.sweep import JobSpec, check_run_id, new_run_id

log = logging.getLogger("ttg")

DEFAULT_URLS = {
    "redis": "redis://127.0.0.1:16379/0",
    "static": "redis://127.0.0.1:16379/0",
    "rabbitmq": "amqp://ttg@127.0.0.1:5673/ttg",
}


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(value: str) -> int:
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


def _env_typed(name: str, default: str | None, conv: type[int] | type[float],
               what: str) -> Any:
    value = env(name, default)
    if value is None:
        return None
    try:
        return conv(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not {what}: unset it or give {what}") from None


def env_int(name: str, default: str | None) -> int | None:
    """A TTG_* variable holding an integer; a bad value is a ConfigError naming it."""
    return _env_typed(name, default, int, "a whole number")


def env_float(name: str, default: str | None) -> float | None:
    """A TTG_* variable holding a number; a bad value is a ConfigError naming it."""
    return _env_typed(name, default, float, "a number")


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("broker and run (each also a TTG_* variable)")
    g.add_argument("--backend", default=env("TTG_BACKEND", "redis"),
                   help=f"one of {', '.join(BACKENDS)} (TTG_BACKEND, default redis)")
    g.add_argument("--broker-url", default=env("TTG_BROKER_URL"),
                   help="redis://[:password@]host:port/db or amqp://user[:password]@host:port/"
                        "vhost (TTG_BROKER_URL)")
    g.add_argument("--broker-password-file", default=env("TTG_BROKER_PASSWORD_FILE"),
                   help="file holding the broker password (TTG_BROKER_PASSWORD_FILE)")
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
    parser = argparse.ArgumentParser(prog="ttg", description=__doc__,
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


def parse_inline_space(text: str) -> object:
    """--space '{"type": "grid", ...}': the definition itself (how a cluster Job gets it)."""
    from ttg.spaces import parse_space

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--space: inline JSON does not parse: {exc}") from None
    return parse_space(data)


def job_spec(args: argparse.Namespace, run_id: str) -> JobSpec:
    from ttg.spaces import load_space_file
    from ttg.tasks import is_builtin

    params, space = args.params, ""
    if args.space:
        text = str(args.space).strip()
        loaded = parse_inline_space(text) if text.startswith("{") else load_space_file(args.space)
        params, space = loaded.size, ("" if loaded.kind == "range" else loaded.definition)
    work_ms = args.work_ms
    if work_ms is None:
        work_ms = 1.0 if is_builtin(args.task) else 0.0
    return JobSpec(
        run_id=run_id,
        params=params,
        chunk_size=args.chunk_size,
        task=args.task,
        work_ms=work_ms,
        workers=args.workers,
        max_attempts=args.max_attempts,
        space=space,
        objective=args.objective,
    ).validate()


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    if args.backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {args.backend!r}: valid backends are {', '.join(BACKENDS)}"
        )
    password = None
    if args.broker_password_file:
        try:
            password = Path(args.broker_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the broker password file: {exc}") from exc
    # 0 = auto: both queue backends size their batches to about 20 ms of work
    prefetch = args.prefetch
    if prefetch < 0 or args.min_idle_ms <= 0:
        raise ConfigError("--prefetch must be >= 0 and --min-idle-ms > 0")
    return BrokerConfig(
        url=args.broker_url or DEFAULT_URLS[args.backend],
        password=password,
        prefetch=prefetch,
        min_idle_ms=args.min_idle_ms,
        connect_timeout_s=args.connect_timeout,
        retry_budget_s=max(args.connect_timeout, 60.0),
    )


def need_run_id(args: argparse.Namespace) -> str:
    if not args.run_id:
        raise ConfigError("no run id: pass --run-id or set TTG_RUN_ID")
    return check_run_id(args.run_id)


def connect(args: argparse.Namespace) -> Backend:
    backend = get_backend(args.backend, broker_config(args))
    backend.check()
    return backend


def cmd_work(args: argparse.Namespace) -> int:
    from ttg import metrics
    from ttg.worker import Worker

    run_id = need_run_id(args)
    worker_id = args.worker_id or (
        f"worker-{args.worker_index}" if args.worker_index is not None
        else f"{socket.gethostname()}-{os.getpid()}"
    )
    index = args.worker_index
    worker = Worker(get_backend(args.backend, broker_config(args)), run_id, worker_id, index,
                    exit_when_done=args.exit_when_done, allow_tasks=args.task)
    worker.install_signals()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_addr, run_id=run_id, worker=worker_id,
                      backend=args.backend)
    worker.backend.check()
    return worker.run()


def cmd_chaos(args: argparse.Namespace) -> int:
    from ttg.chaos import Chaos, experiment_spec, worker_env_for
    from ttg.controller import run_sweep

    run_id = check_run_id(args.run_id) if args.run_id else new_run_id()
    spec, expect_failed = experiment_spec(job_spec(args, run_id), args.fault)
    platform = chaos_platform(args, run_id)
    config = broker_config(args)
    chaos = Chaos(args.fault, spec, platform, lambda: get_backend(args.backend, config),
                  at=args.at, interval_s=args.interval,
                  worker_env=worker_env_for(args.fault, spec.chunk_size, args.min_idle_ms))
    backend = connect(args)
    summary = run_sweep(backend, spec, args.platform, args.runs_dir, timeout_s=args.timeout,
                        stall_s=args.stall_timeout, during=chaos.run, expect_failed=expect_failed)
    return finish_run(args, summary)


def chaos_platform(args: argparse.Namespace, run_id: str) -> Platform:
    """The platform a fault is injected on: supervisord's processes (local) or the run's pods
    through the Kubernetes API (kind, aks: `ttg chaos` runs in-cluster as a Job)."""
    from ttg.chaos import KubePlatform, LocalPlatform

    if args.platform == "local":
        if not args.supervisor_config:
            raise ConfigError(
                "the local platform needs --supervisor-config (TTG_SUPERVISOR_CONFIG)")
        broker = args.broker_program or (
            "ttg-rabbitmq" if args.backend == "rabbitmq" else "ttg-redis")
        return LocalPlatform(args.supervisorctl, args.supervisor_config, args.fleet_program,
                             broker)
    if args.platform in ("kind", "aks"):
        from ttg.kube import KubeApi

        return KubePlatform(KubeApi.in_cluster(args.namespace), run_id)
    raise ConfigError(f"unknown platform {args.platform!r}: valid platforms are local, kind, aks")


def finish_run(args: argparse.Namespace, summary: dict) -> int:
    """The end of `sweep` and `chaos`: the report, the human summary, the JSON, the exit code."""
    from ttg.controller import human

    if args.report:
        from ttg.report import try_report

        try_report(args.runs_dir / summary["run_id"])
    if not args.json:
        print(human(summary))
    print(json.dumps(summary), flush=True)
    hold = getattr(args, "hold_for_fetch", 0)
    if hold:
        hold_for_fetch(args.runs_dir / summary["run_id"], hold)
    return 0 if summary["ok"] else 1


def hold_for_fetch(run_dir: Path, timeout_s: float) -> bool:
    """In a cluster Job: mark the run directory complete, then wait (at most `timeout_s`)
    until whoever copies it out (k8s_app) says it has it, so the pod, and its emptyDir with
    the results, outlives the copy. True if it was fetched."""
    (run_dir / ".complete").write_text(f"{time.time():.3f}\n")
    log.info("run directory complete: waiting up to %.0f s for it to be fetched", timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / ".fetched").exists():
            return True
        time.sleep(1.0)
    log.warning("nobody fetched %s within %.0f s: exiting (the results are lost with the pod)",
                run_dir, timeout_s)
    return False


def cmd_chaos_table(args: argparse.Namespace) -> int:
    from ttg.chaos import table

    paths = args.summaries or sorted(args.runs_dir.glob("*/summary.json"))
    summaries = []
    for path in paths:
        if path.parent.is_symlink():
            continue
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    print(table(summaries))
    return 0 if all(s["ok"] for s in summaries if s.get("faults")) else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from ttg.controller import load_faults, parse_faults, run_sweep

    run_id = check_run_id(args.run_id) if args.run_id else new_run_id()
    spec = job_spec(args, run_id)
    faults = load_faults(args.faults) if args.faults else None
    if args.faults_json:
        faults = [*(faults or []), *parse_faults(args.faults_json, "--faults-json")]
    backend = connect(args)
    if args.metrics_port:
        from ttg import metrics

        metrics.serve_controller(args.metrics_port, args.metrics_addr)
    summary = run_sweep(backend, spec, args.platform, args.runs_dir, timeout_s=args.timeout,
                        stall_s=args.stall_timeout, faults=faults)
    return finish_run(args, summary)


def cmd_status(args: argparse.Namespace) -> int:
    from ttg.progress import Reporter

    run_id = need_run_id(args)
    backend = connect(args)
    spec = backend.load_spec(run_id)
    if spec is None:
        raise ConfigError(f"run {run_id} has not been submitted")
    reporter = Reporter(spec.params, spec.chunk_size, stream=None if args.watch else sys.stdout,
                        live=None if args.watch else False)
    while True:
        p = backend.progress(run_id)
        if args.json and not args.watch:
            print(json.dumps({"run_id": run_id, "finished": p.finished, **p.to_dict()}))
            return 0
        reporter.update(p, force=True)
        if not args.watch or p.finished:
            reporter.close()
            return 0
        time.sleep(0.5)


def cmd_wait(args: argparse.Namespace) -> int:
    from ttg.controller import wait
    from ttg.progress import Reporter

    run_id = need_run_id(args)
    backend = connect(args)
    spec = backend.load_spec(run_id)
    if spec is None:
        raise ConfigError(f"run {run_id} has not been submitted")
    if args.metrics_port:
        from ttg import metrics

        metrics.serve_controller(args.metrics_port, args.metrics_addr)
    reporter = Reporter(spec.params, spec.chunk_size, run_id=run_id)
    p = wait(backend, run_id, reporter, timeout_s=args.timeout)
    reporter.close(p)
    return 0 if p.finished and p.dead == 0 else 1


def cmd_aggregate(args: argparse.Namespace) -> int:
    from ttg.partial import Aggregator

    run_id = need_run_id(args)
    backend = connect(args)
    agg = Aggregator()
    out = args.export.open("w", newline="") if args.export else None
    writer = None
    try:
        for chunk, partial, meta in backend.results(run_id):
            agg.add(chunk, partial)
            if out is None:
                continue
            row = {"chunk": chunk, **partial.to_dict(),
                   **{k: v for k, v in meta.items() if k not in partial.to_dict()}}
            if args.format == "jsonl":
                out.write(json.dumps(row) + "\n")
            else:
                if writer is None:
                    writer = csv.DictWriter(out, fieldnames=list(row), extrasaction="ignore")
                    writer.writeheader()
                writer.writerow(row)
    finally:
        if out:
            out.close()
    result = {"run_id": run_id, "chunks": len(agg.seen), **agg.result()}
    print(json.dumps(result) if args.json else
          f"{result['chunks']} chunks: count {result['count']} sum {result['sum']} "
          f"min {result['min']} max {result['max']}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    run_id = need_run_id(args)
    backend = connect(args)
    if args.dlq_cmd == "replay":
        replayed = backend.replay_dead(run_id, args.chunk)
        print(f"replayed {len(replayed)} chunk(s): {replayed}")
        return 0
    dead = backend.dead_letters(run_id)
    if args.json:
        print(json.dumps([d.to_dict() for d in dead]))
    else:
        for d in dead:
            print(f"chunk {d.chunk}: {d.reason} (attempts {d.attempts}, worker {d.worker})")
        print(f"{len(dead)} dead-lettered chunk(s)")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from ttg.image import stage

    tag = stage(args.worker_dir.resolve(), args.code.resolve() if args.code else None,
                args.context, args.version)
    print(json.dumps({"tag": tag, "context": str(args.context.resolve())}))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from ttg.results import export

    run_dir = Path(args.run) if Path(args.run).is_dir() else args.runs_dir / args.run
    out = export(run_dir.resolve(), args.format, args.output, args.failures)
    print(out)
    return 0


def use_code(code: Path | None) -> None:
    """Put the user's code directory first on the import path (and on the workers' path:
    PYTHONPATH is inherited by every process this one starts)."""
    if code is None:
        return
    if not code.is_dir():
        raise ConfigError(f"--code {code}: not a directory")
    path = str(code.resolve())
    sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [path, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ConfigError as exc:  # a TTG_* variable with a bad value: one line, no traceback
        print(f"ttg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    tlog.setup(getattr(args, "log_format", "text"), getattr(args, "log_level", "INFO"))
    try:
        if args.cmd != "image":
            use_code(getattr(args, "code", None))
        if args.cmd == "validate":
            from ttg.tasks import load_task

            spec = job_spec(args, "validate")
            space = spec.get_space()
            load_task(spec.task, space.names, space.kind)  # imports it, here
            print(f"job spec ok: task {spec.task}, {space.kind} space of {space.size:,} "
                  f"points, {spec.chunks_total:,} chunks")
            return 0
        if args.cmd == "check":
            connect(args).close()
            print(f"{args.backend} broker reachable")
            return 0
        if args.cmd == "submit":
            run_id = check_run_id(args.run_id) if args.run_id else new_run_id()
            spec = job_spec(args, run_id)
            created = connect(args).submit(spec)
            print(f"{'submitted' if created else 'already submitted'}: run {run_id}, "
                  f"{spec.chunks_total} chunks")
            return 0
        if args.cmd == "purge":
            run_id = need_run_id(args)
            connect(args).purge(run_id)
            print(f"purged run {run_id} from the {args.backend} broker")
            return 0
        if args.cmd == "reconcile":
            missing = connect(args).reconcile(need_run_id(args))
            print(f"re-enqueued {len(missing)} chunk(s): {missing[:50]}")
            return 0
        if args.cmd == "report":
            from ttg.report import report_cli

            return report_cli(args.run_dir, args.runs_dir, args.objective, args.goal)
        if args.cmd == "chaos-plan":
            from ttg.chaos import faults_for, worker_env_for

            plan = [{"fault": f, "env": worker_env_for(f, args.chunk_size, args.min_idle_ms)}
                    for f in faults_for(args.backend, args.fault)]
            print(json.dumps(plan))
            return 0
        if args.cmd == "bench":
            from ttg import bench

            names = [b.strip() for b in args.backends.split(",") if b.strip()]
            unknown = [b for b in names if b not in BACKENDS]
            if unknown:
                raise ConfigError(f"unknown backend(s) {unknown}: valid are {', '.join(BACKENDS)}")
            targets = [bench.Target(b, args.rabbitmq_url if b == "rabbitmq" else args.redis_url,
                                    args.rabbitmq_password_file if b == "rabbitmq"
                                    else args.redis_password_file) for b in names]
            return bench.main(targets, args.runs_dir, quick=args.quick)
        if args.cmd == "serve":
            from ttg import dashboard

            live = dashboard.broker_reader(lambda: connect(args)) if args.live else None
            try:
                dashboard.serve(args.runs_dir, args.host, args.port, live)
            except OSError as exc:
                raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc}") from None
            return 0
        handler = {"chaos": cmd_chaos, "chaos-table": cmd_chaos_table, "work": cmd_work,
                   "sweep": cmd_sweep, "status": cmd_status, "wait": cmd_wait,
                   "aggregate": cmd_aggregate, "dlq": cmd_dlq, "results": cmd_results,
                   "image": cmd_image}[args.cmd]
        return handler(args)
    except TTGError as exc:
        print(f"ttg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
