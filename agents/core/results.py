"""What became of one delivery of a step (the engine's answer to the Celery task)."""

from __future__ import annotations

from enum import StrEnum


class StepResult(StrEnum):
    COMMITTED = "committed"
    STALE = "stale"
    RETRY = "retry_scheduled"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    REFUSED = "refused"
    TIMED_OUT = "timed_out"
    # The database stayed away too long: give the message back to the queue.
    REQUEUE = "requeue"
    # The step gave its wait to another process (``agents.definition.HandOff``).
    HANDED_OFF = "handed_off"
