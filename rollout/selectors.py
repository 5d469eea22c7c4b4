"""What ``python manage.py versions`` shows: per agent and version, its tasks by status,
the live workers serving it, and the share of new tasks it gets."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db.models import Count

from agents.core.versions import held_versions, intake_shares, live_workers, version_key
from agents.definition import registered_agents
from agents.models import AgentTask, VersionHold, WorkerVersion


def versions_overview(*, agent: str | None = None) -> list[dict[str, Any]]:
    """One row per (agent, version) that has tasks, live workers or a hold::

        {"agent", "version", "tasks": {status: count}, "workers": [worker],
         "compatible_workers": [worker of a newer version that takes these tasks],
         "intake_percent": float, "held": bool}

    sorted by agent, then version (newest last). ``compatible_workers`` are counted as
    serving the version: a task of it runs on them too."""
    tasks = AgentTask.objects.all()
    workers = live_workers()
    holds = VersionHold.objects.all()
    if agent is not None:
        tasks, workers, holds = (
            tasks.filter(agent_name=agent),
            workers.filter(agent=agent),
            holds.filter(agent=agent),
        )
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for row in tasks.values("agent_name", "agent_version", "status").annotate(n=Count("id")):
        counts[(row["agent_name"], row["agent_version"])][row["status"]] = row["n"]
    serving: dict[tuple[str, str], list[str]] = defaultdict(list)
    compatible: dict[tuple[str, str], list[str]] = defaultdict(list)
    announced: list[WorkerVersion] = list(workers.order_by("worker"))
    for w in announced:
        serving[(w.agent, w.version)].append(w.worker)
        for old in w.compatible or ():
            compatible[(w.agent, str(old))].append(w.worker)
    held = {(h.agent, h.version) for h in holds}
    keys = set(counts) | set(serving) | held
    names = {k[0] for k in keys} | ({agent} if agent else set())
    shares = {
        name: intake_shares(
            agent=name,
            local_version=(a.version if (a := registered_agents().get(name)) else None),
        )
        for name in names
    }
    for name, share in shares.items():
        keys |= {(name, v) for v in share}
    return [
        {
            "agent": name,
            "version": version,
            "tasks": dict(sorted(counts.get((name, version), {}).items())),
            "workers": serving.get((name, version), []),
            "compatible_workers": compatible.get((name, version), []),
            "intake_percent": round(shares.get(name, {}).get(version, 0.0), 2),
            "held": version in held_versions(agent=name),
        }
        for name, version in sorted(keys, key=lambda k: (k[0], version_key(k[1])))
    ]
