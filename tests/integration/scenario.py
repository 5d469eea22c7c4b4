"""Scripted workloads for the recovery tests, and the check that nothing was lost or
done twice. Usable in-process, or as ``python -m tests.integration.scenario`` against
other servers (the database-restart test runs on a private PostgreSQL).

    python -m tests.integration.scenario create N [S]  -> prints task ids, one per line
                                                          (S: the sleep step's seconds)
    python -m tests.integration.scenario check ID...   -> prints the problems found (JSON)
    python -m tests.integration.scenario flood N       -> POSTs N tasks to the API; prints
                                                          each answer's status, Retry-After
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

SCRIPT: list[dict[str, Any]] = [
    {"think": "start"},
    {"tool": "ledger.append", "args": {"key": "first", "value": 1}},
    {"sleep": 0.2},
    {"tool": "ledger.append", "args": {"key": "second", "value": 2}},
    {"tool": "calc", "args": {"expression": "1 + 1"}},
    {"final": "done"},
]


def create(n: int, *, owner: Any = None, script: list[dict[str, Any]] = SCRIPT) -> list[str]:
    from agents.services import service_user, task_start

    owner = owner or service_user("recovery")
    return [
        str(task_start(owner=owner, agent="scripted", input={"script": script})[0].pk)
        for _ in range(n)
    ]


def finished(ids: Iterable[str]) -> bool:
    from agents.models import AgentTask

    ids = list(ids)
    done = AgentTask.objects.filter(pk__in=ids, status="completed").count()
    return done == len(ids)


def check(ids: Iterable[str], *, script: list[dict[str, Any]] = SCRIPT) -> list[str]:
    """Every problem with the tasks: not completed, a step missing, doubled or out of
    order, an audit gap, a side effect missing or done twice. Empty when all is well."""
    from agents.models import AgentTask, Checkpoint
    from audit.models import AuditEvent
    from tools.models import LedgerEntry

    ids = list(ids)
    steps = len(script)
    ledger_steps = [i + 1 for i, e in enumerate(script) if e.get("tool") == "ledger.append"]
    problems = []
    found = {str(t.pk): t for t in AgentTask.objects.filter(pk__in=ids)}
    for task_id in ids:
        task = found.get(task_id)
        if task is None:
            problems.append(f"{task_id}: lost")
            continue
        if task.status != "completed":
            problems.append(f"{task_id}: {task.status} at step {task.current_step}")
        checkpoints = list(
            Checkpoint.objects.filter(task=task).order_by("step").values_list("step", flat=True)
        )
        if checkpoints != list(range(steps + 1)):
            problems.append(f"{task_id}: checkpoints {checkpoints}")
        trail = list(AuditEvent.objects.filter(task=task).order_by("seq"))
        if [e.seq for e in trail] != list(range(1, len(trail) + 1)):
            problems.append(f"{task_id}: audit sequence has gaps")
        committed = [e.step for e in trail if e.type == "step"]
        if committed != list(range(1, steps + 1)):
            problems.append(f"{task_id}: committed steps {committed}")
        numbered = [e.step for e in trail if e.step is not None]
        if numbered != sorted(numbered):
            problems.append(f"{task_id}: audit steps out of order")
        keys = sorted(
            LedgerEntry.objects.filter(task=task).values_list("idempotency_key", flat=True)
        )
        if keys != sorted(f"{task_id}:{s}:0" for s in ledger_steps):
            problems.append(f"{task_id}: ledger rows {keys}")
    return problems


def flood(n: int) -> list[tuple[int, str | None]]:
    """Create ``n`` tasks through the REST API, as one user, without any worker."""
    from rest_framework.test import APIClient

    from agents.services import service_user

    client = APIClient(SERVER_NAME="localhost")
    client.force_authenticate(service_user("flood"))
    answers = []
    for _ in range(n):
        response = client.post(
            "/api/tasks/", {"agent": "scripted", "input": {"script": [{"final": 1}]}}, format="json"
        )
        answers.append((response.status_code, response.headers.get("Retry-After")))
    return answers


def run(env: dict[str, str], *args: str) -> str:
    """``python -m tests.integration.scenario ARGS`` with ``env``; its output."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "tests.integration.scenario", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agents_project.settings")
    import django

    django.setup()
    command, *rest = argv
    if command == "create":
        # create N [SLEEP]: the script's sleep step takes SLEEP seconds (same steps).
        sleep = float(rest[1]) if len(rest) > 1 else None
        script = [{"sleep": sleep} if "sleep" in e and sleep else e for e in SCRIPT]
        print("\n".join(create(int(rest[0]), script=script)))
    elif command == "finished":
        print(json.dumps(finished(rest)))
    elif command == "check":
        print(json.dumps(check(rest)))
    elif command == "flood":
        print(json.dumps(flood(int(rest[0]))))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
