"""The retry and dead-letter policy, the same for every backend (backends provide mechanism).

A chunk has `max_attempts` executions. An attempt that raises is retried until the last one,
which is dead-lettered with its error (`exhausted`). A chunk whose worker died under it is
charged for the loss as for an attempt, so a chunk that kills every worker it meets ends in
the dead-letter queue instead of crash-looping the fleet (`lost_too_often`).
"""

from __future__ import annotations

from ttg.sweep import JobSpec


def exhausted(spec: JobSpec, attempt: int) -> bool:
    """True if a failed `attempt` was the chunk's last: dead-letter it, do not retry."""
    return attempt >= spec.max_attempts


def lost_too_often(spec: JobSpec, attempt: int, lost: int,
                   last_error: str | None = None) -> str | None:
    """The dead-letter reason for a chunk about to start `attempt` after losing its worker
    `lost` times, if that passes `max_attempts`; None if it may run."""
    if attempt + lost <= spec.max_attempts:
        return None
    reason = f"delivery limit: the chunk lost its worker {lost} time(s)"
    if last_error:
        reason += f"; last error: {last_error}"
    return reason
