"""Fault injection for the crash tests: die abruptly at a named point of a step.

Set ``AGENTS_FAULT_INJECTION=POINT`` or ``POINT@STEP`` in a worker's environment and
that worker's process kills itself with SIGKILL when a step (every step, or only step
number STEP) reaches POINT:

- ``before_commit``: the step ran, its checkpoint is written in an open transaction,
  the next step is not published;
- ``after_publish``: the next step is published, its transaction not yet committed
  (the next step's delivery is then dropped as stale, and this one runs again);
- ``after_commit``: the checkpoint committed, this message is not yet acknowledged;
- ``tool_recorded``: a tool call's result is recorded under its idempotency key, the
  step's other calls may not all be (``tools.runner``), nothing of the step committed;
- ``handoff_returned`` (the model gateway): a call's reply is recorded and its step
  handed back to the work queue, the hand-off message not yet acknowledged;
- ``handoff_recorded`` (the model gateway): a call's reply is recorded for the gateway
  to run the step that takes it itself (``llm.gateway.Gateway._continue``); that step
  has not begun. The worker points fire in such a step too, in the gateway;
- ``retention_archived`` (``agents.retention``, STEP unused): a task's archive is
  written and verified, nothing of it removed yet;
- ``retention_before_commit``: its rows are deleted and its removal recorded in an
  open transaction, not yet committed.

With ``AGENTS_FAULT_ONCE_FILE=PATH`` the fault fires once across all processes: the
first process to reach the point creates PATH (atomically) and dies; later ones carry on.
With ``AGENTS_FAULT_LOG=PATH`` each death first appends its time to PATH (for
``benchmarks/recovery.py``).

Settings refuse it unless ``AGENTS_ENVIRONMENT=test``: it is never on in production.
"""

from __future__ import annotations

import os
import signal
import time

from django.conf import settings

# Where a worker's step can die; and the model gateway's own point.
WORKER_POINTS = ("before_commit", "after_commit", "after_publish")
# ``tool_recorded`` fires only in steps that record a tool call (MCP tools, several
# calls in one step), so it is not among the points every step passes.
POINTS = (
    *WORKER_POINTS,
    "tool_recorded",
    "handoff_returned",
    "handoff_recorded",
    "retention_archived",
    "retention_before_commit",
)


def parse(spec: str) -> tuple[str, int | None]:
    point, _, step = spec.partition("@")
    if point not in POINTS:
        raise ValueError(f"AGENTS_FAULT_INJECTION: unknown point {point!r}; one of {POINTS}")
    return point, int(step) if step else None


def fault_point(name: str, *, step: int) -> None:
    spec = settings.AGENTS["FAULT_INJECTION"]
    if not spec:
        return
    point, only_step = parse(spec)
    if point != name or only_step not in (None, step):
        return
    once = os.environ.get("AGENTS_FAULT_ONCE_FILE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    log = os.environ.get("AGENTS_FAULT_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
