"""Exponential backoff within a time budget: the one retry loop every backend uses."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    """Delays of `first_s`, doubling up to `cap_s`, for at most `budget_s` from creation.

    `wait()` sleeps the next delay (the last one cut to what is left, so that a last try
    happens at the end of the budget) and returns True, or returns False at once when the
    budget is spent: the caller then raises its own error, with its own reason.
    `reset()` after a success starts the budget and the delays over.
    """

    def __init__(self, budget_s: float, first_s: float = 0.1, cap_s: float = 2.0,
                 sleep: Callable[[float], object] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self.first_s = first_s
        self.cap_s = cap_s
        self._sleep = sleep
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.deadline = self._clock() + self.budget_s
        self.delay = self.first_s

    def remaining(self) -> float:
        """Seconds left of the budget (never below 0)."""
        return max(0.0, self.deadline - self._clock())

    def wait(self) -> bool:
        """Sleep the next delay (True), or False if the budget is spent."""
        left = self.deadline - self._clock()
        if left <= 0:
            return False
        self._sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, self.cap_s)
        return True
