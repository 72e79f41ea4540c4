"""Seeing a run: live progress (pty and plain), Prometheus metrics scraped over HTTP during real
runs, the Grafana dashboard against the real registry, the run report, and the log context.

Everything runs against a real redis-server of our own and real `ttg` processes.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from brokers import RedisServer, free_port
from conftest import Env, spec, wait_for

from ttg import metrics
from ttg.backends.base import Progress
from ttg.progress import Reporter

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "ttg.json"


@pytest.fixture
def env(tmp_path: Path):
    broker = RedisServer(tmp_path / "redis")
    e = Env("redis", broker, tmp_path)
    try:
        yield e
    finally:
        e.stop_all()
        broker.stop()


# ---- helpers ---------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """GET /metrics on 127.0.0.1 and parse the text format into {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None


def names(samples: dict[str, float]) -> set[str]:
    return {s.split("{")[0] for s in samples}


def sweep_cmd(env: Env, *args: str) -> list[str]:
    return [sys.executable, "-m", "ttg.cli", "sweep", "--runs-dir", str(env.tmp / "runs"),
            "--stall-timeout", "20", *args]


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100 and data[-8:-4] == b"IEND"


# ---- metrics ---------------------------------------------------------------------------


def test_worker_metrics_move_during_a_real_run(env):
    port = free_port()
    b = env.make()
    b.submit(spec("wm", params=300, chunk=10, work_ms=5, task="poison", max_attempts=2,
                  workers=1))
    w = env.worker("wm", 0, TTG_METRICS_PORT=str(port), TTG_POISON_PARAM="15")
    during = wait_for(lambda: (s := try_scrape(port)) and s.get("ttg_chunks_done_total", 0) >= 2
                      and s, timeout=30, what="metrics with chunks done")
    assert not b.progress("wm").finished, "scraped too late to be 'during' the run"
    expected = {
        "ttg_chunks_done_total", "ttg_chunks_failed_total", "ttg_chunks_retried_total",
        "ttg_chunks_dead_lettered_total", "ttg_chunks_reclaimed_total",
        "ttg_chunk_duration_seconds_bucket", "ttg_chunk_duration_seconds_count",
        "ttg_chunk_duration_seconds_sum", "ttg_chunks_in_flight",
        "ttg_worker_last_heartbeat_timestamp_seconds", "ttg_worker_heartbeat_age_seconds",
        "ttg_worker_info",
    }
    assert expected <= names(during), expected - names(during)
    assert during['ttg_worker_info{backend="redis",run_id="wm",worker="worker-0"}'] == 1
    assert during["ttg_worker_heartbeat_age_seconds"] < 5
    wait_for(lambda: b.progress("wm").finished, timeout=60, what="run finished")
    after = wait_for(lambda: (s := scrape(port)) and s["ttg_chunks_done_total"] >= 30 and s,
                     timeout=10, what="final counters")
    # 30 chunks; chunk 1 poisoned: its first attempt failed and was retried, its second (the
    # last allowed) was stored with the poisoned point's error
    assert after["ttg_chunks_done_total"] == 30
    assert after['ttg_chunks_failed_total{outcome="retried"}'] == 1
    assert after['ttg_chunks_failed_total{outcome="dead"}'] == 0
    assert after["ttg_chunks_retried_total"] == 1
    assert after["ttg_chunks_dead_lettered_total"] == 0
    assert after["ttg_points_failed_total"] == 1
    assert after["ttg_chunk_duration_seconds_count"] == 30
    assert after["ttg_chunk_duration_seconds_sum"] >= 30 * 10 * 0.005 * 0.9
    assert after["ttg_chunks_in_flight"] == 0
    assert after["ttg_chunks_done_total"] > during["ttg_chunks_done_total"]
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=10) == 0
    b.close()


