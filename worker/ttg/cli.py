"""`ttg`: submit, work, sweep, status, wait, aggregate, reconcile, dlq, report, check, validate,
results, image, serve. The parser and its `TTG_*` variables are in `ttg.cli_parser`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from ttg import log as tlog
from ttg.backends import BACKENDS, get_backend
from ttg.backends.base import Backend, BrokerConfig
from ttg.backends.tls import check_ca_file
from ttg.chaos_platforms import Platform
from ttg.cli_parser import DEFAULT_URLS, build_parser
from ttg.errors import ConfigError, TTGError
from ttg.sweep import JobSpec, check_run_id, new_run_id

log = logging.getLogger("ttg")


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
    url = args.broker_url or DEFAULT_URLS[args.backend]
    check_ca_file(url, args.broker_ca_file)
    return BrokerConfig(
        url=url,
        password=password,
        ca_file=args.broker_ca_file or None,
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


def _exit_killed() -> None:
    """Die as a SIGKILL would leave it: no cleanup, exit code 137."""
    log.warning("exiting after the first write (--exit-after-first-write)")
    os._exit(137)


def cmd_work(args: argparse.Namespace) -> int:
    from ttg import metrics
    from ttg.worker import Worker

    run_id = need_run_id(args)
    worker_id = args.worker_id or (
        f"worker-{args.worker_index}" if args.worker_index is not None
        else f"{socket.gethostname()}-{os.getpid()}"
    )
    index = args.worker_index
    backend = get_backend(args.backend, broker_config(args))
    if args.exit_after_first_write:  # the armed worker of `make chaos`'s kill-after-write
        backend.after_write = _exit_killed
    worker = Worker(backend, run_id, worker_id, index,
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
    through the Kubernetes API (kind, aks, k8s: `ttg chaos` runs in-cluster as a Job)."""
    from ttg.chaos_platforms import KubePlatform, LocalPlatform

    if args.platform == "local":
        if not args.supervisor_config:
            raise ConfigError(
                "the local platform needs --supervisor-config (TTG_SUPERVISOR_CONFIG)")
        broker = args.broker_program or (
            "ttg-rabbitmq" if args.backend == "rabbitmq" else "ttg-redis")
        return LocalPlatform(args.supervisorctl, args.supervisor_config, args.fleet_program,
                             broker)
    if args.platform in ("kind", "aks", "k8s"):
        from ttg.kube import KubeApi

        # the run's own broker: with both StatefulSets in one namespace (a switch of
        # backend keeps the other's data), broker-kill must not take the other one down
        broker = "rabbitmq" if args.backend == "rabbitmq" else "redis"
        return KubePlatform(KubeApi.in_cluster(args.namespace), run_id,
                            broker_selector=f"app.kubernetes.io/name={broker},"
                                            "app.kubernetes.io/component=broker,"
                                            "app.kubernetes.io/part-of=ttg")
    raise ConfigError(
        f"unknown platform {args.platform!r}: valid platforms are local, kind, aks, k8s")


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
    spec = backend.submitted_spec(run_id)
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
    spec = backend.submitted_spec(run_id)
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
    from ttg.image import fill_wheelhouse, stage

    tag = stage(args.worker_dir.resolve(), args.code.resolve() if args.code else None,
                args.context, args.version)
    if args.wheelhouse:
        fill_wheelhouse(args.context)
    print(json.dumps({"tag": tag, "context": str(args.context.resolve())}))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """The human summary of a finished run, from its summary.json (a run fetched from a
    cluster, or one finished earlier); exit 0 only if the run is ok."""
    from ttg.controller import human

    run_dir = Path(args.run) if Path(args.run).is_dir() else args.runs_dir / args.run
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no run summary at {path}: {exc}") from None
    print(human(summary))
    return 0 if summary.get("ok") else 1


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
                   "image": cmd_image, "show": cmd_show}[args.cmd]
        return handler(args)
    except TTGError as exc:
        print(f"ttg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
