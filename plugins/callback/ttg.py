"""TTG's stdout callback: what a person running `make` reads.

One line per stage (preflight, platform, backend, fleet, sweep, ...) with its time, the sweep's
live progress (a `rich` bar on a terminal, a plain line every few seconds in a log), what the
playbooks say on purpose (their `debug` messages: the run's summary, where its files are),
and, when something fails, the reason as the last lines before the exit. Skipped tasks, empty
plays and ok tasks are not listed. `make VERBOSE=1` uses Ansible's default callback instead.

The progress comes from the controller (`ttg sweep`/`ttg chaos`, run by roles/sweep through
the command module, whose output Ansible only returns at the end): this callback sets
`TTG_PROGRESS_FILE` before any task runs, the controller appends JSON progress records to it
(worker/ttg/progress.py), and a thread here draws them while the task runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from ansible.plugins.callback.default import CallbackModule as DefaultCallback

DOCUMENTATION = """
name: ttg
type: stdout
short_description: one line per stage, the sweep's progress, the summary once, errors last
description:
  - A quiet stdout callback for TTG's make targets; see the module docstring.
extends_documentation_fragment:
  - default_callback
  - result_format_callback
"""

# Stage of a task: by its role (and, for k8s_app, its task file); a task outside any role
# belongs to the play's stage so far.
ROLE_STAGE = {
    "preflight": "preflight",
    "supervisor": "platform",
    "kind_cluster": "platform",
    "aks_cluster": "platform",
    "redis": "backend",
    "rabbitmq": "backend",
    "k8s_app": "backend",
    "fleet": "fleet",
    "sweep": "sweep",
    "chaos": "chaos",
}
K8S_FILE_STAGE = {"fleet.yml": "fleet", "sweep.yml": "sweep"}
# Playbooks that are a report of their own: no stage lines around it.
NO_STAGES = {"status.yml", "cleanup.yml"}
PLAIN_INTERVAL_S = float(os.environ.get("TTG_PROGRESS_INTERVAL", "5") or 5)


def _stage_of(task: Any) -> str | None:
    role = task._role.get_name() if getattr(task, "_role", None) else None
    if role is None:
        return None
    if role == "k8s_app":
        path = task.get_path() or ""
        for name, stage in K8S_FILE_STAGE.items():
            if f"/tasks/{name}:" in path:
                return stage
    return ROLE_STAGE.get(role, role)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


class ProgressTail:
    """Reads the controller's progress records from a file and shows them until stopped."""

    def __init__(self, path: str, out: Any, tty: bool) -> None:
        self.path = path
        self.out = out
        self.tty = tty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pos = 0
        self.lines = 0  # lines (plain) or bars (rich) shown so far

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ttg-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def _records(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind("\n") + 1  # only whole lines; the rest is read next time
        self._pos += len(data[:cut].encode())
        out = []
        for line in data[:cut].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _run(self) -> None:
        if self.tty:
            try:
                self._run_rich()
                return
            except ImportError:
                pass
        self._run_plain()

    def _plain(self, rec: dict) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(rec.get("ts", time.time())))
        faults = f" | faults {rec['faults']}" if rec.get("faults") else ""
        self.out.write(f"  {stamp} progress {rec.get('line', '')}{faults}\n")
        self.out.flush()
        self.lines += 1

    def _run_plain(self) -> None:
        last_shown = 0.0
        shown: tuple | None = None
        pending: dict | None = None
        while True:
            stopping = self._stop.wait(0.25)
            for rec in self._records():
                key = tuple(rec.get(k) for k in ("run_id", "done", "dead", "in_flight", "finished"))
                if key == shown:  # nothing new (e.g. the final record, twice)
                    continue
                pending = rec
                now = time.monotonic()
                if rec.get("finished") or now - last_shown >= PLAIN_INTERVAL_S:
                    self._plain(rec)
                    last_shown, shown, pending = now, key, None
            if stopping:
                if pending is not None:
                    self._plain(pending)
                return

    def _run_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        console = Console(file=self.out)
        bars = Progress(TextColumn("  sweep"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[info]}"), console=console, transient=False)
        tasks: dict[str, int] = {}
        try:
            while True:
                stopping = self._stop.wait(0.2)
                for rec in self._records():
                    run = str(rec.get("run_id"))
                    info = (f"{rec.get('done', 0)}/{rec.get('total', 0)} chunks | "
                            f"{rec.get('rate', 0):,.0f} params/s | ETA {_fmt_eta(rec.get('eta_s'))}"
                            f" | workers {rec.get('workers', 0)} | in flight "
                            f"{rec.get('in_flight', 0)} | dead {rec.get('dead', 0)} | faults "
                            f"{rec.get('faults', 0)}")
                    if not tasks:
                        bars.start()
                    if run not in tasks:
                        tasks[run] = bars.add_task(run, total=rec.get("total") or 1, info=info)
                    bars.update(tasks[run], completed=rec.get("done", 0) + rec.get("dead", 0),
                                info=info)
                    self.lines = len(tasks)
                if stopping:
                    return
        finally:
            if tasks:
                bars.stop()


class CallbackModule(DefaultCallback):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "ttg"

    def __init__(self) -> None:
        super().__init__()
        fd, self._progress_path = tempfile.mkstemp(prefix="ttg-progress-", suffix=".jsonl")
        os.close(fd)
        os.environ["TTG_PROGRESS_FILE"] = self._progress_path  # inherited by the controller
        self._tail = ProgressTail(self._progress_path, sys.stdout, sys.stdout.isatty())
        self._stage: str | None = None
        self._stage_t0 = 0.0
        self._stage_changed = 0
        self._task_t0 = time.monotonic()
        self._failures: list[tuple[str, str]] = []
        self._done: set[str] = set()  # stages closed after their progress: not reopened

    # ---- stages ----------------------------------------------------------------------
    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._stages_shown = os.path.basename(playbook._file_name) not in NO_STAGES

    def _close_stage(self) -> None:
        if self._stage is not None and getattr(self, "_stages_shown", True):
            secs = time.monotonic() - self._stage_t0
            changed = f"  ({self._stage_changed} changed)" if self._stage_changed else ""
            self._display.display(f"{self._stage:<10} {secs:6.1f} s{changed}")
        self._stage = None

    def _enter(self, task: Any) -> None:
        stage = _stage_of(task) or self._stage
        if stage is None or stage in self._done:
            return
        if stage != self._stage:
            self._close_stage()
            self._stage, self._stage_t0, self._stage_changed = stage, self._task_t0, 0

    # ---- plays and tasks: nothing printed --------------------------------------------
    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._close_stage()  # a play is a stage boundary

    def v2_playbook_on_task_start(self, task: Any, is_conditional: Any) -> None:
        self._task_t0 = time.monotonic()
        self._lines_at_task = self._tail.lines
        self._tail.start()  # cheap when nothing writes: shows the sweep task's progress

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._task_t0 = time.monotonic()

    def v2_playbook_on_cleanup_task_start(self, task: Any) -> None:
        self._task_t0 = time.monotonic()

    def v2_playbook_on_include(self, included_file: Any) -> None:
        pass

    def v2_playbook_on_no_hosts_matched(self) -> None:
        pass

    def v2_playbook_on_no_hosts_remaining(self) -> None:
        pass

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        pass

    def v2_runner_retry(self, result: Any) -> None:
        pass

    def v2_runner_on_skipped(self, result: Any) -> None:
        pass

    def v2_runner_item_on_skipped(self, result: Any) -> None:
        pass

    # ---- results ---------------------------------------------------------------------
    def _said(self, result: Any) -> None:
        """A debug task's message, as plain lines (what the playbook says to the user)."""
        if result._task.action not in ("debug", "ansible.builtin.debug"):
            return
        res = result._result
        msg = res.get("msg")
        if msg is None:
            msg = {k: v for k, v in res.items() if not k.startswith("_") and k not in
                   ("changed", "failed", "item", "ansible_loop_var")}
        lines = msg if isinstance(msg, list) else (
            msg.splitlines() if isinstance(msg, str) else [json.dumps(msg, indent=2)])
        for line in lines:
            self._display.display(str(line))

    def _ok(self, result: Any) -> None:
        shown = getattr(self, "_lines_at_task", self._tail.lines)
        self._tail.stop()
        self._enter(result._task)
        if result._result.get("changed"):
            self._stage_changed += 1
        if self._tail.lines > shown and self._stage is not None:
            # the task that showed progress (the sweep): its stage ends here, before the
            # summary and the paths that the next tasks print
            self._done.add(self._stage)
            self._close_stage()
        self._said(result)

    def v2_runner_on_ok(self, result: Any) -> None:
        if result._result.get("results") is None:
            self._ok(result)
        else:
            self._tail.stop()
            self._enter(result._task)

    def v2_runner_item_on_ok(self, result: Any) -> None:
        self._ok(result)

    def _reason(self, result: Any) -> str:
        res = result._result
        msg = res.get("msg") or ""
        if not isinstance(msg, str):
            msg = json.dumps(msg)
        if res.get("rc") not in (None, 0) or not msg or msg.startswith("non-zero return code"):
            tail = [ln for ln in (res.get("stderr_lines") or res.get("stdout_lines") or [])
                    if ln.strip()][-3:]
            cmd = res.get("cmd")
            cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
            code = f" (exit {res['rc']})" if "rc" in res else ""
            msg = "\n".join([*tail, f"{cmd or result._task.get_name()} failed{code}"])
        return msg.strip()

    def v2_runner_on_failed(self, result: Any, ignore_errors: Any=False) -> None:
        self._tail.stop()
        if ignore_errors:
            return
        self._enter(result._task)
        if result._result.get("results"):
            return
        self._failures.append((result._task.name or result._task.get_name(), self._reason(result)))

    def v2_runner_item_on_failed(self, result: Any) -> None:
        self._failures.append((result._task.name or result._task.get_name(), self._reason(result)))

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._tail.stop()
        self._failures.append((result._task.name or result._task.get_name(),
                               f"{result._host} unreachable: {result._result.get('msg', '')}"))

    # ---- the end: failures last ------------------------------------------------------
    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._tail.stop()
        stage = self._stage
        self._close_stage()
        try:
            os.unlink(self._progress_path)
        except OSError:
            pass
        if not self._failures:
            return
        self._display.display("")
        where = f" ({stage})" if stage else ""
        for task, reason in self._failures[-3:]:
            lines = [ln for ln in reason.splitlines() if ln.strip()] or ["failed"]
            self._display.display(f"failed{where} at: {task}", stderr=True)
            for line in lines[:-1]:
                self._display.display(f"  {line}", stderr=True)
            self._display.display(f"[ERROR] {lines[-1]}", stderr=True)