def test_controller_exports_run_progress(env):
    port = free_port()
    env.fleet("cm", 2)
    log = open(env.tmp / "sweep.err", "w")  # noqa: SIM115
    p = subprocess.Popen(sweep_cmd(env, "--params", "800", "--chunk-size", "10", "--work-ms",
                                   "5", "--workers", "2", "--metrics-port", str(port)),
                         env=env.env("cm"), stdout=subprocess.PIPE, stderr=log, text=True,
                         start_new_session=True)
    try:
        s = wait_for(lambda: (x := try_scrape(port)) and
                     x.get('ttg_run_chunks_done{run_id="cm"}', 0) >= 5 and x,
                     timeout=30, what="controller gauges with progress")
        assert s['ttg_run_chunks{run_id="cm"}'] == 80
        assert s['ttg_run_finished{run_id="cm"}'] == 0
        assert s['ttg_run_workers_alive{run_id="cm"}'] in (1, 2)  # the 2nd may start late
        assert s['ttg_run_params_per_second{run_id="cm"}'] > 0
        for name in ("ttg_run_chunks_dead", "ttg_run_chunks_in_flight", "ttg_run_chunks_queued",
                     "ttg_run_executions", "ttg_run_reclaimed", "ttg_run_retried"):
            assert f'{name}{{run_id="cm"}}' in s
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    assert p.returncode == 0, (env.tmp / "sweep.err").read_text()
    assert json.loads(out.strip().splitlines()[-1])["ok"]


def test_metrics_port_in_use_is_one_clear_error(env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = env.ttg("work", "--worker-index", "0", "--metrics-port", str(s.getsockname()[1]),
                    run_id="busy", timeout=30)
    assert r.returncode == 2
    assert "cannot serve metrics on 127.0.0.1" in r.stderr


def _promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/without/on/ignoring/group_x (...)), durations or
    Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}
    found = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        after = e[m.end():].lstrip()
        if after.startswith("(") or m.group(0).lower() in keywords:
            continue
        found.add(m.group(0))
    return found


def test_dashboard_queries_name_only_exported_metrics():
    import prometheus_client as pc

    reg = pc.CollectorRegistry()
    try:
        metrics.setup_worker(reg, run_id="r", worker="w", backend="redis")
        metrics.setup_controller(reg)
        exported = metrics.exported_names(reg)
    finally:
        metrics.reset()
    assert "ttg_chunks_done_total" in exported and "ttg_run_chunks" in exported
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    queried: set[str] = set()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            used = _promql_metric_names(expr)
            assert used, f"panel {panel['title']!r}: no metric in {expr!r}"
            assert used <= exported, f"panel {panel['title']!r} queries {used - exported}"
            queried |= used
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            used = _promql_metric_names(var["definition"].replace("label_values", "f"))
            used.discard("run_id")
            assert used <= exported, used - exported
    # every metric family a worker or the controller exports is on the dashboard
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    missing = [f.name for f in reg.collect()
               if not {f.name + sfx for sfx in suffixes[f.type]} & queried]
    assert not missing, f"exported but not on the dashboard: {missing}"


