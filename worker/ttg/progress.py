"""Progress display: a live bar on a terminal, plain periodic lines otherwise; and the run's
progress record (runs/<id>/progress.jsonl) that `ttg report` plots.

Where the bar goes: stderr when it is a terminal; else the controlling terminal (/dev/tty),
so the bar still shows when stdout/stderr are captured (e.g. under Ansible) — and then plain
lines also go to stderr, for the captured log. No terminal at all (CI): plain lines only.
`TTG_PROGRESS=auto|live|plain|off` overrides the choice; `TERM=dumb` means plain.

Under `make` the project's Ansible callback (plugins/callback/ttg.py) sets
`TTG_PROGRESS_FILE`: the controller then appends one JSON record of its progress to that file
about twice a second (no /dev/tty bar), and the callback draws them where the user looks — a
`rich` bar on a terminal, a plain line every few seconds in a log or CI console.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from ttg import metrics
from ttg.backends.base import Progress

BAR_WIDTH = 24
LIVE_INTERVAL_S = 0.2
FILE_INTERVAL_S = 0.5
_faults = 0


def note_fault() -> None:
    """A fault was injected (chaos): counted in the progress records."""
    global _faults
    _faults += 1


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def open_terminal() -> TextIO | None:
    """The controlling terminal, even when stdout/stderr are captured (e.g. under Ansible)."""
    if _isatty(sys.stderr) and os.environ.get("TERM") != "dumb":
        return sys.stderr
    if os.environ.get("TERM") == "dumb":
        return None
    try:
        tty = open("/dev/tty", "w")  # noqa: SIM115 - kept open for the run
    except OSError:  # no controlling terminal (CI, a daemon, a pod)
        return None
    if not _isatty(tty):
        tty.close()
        return None
    return tty


def _columns(stream: TextIO) -> int:
    try:
        return max(os.get_terminal_size(stream.fileno()).columns, 20)
    except (OSError, ValueError, AttributeError):
        return 120


class Reporter:
    """Call `update(progress)` often; it draws at most every 0.2 s (live) or `interval_s`
    (plain lines). With `record_dir` it also records the run's progress for `ttg report`;
    with `run_id` it publishes the controller's metrics (when they are served)."""

    def __init__(
        self,
        params: int,
        chunk_size: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        interval_s: float = 5.0,
        record_dir: Path | None = None,
        run_id: str | None = None,
        window_s: float = 10.0,
    ) -> None:
        mode = (os.environ.get("TTG_PROGRESS") or "auto").lower()
        self.params = params
        self.chunk_size = chunk_size
        self.run_id = run_id
        self.window_s = window_s
        self.plain: TextIO | None = None  # plain lines (None: none)
        self.term: TextIO | None = None  # live bar (None: none)
        self._own_term = False
        if mode == "off":
            pass
        elif stream is not None:
            if live if live is not None else (mode == "live" or
                                              (mode == "auto" and _isatty(stream))):
                self.term = stream
            else:
                self.plain = stream
        elif live is False or mode == "plain":
            self.plain = sys.stderr
        elif os.environ.get("TTG_PROGRESS_FILE"):  # the Ansible callback draws the progress
            self.plain = sys.stderr
        else:
            self.term = open_terminal()
            if self.term is None and mode == "live":
                self.term = sys.stderr
            self._own_term = self.term is not None and self.term is not sys.stderr
            if self.term is None or (self._own_term and not _isatty(sys.stderr)):
                self.plain = sys.stderr  # the captured log gets plain lines too
        self.live = self.term is not None
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self._last_live = 0.0
        self._last_plain = 0.0
        self._drawn = False
        self._samples: deque[tuple[float, int]] = deque()
        self.recorder = RunRecorder(record_dir) if record_dir is not None else None
        self._file: TextIO | None = None
        self._last_file = 0.0
        path = os.environ.get("TTG_PROGRESS_FILE") if mode != "off" else None
        if path and stream is None:
            try:
                self._file = open(path, "a")  # noqa: SIM115 - kept open for the run
            except OSError:
                self._file = None

    # ---- numbers ----------------------------------------------------------------------
    def params_done(self, p: Progress) -> int:
        return min(p.done * self.chunk_size, self.params)

    def rate(self, p: Progress) -> float:
        """Parameters per second over the last `window_s` seconds of samples."""
        now = time.monotonic()
        done = self.params_done(p)
        if not self._samples or self._samples[-1][0] < now:
            self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        if now - t0 < 1e-3:
            return 0.0
        return max(done - n0, 0) / (now - t0)

    def line(self, p: Progress, bar: bool = True) -> str:
        total = p.chunks_total
        frac = (p.done + p.dead) / total if total else 1.0
        rate = self.rate(p)
        left = self.params - self.params_done(p)
        eta = 0.0 if p.finished else (left / rate if rate > 0 else None)
        head = f"{p.done}/{total} chunks {frac:6.1%}"
        if bar:
            fill = int(frac * BAR_WIDTH)
            head = f"[{'#' * fill}{'-' * (BAR_WIDTH - fill)}] " + head
        return (
            f"{head} | {rate:,.0f} params/s | ETA {_fmt_eta(eta)} | "
            f"in flight {p.in_flight} | reclaimed {p.reclaimed} | retried {p.retried} | "
            f"dead {p.dead} | workers {p.workers_alive}"
        )

    # ---- drawing ----------------------------------------------------------------------
    def _write(self, stream: TextIO, text: str) -> bool:
        try:
            stream.write(text)
            stream.flush()
            return True
        except (OSError, ValueError):  # the terminal went away (hang-up, closed)
            return False

    def _lost_terminal(self) -> None:
        if self._own_term and self.term is not None:
            try:
                self.term.close()
            except OSError:
                pass
        self.term = None
        self.live = False
        if self.plain is None:
            self.plain = sys.stderr

    def update(self, p: Progress, force: bool = False) -> None:
        if self.recorder is not None:
            self.recorder.sample(p, force=force)
        if self.run_id is not None:
            metrics.record_progress(self.run_id, p, self.params, self.chunk_size)
        now = time.monotonic()
        if self._file is not None and (force or p.finished
                                       or now - self._last_file >= FILE_INTERVAL_S):
            self._last_file = now
            self._write_record(p)
        if self.term is not None and (force or now - self._last_live >= LIVE_INTERVAL_S):
            self._last_live = now
            text = self.line(p)
            text = text[: _columns(self.term) - 1]
            if self._write(self.term, "\r\033[2K" + text):
                self._drawn = True
            else:
                self._lost_terminal()
        if self.plain is not None and (force or now - self._last_plain >= self.interval_s
                                       or self._last_plain == 0.0):
            self._last_plain = now
            stamp = time.strftime("%H:%M:%S")
            if not self._write(self.plain, f"{stamp} progress {self.line(p, bar=False)}\n"):
                self.plain = None

    def _write_record(self, p: Progress) -> None:
        rate = self.rate(p)
        left = self.params - self.params_done(p)
        rec = {"ts": round(time.time(), 3), "run_id": self.run_id, "done": p.done,
               "total": p.chunks_total, "dead": p.dead, "in_flight": p.in_flight,
               "reclaimed": p.reclaimed, "retried": p.retried, "workers": p.workers_alive,
               "params_done": self.params_done(p), "params": self.params,
               "rate": round(rate, 1), "faults": _faults, "finished": bool(p.finished),
               "eta_s": 0.0 if p.finished else (round(left / rate, 1) if rate > 0 else None),
               "line": self.line(p, bar=False)}
        assert self._file is not None
        if not self._write(self._file, json.dumps(rec, separators=(",", ":")) + "\n"):
            self._file = None

    def close(self, p: Progress | None = None) -> None:
        if p is not None:
            self.update(p, force=True)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self.recorder is not None:
            self.recorder.close()
        if self.term is not None:
            if self._drawn:
                self._write(self.term, "\n")
            if self._own_term:
                try:
                    self.term.close()
                except OSError:
                    pass
            self.term = None


