"""Time limits learned from history instead of guessed.

``duration_report`` reads what past steps and tasks took (the ``duration_ms`` of every
``step`` audit event, and each finished task's run time), per agent and per step kind
(the outcome: continue, call_tools, suspend, finish, fail), and recommends limits:
the p99 with headroom (``HEADROOM`` times), rounded up, never below ``FLOOR`` seconds.
Outliers are what limits are for, so the recommendation follows the tail of the
distribution, not its maximum.

A task's duration is the time it ran: from creation to its end, less the time it was
suspended (waiting for a person, an event or a timer), which says nothing about how
long the agent's work takes.

``learned_limits_apply`` stores the per-agent recommendation; an agent that sets
``learned_limits = True`` then gets it as its step time limit (and, for tasks started
without ``timeout_seconds``, as their deadline). A limit learned from too few samples
would cut off the first slow run: nothing is stored from fewer than
``AGENTS_LEARN_MIN_SAMPLES`` (50) finished steps of an agent, and no task deadline from
fewer finished tasks.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db.models import DurationField, F, Sum
from django.db.models.functions import Coalesce

from agents.definition import Agent
from agents.models import AgentTask, LearnedLimit, TaskStatus
from audit.models import AuditEvent, EventType

HEADROOM = 1.5
FLOOR = 1.0
SAMPLE = 20_000
TASK_KIND = "(whole task)"


@dataclass(frozen=True)
class DurationRow:
    agent: str
    kind: str
    samples: int
    p50: float
    p95: float
    p99: float
    recommended: float


def _row(agent: str, kind: str, seconds: list[float]) -> DurationRow:
    if len(seconds) == 1:
        p50 = p95 = p99 = seconds[0]
    else:
        cuts = statistics.quantiles(seconds, n=100, method="inclusive")
        p50, p95, p99 = cuts[49], cuts[94], cuts[98]
    return DurationRow(agent, kind, len(seconds), p50, p95, p99, recommend(p99))


def recommend(p99: float) -> float:
    """p99 with headroom, rounded up to a whole second (or a tenth below 10 s)."""
    raw = max(p99 * HEADROOM, FLOOR)
    return math.ceil(raw) if raw >= 10 else math.ceil(raw * 10) / 10


def duration_report(*, agents: Iterable[str] | None = None) -> list[DurationRow]:
    steps = AuditEvent.objects.filter(type=EventType.STEP).order_by("-id")
    tasks = AgentTask.objects.filter(status=TaskStatus.COMPLETED, finished_at__isnull=False)
    if agents:
        steps = steps.filter(task__agent_name__in=list(agents))
        tasks = tasks.filter(agent_name__in=list(agents))
    by_kind: dict[tuple[str, str], list[float]] = defaultdict(list)
    for agent, payload in steps.values_list("task__agent_name", "payload")[:SAMPLE]:
        if "duration_ms" in payload:
            by_kind[(agent, payload.get("outcome", "?"))].append(payload["duration_ms"] / 1000)
    whole: dict[str, list[float]] = defaultdict(list)
    # Time spent suspended: each wait from its start to its end (or the task's end).
    waited = Sum(
        Coalesce("suspensions__resolved_at", "finished_at") - F("suspensions__created_at"),
        output_field=DurationField(),
    )
    runs = tasks.annotate(took=F("finished_at") - F("created_at"), waited=waited)
    for agent, took, wait in runs.values_list("agent_name", "took", "waited")[:SAMPLE]:
        ran = took - wait if wait is not None else took
        whole[agent].append(max(ran.total_seconds(), 0.0))
    rows = [_row(agent, kind, values) for (agent, kind), values in sorted(by_kind.items())]
    rows += [_row(agent, TASK_KIND, values) for agent, values in sorted(whole.items())]
    return rows


@dataclass(frozen=True)
class TooFewSamples:
    """An agent whose limits ``learned_limits_apply`` did not store, and why."""

    agent: str
    samples: int
    needed: int


def learned_limits_apply(
    *, rows: list[DurationRow]
) -> tuple[list[LearnedLimit], list[TooFewSamples]]:
    """Store, per agent, the largest step recommendation and the task recommendation.

    Returns what was stored, and the agents left alone because they have fewer than
    ``AGENTS_LEARN_MIN_SAMPLES`` finished steps (their stored limits, if any, stay). An
    agent with enough steps but too few finished tasks gets no task deadline.
    """
    needed = settings.AGENTS["LEARN_MIN_SAMPLES"]
    steps: dict[str, list[DurationRow]] = defaultdict(list)
    tasks: dict[str, DurationRow] = {}
    for row in rows:
        if row.kind == TASK_KIND:
            tasks[row.agent] = row
        else:
            steps[row.agent].append(row)
    saved: list[LearnedLimit] = []
    refused: list[TooFewSamples] = []
    for agent, kinds in steps.items():
        samples = sum(r.samples for r in kinds)
        if samples < needed:
            refused.append(TooFewSamples(agent, samples, needed))
            continue
        task = tasks.get(agent)
        if task is not None and task.samples < needed:
            task = None
        limit, _ = LearnedLimit.objects.update_or_create(
            agent_name=agent,
            defaults={
                "step_time_limit": max(r.recommended for r in kinds),
                "step_samples": samples,
                "task_timeout": task.recommended if task else None,
                "task_samples": task.samples if task else 0,
            },
        )
        saved.append(limit)
    _cache.clear()
    return saved, refused


# Per process: publishing a step must not cost a query for this.
_cache: dict[str, tuple[float, LearnedLimit | None]] = {}
_CACHE_SECONDS = 60.0


def learned_limit(agent: Agent) -> LearnedLimit | None:
    """The stored limits of an agent that opted in (``learned_limits``), else None."""
    if not getattr(agent, "learned_limits", False):
        return None
    now = time.monotonic()
    cached = _cache.get(agent.name)
    if cached is None or now - cached[0] > _CACHE_SECONDS:
        cached = (now, LearnedLimit.objects.filter(agent_name=agent.name).first())
        _cache[agent.name] = cached
    return cached[1]