def test_no_metrics_port_means_no_prometheus_import(env):
    code = ("import sys; from ttg import metrics, worker; "
            "assert 'prometheus_client' not in sys.modules; "
            "assert not metrics.enabled(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "ok", r.stderr


# ---- live progress ---------------------------------------------------------------------


def _drain(fd: int, sink: bytearray) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO once every slave is closed
            return
        if not data:
            return
        sink.extend(data)


@pytest.mark.parametrize("where", ["dev-tty", "stderr"])
def test_live_bar_on_a_terminal(env, where):
    """On a terminal the bar redraws in place with \\r. `dev-tty`: stdout and stderr are
    captured (as under Ansible) and the bar goes to the controlling terminal; `stderr`:
    stderr is the terminal (make demo in a shell)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    slave_name = os.ttyname(slave)

    def make_controlling() -> None:  # runs in the child after setsid()
        fd = os.open(slave_name, os.O_RDWR)
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        os.close(fd)

    env.fleet("bar", 3)
    stderr_file = env.tmp / "sweep.err"
    with stderr_file.open("w") as err:
        p = subprocess.Popen(
            sweep_cmd(env, "--params", "900", "--chunk-size", "10", "--work-ms", "5"),
            env=env.env("bar", TERM="xterm", TTG_LOG_FORMAT="text"), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=slave if where == "stderr" else err,
            start_new_session=True, preexec_fn=make_controlling, text=True)
    screen = bytearray()
    reader = threading.Thread(target=_drain, args=(master, screen), daemon=True)
    reader.start()
    try:
        out, _ = p.communicate(timeout=90)
    finally:
        # closed only now: with no slave open at all, reads on the master fail (EIO) and the
        # reader would stop before the child opens /dev/tty
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert p.returncode == 0, stderr_file.read_text()
    text = screen.decode(errors="replace")
    redraws = re.findall(r"\r\x1b\[2K\[[#-]{24}\] (\d+)/90 chunks", text)
    assert len(redraws) >= 3, repr(text[-3000:])
    assert [int(x) for x in redraws] == sorted(int(x) for x in redraws)  # monotone
    assert redraws[-1] == "90"
    last = text[text.rindex("\r\x1b[2K"):]
    for field in ("params/s", "ETA", "in flight", "reclaimed", "retried", "dead", "workers 3"):
        assert field in last, last
    assert "\r" not in out  # stdout (the summary) stays clean
    assert json.loads(out.strip().splitlines()[-1])["ok"]
    plain = stderr_file.read_text()
    if where == "dev-tty":  # the captured log gets plain lines as well
        assert "progress 90/90 chunks" in plain and "\r" not in plain


def test_plain_lines_without_a_terminal(env):
    env.fleet("plain", 3)
    p = subprocess.run(
        sweep_cmd(env, "--params", "600", "--chunk-size", "10", "--work-ms", "2"),
        env=env.env("plain", TTG_LOG_FORMAT="text"), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=90, start_new_session=True)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if " progress " in ln]
    assert lines and "\r" not in p.stderr and "\x1b" not in p.stderr
    assert re.search(r"progress 60/60 chunks 100\.0% \| [\d,]+ params/s \| ETA 00:00 \| "
                     r"in flight 0 \| reclaimed 0 \| retried 0 \| dead 0 \| workers \d",
                     lines[-1]), lines[-1]


def test_status_watch_and_wait_show_progress(env):
    b = env.make()
    b.submit(spec("watch", params=300, chunk=10, work_ms=3, workers=2))
    env.fleet("watch", 2)
    w = env.ttg("wait", run_id="watch", TTG_LOG_FORMAT="text")
    assert w.returncode == 0, w.stderr
    assert "progress 30/30 chunks" in w.stderr
    st = env.ttg("status", "--watch", run_id="watch", TTG_LOG_FORMAT="text")
    assert st.returncode == 0 and "30/30 chunks" in st.stderr and "\r" not in st.stderr
    one = env.ttg("status", run_id="watch")
    assert "30/30 chunks" in one.stdout
    b.close()


class _BrokenTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        raise OSError(5, "Input/output error")


def test_reporter_survives_a_terminal_that_goes_away(capsys):
    r = Reporter(1000, 10, stream=_BrokenTerminal())
    assert r.live
    p = Progress(chunks_total=100, done=50, dead=0, in_flight=3, workers_alive=3)
    r.update(p, force=True)  # the write fails: fall back to plain lines on stderr
    assert not r.live
    r.update(p, force=True)
    r.close(p)
    assert "progress 50/100 chunks" in capsys.readouterr().err


def test_reporter_rate_and_eta_use_a_window():
    r = Reporter(10_000, 100, stream=io.StringIO(), live=False, window_s=10)
    r.rate(Progress(chunks_total=100, done=40, dead=0))  # attached mid-run: 40 done before
    time.sleep(0.2)
    line = r.line(Progress(chunks_total=100, done=50, dead=0))
    rate = float(re.search(r"\| ([\d,]+) params/s", line).group(1).replace(",", ""))
    assert 2000 < rate < 6000  # 1000 params in ~0.2 s, not 5000 params since attach
    assert "ETA 00:0" in line or "ETA 00:1" in line


# ---- run report ------------------------------------------------------------------------


def test_report_of_a_real_chaos_run_matches_the_summary(env):
    """A real sweep with a worker SIGKILLed mid-run; the test plays the chaos tool and
    records the fault in the summary; `ttg report` must plot exactly what the run did."""
    b = env.make()
    runs = env.tmp / "runs"
    fleet = env.fleet("rep", 3)
    p = subprocess.Popen(sweep_cmd(env, "--params", "1500", "--chunk-size", "10",
                                   "--work-ms", "2"),
                         env=env.env("rep"), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    wait_for(lambda: b.load_spec("rep"), timeout=30, what="the sweep submitted")
    wait_for(lambda: b.progress("rep").done >= 40, timeout=30, what="40 chunks done")
    killed_at = time.time()
    fleet[1].send_signal(signal.SIGKILL)
    fleet[1].wait(timeout=10)
    at_done = b.progress("rep").done
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] and summary["chunks_done"] == 150
    run_dir = runs / "rep"
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()
              if x.strip()] if (run_dir / "events.jsonl").exists() else []
    reclaims = [e for e in events if e.get("kind") == "reclaimed"]
    recovered = (min(e["ts"] for e in reclaims) - killed_at) if reclaims else 1.0
    summary["faults"] = [{"type": "worker-kill", "target": "worker-1", "at": killed_at,
                          "recovered_s": round(recovered, 3)}]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    r = env.ttg("report", "--runs-dir", str(runs))  # the latest run
    assert r.returncode == 0, r.stderr
    assert f"{run_dir}/report.md" in r.stdout or "report.md" in r.stdout
    rep = json.loads((run_dir / "report.json").read_text())
    md = (run_dir / "report.md").read_text()
    # the plotted totals are the run's
    assert sum(w["chunks"] for w in rep["workers"].values()) == summary["chunks_done"]
    assert sum(w["params"] for w in rep["workers"].values()) == summary["params"]
    integral = sum(r * rep["throughput"]["bin_s"] for r in rep["throughput"]["params_per_s"])
    assert integral == pytest.approx(summary["result"]["count"])
    assert rep["throughput"]["params"] == 1500
    assert sum(rep["durations"]["counts"]) == summary["chunks_done"] == rep["durations"]["n"]
    chunks = [json.loads(x) for x in (run_dir / "chunks.jsonl").read_text().splitlines()]
    per_worker = {}
    for c in chunks:
        per_worker[c["worker"]] = per_worker.get(c["worker"], 0) + 1
    assert {w: v["chunks"] for w, v in rep["workers"].items()} == per_worker
    # the fault is on the timeline, at the right place, with its recovery
    (fault,) = rep["faults"]
    assert fault["at_s"] == pytest.approx(killed_at - rep["t0"], abs=0.01)
    assert fault["recovered_at_s"] == pytest.approx(fault["at_s"] + recovered, abs=0.01)
    if reclaims:
        assert fault["reclaim_s"] == pytest.approx(recovered, abs=0.01)
    # the killed worker stopped writing results at the kill
    last_by_1 = max(c["finished"] for c in chunks if c["worker"] == "worker-1")
    assert last_by_1 <= killed_at + 0.01 and at_done < 150
    # the text
    assert "**Verdict: OK**" in md and "| chunks done / total | 150 / 150 |" in md
    assert md.count("| ok |") == 2 and "MISMATCH" not in md
    assert "## Fault timeline" in md and "worker-kill" in md
    for png in ("throughput.png", "workers.png", "durations.png", "timeline.png"):
        assert f"]({png})" in md
        assert is_png(run_dir / png), png
    assert rep["plots"] == ["throughput.png", "workers.png", "durations.png", "timeline.png",
                            "outputs.png"]  # the last: the distribution of each output


def test_report_with_at_progress_fault_and_verdict_not_ok(env):
    """`sweep --report` writes the report at the end; a failed point makes it NOT OK."""
    env.fleet("bad", 2, TTG_POISON_PARAM="55")
    runs = env.tmp / "runs"
    faults = env.tmp / "faults.json"
    faults.write_text(json.dumps([{"type": "broker-kill", "target": "redis",
                                   "at_progress": 0.5, "recovered_s": 0.5}]))
    r = env.ttg("sweep", "--runs-dir", str(runs), "--params", "200", "--chunk-size", "10",
                "--work-ms", "1", "--task", "poison", "--max-attempts", "2", "--workers", "2",
                "--faults", str(faults), "--report", run_id="bad")
    assert r.returncode == 1
    md = (runs / "bad" / "report.md").read_text()
    assert "**Verdict: NOT OK** — 1 point(s) failed, 0 expected (ttg results bad --failures)" in md
    rep = json.loads((runs / "bad" / "report.json").read_text())
    assert sum(w["chunks"] for w in rep["workers"].values()) == 20  # chunk 5, with its failure
    assert rep["throughput"]["params"] == 199
    (fault,) = rep["faults"]
    assert fault["at_s"] is not None and 0 < fault["at_s"] <= rep["span_s"]
    assert "broker-kill" in md and "(progress 50%)" in md
    assert all(is_png(runs / "bad" / f) for f in rep["plots"]) and len(rep["plots"]) == 5


def test_report_on_a_missing_run_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ttg.cli", "report", "--runs-dir",
                        str(tmp_path / "nothing")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no run found" in r.stderr


# ---- logs ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_chunk_log_lines_carry_run_worker_chunk_attempt(env, fmt):
    b = env.make()
    b.submit(spec("logs", params=100, chunk=10, task="poison", max_attempts=3, workers=1))
    w = env.worker("logs", 0, "--exit-when-done", TTG_LOG_FORMAT=fmt, TTG_LOG_LEVEL="DEBUG",
                   TTG_POISON_PARAM="25")
    assert w.wait(timeout=60) == 0
    lines = Path(w.logfile).read_text().splitlines()
    assert lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is JSON
        chunk_lines = [r for r in records if "chunk" in r]
        done = [r for r in chunk_lines if r["msg"].startswith("chunk done")]
        # chunk 2 is poisoned: two failed attempts, then stored with its failed point
        assert {r["chunk"] for r in done} == set(range(10))
        failed = [r for r in chunk_lines if r["msg"].startswith("task failed")]
        assert [r["attempt"] for r in failed] == [1, 2] and {r["chunk"] for r in failed} == {2}
        stored = [r for r in chunk_lines if r["msg"].startswith("stored with 1 failed point")]
        assert [(r["chunk"], r["attempt"]) for r in stored] == [(2, 3)]
        for r in chunk_lines:
            assert r["run_id"] == "logs" and r["worker"] == "worker-0", r
            if r["logger"] == "ttg.worker":
                assert isinstance(r["chunk"], int) and isinstance(r["attempt"], int), r
    else:
        chunk_lines = [ln for ln in lines if " chunk=" in ln]
        assert sum("chunk done" in ln for ln in chunk_lines) == 10
        assert sum("task failed" in ln for ln in chunk_lines) == 2
        for ln in chunk_lines:
            assert "run_id=logs" in ln and "worker=worker-0" in ln, ln
            if "chunk done" in ln or "task failed" in ln:
                assert re.search(r"chunk=\d+ attempt=\d+", ln), ln
    b.close()


def test_report_without_matplotlib_still_writes_the_text(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    summary = {"run_id": "r1", "platform": "local", "backend": "redis", "task": "reference",
               "params": 20, "chunk_size": 10, "workers": 1, "work_ms": 0, "chunks_total": 2,
               "chunks_done": 2, "chunks_missing": 0, "chunks_dead_lettered": 0,
               "executions": 2, "result": {"count": 20, "sum": 1.0, "min": 0.0, "max": 1.0},
               "wall_s": 1.0, "utilization": 0.5, "faults": [], "ok": True}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "chunks.jsonl").write_text("".join(
        json.dumps({"chunk": c, "count": 10, "worker": "w", "started": 100.0 + c,
                    "finished": 100.5 + c, "task_s": 0.5, "attempt": 1}) + "\n"
        for c in range(2)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    from ttg.report import write_report

    md = write_report(run).read_text()
    assert "_Plots not drawn: matplotlib is not installed" in md
    assert "**Verdict: OK**" in md and "](throughput.png)" not in md
    assert not list(run.glob("*.png"))