class RunRecorder:
    """What the controller saw while waiting, for `ttg report`: runs/<id>/progress.jsonl,
    one sample {ts, chunks_total, done, dead, queued, in_flight, executions, reclaimed,
    retried, workers_alive} when something changed, at most every max(0.25 s, elapsed/2000)
    (a long run stays a few thousand lines). The per-chunk data are chunks.jsonl and the
    broker's events.jsonl, written by the controller at the end."""

    FIELDS = ("done", "dead", "queued", "in_flight", "executions", "reclaimed", "retried",
              "workers_alive")

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "progress.jsonl"
        self._out: TextIO | None = self.path.open("a")
        self.t0 = time.monotonic()
        self._last_t = -1e9
        self._written: dict[str, int] | None = None

    def sample(self, p: Progress, force: bool = False) -> None:
        if self._out is None:
            return
        mono = time.monotonic()
        cur = {k: int(getattr(p, k)) for k in self.FIELDS}
        interval = max(0.25, (mono - self.t0) / 2000)
        if cur == self._written or (not force and not p.finished
                                    and mono - self._last_t < interval):
            return
        self._last_t = mono
        self._written = cur
        line = {"ts": round(time.time(), 3), "chunks_total": p.chunks_total, **cur}
        try:
            self._out.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._out.flush()
        except OSError:  # a full disk must not stop the run: stop recording
            self.close()

    def close(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except OSError:
                pass
            self._out = None
