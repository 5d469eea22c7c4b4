"""Version-pinned runs: which code runs a task's steps, which version a new task gets,
and which workers serve which versions.

- **Pinning.** A task records the agent version that started it (``agent_version``).
  Only code of that version, or code that declares it compatible
  (``Agent.compatible_versions``), runs its steps: any other worker refuses the step
  and parks it, untouched (``agents.core.engine``, like a checkpoint of a newer state
  schema), and the stuck-task sweep of a worker that serves the version publishes it
  again (``agents.core.scheduler.stuck_tasks`` selects only such rows). A step of a
  version no live worker serves waits, visibly (``schema_refused`` in its trail, and
  ``python manage.py versions``); it is never failed. When compatible newer code runs a
  step, the task is pinned to that newer version from then on.
- **Announcing.** Every worker's scheduler writes one ``agents.models.WorkerVersion`` row per
  agent it serves, every ``AGENTS_WORKER_TTL / 3`` seconds; a worker is live while its
  row is younger than ``AGENTS_WORKER_TTL`` (15 s). A graceful stop removes its rows.
- **Intake.** A new task gets the newest version a live worker serves, or with
  ``AGENTS_VERSION_RAMP`` (``{"agent": {"2": 10}}``) that share of tasks goes to each
  ramped version and the rest to the newest other version. A held version
  (``agents.models.VersionHold``: ``python manage.py versions --rollback AGENT VERSION``)
  takes no new tasks. With no live worker announced (a test running steps in-process,
  the demo before its worker starts) the version is this process's code's.
  ``local_intake()`` pins the tasks a block starts to this process's code (an
  in-process runner, ``evaluate``).

Versions are ordered by their numeric parts (``1.10`` after ``1.9``), then as text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from agents.core import clock
from agents.definition import Agent, registered_agents
from agents.models import VersionHold, WorkerVersion

_local: ContextVar[bool] = ContextVar("local_intake", default=False)


def worker_ttl() -> float:
    """Seconds a worker's announcement stays live (``AGENTS_WORKER_TTL``)."""
    return float(settings.AGENTS["WORKER_TTL"])


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key: numeric parts as numbers (``1.10`` > ``1.9``), the text last."""
    return (tuple(int(p) for p in re.findall(r"\d+", version)), version)


def worker_versions_announce(*, worker: str, agents: Mapping[str, Agent] | None = None) -> int:
    """Record that ``worker`` serves, now, each of ``agents`` (default: every agent
    registered in this process) at its version; forget the agents it no longer serves.
    Returns how many rows were written."""
    agents = registered_agents() if agents is None else agents
    now = clock.now()
    WorkerVersion.objects.filter(worker=worker).exclude(agent__in=list(agents)).delete()
    rows = [
        WorkerVersion(
            worker=worker,
            agent=name,
            version=agent.version,
            state_version=agent.state_version,
            compatible=list(agent.compatible_versions),
            started_at=now,
            last_seen=now,
        )
        for name, agent in agents.items()
    ]
    WorkerVersion.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["worker", "agent"],
        update_fields=["version", "state_version", "compatible", "last_seen"],
    )
    return len(rows)


def worker_versions_withdraw(*, worker: str) -> int:
    """Forget ``worker`` (it is stopping). Returns how many rows were removed."""
    return WorkerVersion.objects.filter(worker=worker).delete()[0]


def live_workers(*, agent: str | None = None) -> QuerySet[WorkerVersion]:
    """Announcements younger than ``AGENTS_WORKER_TTL``."""
    since = clock.now() - timedelta(seconds=worker_ttl())
    rows = WorkerVersion.objects.filter(last_seen__gte=since)
    return rows if agent is None else rows.filter(agent=agent)


def held_versions(*, agent: str) -> set[str]:
    return set(VersionHold.objects.filter(agent=agent).values_list("version", flat=True))


def intake_shares(*, agent: str, local_version: str | None = None) -> dict[str, float]:
    """Where new tasks of ``agent`` go now: ``{version: percent}``, summing to 100.

    Ramped versions (``AGENTS_VERSION_RAMP[agent]``) that are not held get their
    percent; the rest goes to the newest version a live worker serves that is neither
    ramped nor held (else the newest served one, else ``local_version``). Empty when
    there is nowhere to send them (no worker and no local code)."""
    ramp: dict[str, float] = {
        str(v): float(p) for v, p in settings.AGENTS["VERSION_RAMP"].get(agent, {}).items()
    }
    held = held_versions(agent=agent)
    served = set(live_workers(agent=agent).values_list("version", flat=True)) - held
    shares = {v: p for v, p in ramp.items() if v not in held and p > 0}
    rest = 100.0 - sum(shares.values())
    stable = (served - set(ramp)) or served
    if not stable and local_version is not None and local_version not in held:
        stable = {local_version}
    if stable and rest > 0:
        newest = max(stable, key=version_key)
        shares[newest] = shares.get(newest, 0.0) + rest
    return shares


def version_for_new_task(*, agent: Agent) -> str:
    """The version a new task of ``agent`` is pinned to (see ``intake_shares``): a
    weighted random choice. This process's code's version inside ``local_intake()``,
    and when the shares are empty (everything held, nothing served)."""
    if _local.get():
        return agent.version
    shares = intake_shares(agent=agent.name, local_version=agent.version)
    if not shares:
        return agent.version
    versions = sorted(shares, key=version_key)
    return random.choices(versions, weights=[shares[v] for v in versions])[0]


@contextmanager
def local_intake() -> Iterator[None]:
    """Tasks started in this block are pinned to this process's code's version."""
    token = _local.set(True)
    try:
        yield
    finally:
        _local.reset(token)


def version_hold(*, agent: str, version: str, actor: str, reason: str = "") -> bool:
    """Stop new tasks going to ``version`` of ``agent`` (a rollback): they go to the
    newest other version served. Tasks already on it finish there. True if new."""
    _, created = VersionHold.objects.get_or_create(
        agent=agent, version=version, defaults={"created_by": actor, "reason": reason}
    )
    return created


def version_release(*, agent: str, version: str) -> bool:
    """Undo ``version_hold``. True if there was a hold."""
    return VersionHold.objects.filter(agent=agent, version=version).delete()[0] > 0
