"""`ttg serve`: the read-only routes over HTTP, and the page in a real browser (Debian's
headless Chromium driven by Playwright, no browser download) during a real run: its numbers
move while the run goes and match the run's summary at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from brokers import RedisServer
from conftest import Env, wait_for

from ttg.dashboard import make_server

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_serve(runs_dir: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ttg.cli", "serve", "--runs-dir", str(runs_dir),
                             "--port", "0"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    assert m, line
    return proc, m.group(1)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_is_read_only_on_loopback_and_serves_nothing_outside_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "20260101-000000-abcd").mkdir(parents=True)
    (runs / "20260101-000000-abcd" / "progress.jsonl").write_text(
        '{"ts":1,"chunks_total":4,"done":1,"dead":0,"in_flight":2,"workers_alive":2}\n{"ts":2,"cut')
    (tmp_path / "secret.png").write_bytes(b"x")
    proc, url = start_serve(runs)
    try:
        assert url.startswith("http://127.0.0.1:")
        status, body = get(url + "api/runs")
        assert status == 200 and json.loads(body)[0]["run_id"] == "20260101-000000-abcd"
        status, body = get(url + "api/run/20260101-000000-abcd")
        view = json.loads(body)
        assert view["state"] == "running" and view["progress"]["done"] == 1  # the cut line skipped
        for bad in ("api/run/..", "api/run/%2e%2e/secret.png", "api/run/nosuch", "etc/passwd",
                    "api/run/20260101-000000-abcd/../../secret.png"):
            assert get(url + bad)[0] == 404, bad
        req = urllib.request.Request(url + "api/runs", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)  # noqa: S310
        assert err.value.code == 405
        status, page = get(url)
        assert status == 200 and b"<title>TTG runs</title>" in page
        assert b"password" not in page.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_refuses_a_busy_port_with_one_line(tmp_path: Path) -> None:
    server = make_server(tmp_path, port=0)
    port = server.server_address[1]
    try:
        out = subprocess.run([sys.executable, "-m", "ttg.cli", "serve", "--runs-dir", str(tmp_path),
                              "--port", str(port)], capture_output=True, text=True, timeout=30,
                             check=False)
    finally:
        server.server_close()
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ttg: error: cannot serve on 127.0.0.1:{port}"), out.stderr


def test_the_page_follows_a_real_run_in_chromium(tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)")
    playwright = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is in requirements-dev.lock (make dev)")
    broker = RedisServer(tmp_path / "redis")
    env = Env("redis", broker, tmp_path)
    runs = tmp_path / "runs"
    run_id = "20260101-000000-d4sh"
    serve, url = start_serve(runs)
    sweep = None
    try:
        with playwright.sync_playwright() as pw:
            # the browser first (slow to start on a busy machine), then the run: the page
            # polls for the run before it exists and must follow it from its start
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"{url}run/{run_id}")
            # 40 chunks of 10 params x 60 ms on 2 workers: about 12 s
            env.fleet(run_id, 2)
            sweep = subprocess.Popen(
                [sys.executable, "-m", "ttg.cli", "sweep", "--params", "400", "--chunk-size", "10",
                 "--work-ms", "60", "--workers", "2", "--runs-dir", str(runs), "--json",
                 "--report"], env=env.env(run_id), stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True)
            seen: list[int] = []

            def done_now() -> int:
                text = page.inner_text("#done")
                return int(text.replace(",", "")) if text.strip().isdigit() else -1

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (runs / run_id / "summary.json").exists():
                seen.append(done_now())
                time.sleep(0.5)
            assert sweep.wait(timeout=120) == 0
            summary = json.loads((runs / run_id / "summary.json").read_text())
            wait_for(lambda: page.inner_text("#verdict") == "ok", timeout=30, what="the verdict")
            live = sorted({n for n in seen if 0 <= n < 40})
            assert len(live) >= 3, f"the page's count did not move during the run: {seen}"
            assert seen == sorted(seen) or max(seen) <= 40
            assert done_now() == summary["chunks_done"] == 40
            assert page.inner_text("#total") == "40"
            assert page.inner_text("#dead") == str(summary["chunks_dead_lettered"])
            assert page.text_content("#sum") == str(summary["result"]["sum"])
            stable = page.inner_text("#stable")
            # the page rounds to 2 decimals in JavaScript (12.065 may show as 12.06 or 12.07,
            # and 12.10 as 12.1): compare the number, within the rounding
            shown = re.search(r"wall\s+([\d,.]+) s", stable)
            assert shown, stable
            assert abs(float(shown.group(1).replace(",", "")) - summary["wall_s"]) <= 0.006, stable
            assert f"{round(100 * summary['utilization'])}%" in stable
            workers = page.inner_text("#wtable")
            assert "worker-0" in workers and "worker-1" in workers
            loaded = ("[...document.images].length > 0 && "
                      "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            wait_for(lambda: page.evaluate(loaded), timeout=30, what="the report's figures")
            if os.environ.get("TTG_DASHBOARD_SCREENSHOT"):
                page.screenshot(path=os.environ["TTG_DASHBOARD_SCREENSHOT"], full_page=True)
            browser.close()
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
        serve.terminate()
        serve.wait(timeout=10)
        env.stop_all()
        broker.stop()
