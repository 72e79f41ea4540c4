"""Progress display: a live line on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ttg.backends.base import Progress


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def open_terminal() -> TextIO | None:
    """The controlling terminal, even when stdout is captured (e.g. under Ansible)."""
    if sys.stderr.isatty():
        return sys.stderr
    try:
        return open("/dev/tty", "w")  # noqa: SIM115 - kept open for the run
    except OSError:
        return None


class Reporter:
    """Call `update(progress)` often; it draws at most every `interval_s` (plain) or 0.2 s."""

    def __init__(
        self,
        params: int,
        chunk_size: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        interval_s: float = 5.0,
    ) -> None:
        term = open_terminal() if stream is None and live is not False else None
        self.live = term is not None if live is None else live
        self.stream = stream or term or sys.stderr
        self.params = params
        self.chunk_size = chunk_size
        self.interval_s = interval_s if not self.live else 0.2
        self.t0 = time.monotonic()
        self._last = 0.0

    def line(self, p: Progress) -> str:
        elapsed = time.monotonic() - self.t0
        frac = (p.done + p.dead) / p.chunks_total if p.chunks_total else 1.0
        params_done = min(p.done * self.chunk_size, self.params)
        rate = params_done / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        return (
            f"[{bar}] {p.done}/{p.chunks_total} chunks {frac:6.1%} | {rate:,.0f} params/s | "
            f"ETA {_fmt_eta(eta)} | in flight {p.in_flight} | reclaimed {p.reclaimed} | "
            f"retried {p.retried} | dead {p.dead} | workers {p.workers_alive}"
        )

    def update(self, p: Progress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        if self.live:
            self.stream.write("\r\033[2K" + self.line(p))
        else:
            self.stream.write(self.line(p) + "\n")
        self.stream.flush()

    def close(self, p: Progress | None = None) -> None:
        if p is not None:
            self.update(p, force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
