"""A worker waiting for a run that was never submitted stops at once on SIGTERM."""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.timeout(60)


def test_sigterm_while_waiting_for_the_job_exits_zero(any_backend):
    w = any_backend.worker("never-submitted", 0)
    time.sleep(1.5)  # joined and blocking on the empty run
    assert w.poll() is None
    t0 = time.monotonic()
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=15) == 0
    assert time.monotonic() - t0 < 5
