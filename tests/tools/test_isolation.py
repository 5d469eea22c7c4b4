"""Two owners' sessions interleaved on the same worker processes and tools.

Neither sees the other's credentials, key-value data or results, a task-scoped
credential is seen by its task alone, and no secret reaches a checkpoint, the audit
trail or the workers' logs.
"""

from __future__ import annotations

import json
from secrets import token_hex
from typing import Any

import pytest

from agents.core.suspensions import task_signal
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_start
from audit.models import AuditEvent
from tests.helpers import wait_until
from tests.tools import session_tools  # noqa: F401  (registers the session.* tools)
from tests.tools.session_tools import digest
from tools.credentials import credential_set

pytestmark = pytest.mark.integration

MASK = "[redacted]"
ROUNDS = 6


def script(owner: str, index: int, url: str) -> list[dict]:
    return [
        {"wait_event": "go"},
        {"tool": "kv.get", "args": {"key": "note", "scope": "owner"}},
        {"tool": "kv.get", "args": {"key": "mine"}},
        {"tool": "kv.set", "args": {"key": "note", "value": owner, "scope": "owner"}},
        {"tool": "kv.set", "args": {"key": "mine", "value": f"{owner}-{index}"}},
        {"tool": "http.get", "args": {"url": f"{url}/whoami/{owner}/{index}", "bearer": "api_key"}},
        {"tool": "session.peek"},
        {"tool": "kv.get", "args": {"key": "note", "scope": "owner"}},
        {"tool": "kv.get", "args": {"key": "mine"}},
        {"final": "done"},
    ]


def results(task: AgentTask) -> dict[int, Any]:
    """What each tool step returned, by step, as the next step saw it (the checkpoint)."""
    out = {}
    for checkpoint in Checkpoint.objects.filter(task=task).order_by("step"):
        for result in checkpoint.observations.get("tool_results", []):
            out[checkpoint.step] = result["value"]
    return out


def test_two_owners_interleaved_on_shared_workers_never_see_each_other(
    workers, user, other_user, flaky, loopback_allowed
):
    owners = {"alice": user, "bob": other_user}
    secrets = {name: f"{name}-sk-{token_hex(16)}" for name in owners}
    for name, owner in owners.items():
        credential_set(
            owner=owner, name="api_key", value=secrets[name], any_host=True, actor="test"
        )
    for _ in range(2):
        workers.start(concurrency=3, AGENTS_MODULES="tests.tools.session_tools", **loopback_allowed)

    # Alternate owners so that both run side by side on the same processes.
    tasks: list[tuple[str, int, AgentTask]] = []
    for index in range(ROUNDS):
        for name, owner in owners.items():
            input = {"script": script(name, index, flaky.url(""))}
            tasks.append((name, index, task_start(owner=owner, agent="scripted", input=input)[0]))
    # One of alice's tasks also has a credential of its own, which no other task sees.
    special = tasks[0][2]
    credential_set(
        owner=user,
        name="task_only",
        value=f"t-{token_hex(8)}",
        task_id=special.pk,
        any_host=True,
        actor="test",
    )
    for _, _, task in tasks:
        task_signal(task_id=task.pk, user=None, name="go")

    ids = [task.pk for _, _, task in tasks]

    def all_done() -> bool:
        statuses = set(AgentTask.objects.filter(pk__in=ids).values_list("status", flat=True))
        return statuses <= {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD_LETTERED}

    wait_until(all_done, timeout=120)
    actors: dict[str, set[str]] = {name: set() for name in owners}
    for name, index, task in tasks:
        task.refresh_from_db()
        assert task.status == TaskStatus.COMPLETED, (name, index, task.error)
        other = next(n for n in owners if n != name)
        seen = results(task)
        # Before this task wrote anything: the owner store may hold this owner's note
        # from a sibling task, never the other owner's; the task store is empty.
        assert seen[2]["value"] in (None, name), seen[2]
        assert seen[2]["value"] != other
        assert seen[3]["found"] is False
        assert seen[6]["status"] == 200
        peek = seen[7]
        expected = {"api_key": secrets[name]}
        if task.pk == special.pk:
            expected["task_only"] = credential_value(special)
        assert peek["names"] == sorted(expected)
        assert peek["digests"] == sorted([k, digest(v)] for k, v in expected.items())
        assert peek["raw"] == MASK
        assert seen[8]["value"] == name
        assert seen[9]["value"] == f"{name}-{index}"
        actors[name].update(
            AuditEvent.objects.filter(task=task, type="tool_result").values_list("actor", flat=True)
        )

    # The service saw each task's own owner's key, and only that.
    for request in flaky.requests:
        _, _, owner, _ = request.path.split("/")
        assert request.authorization == f"Bearer {secrets[owner]}"
    assert len(flaky.requests) == len(tasks)
    assert actors["alice"] & actors["bob"], "both owners' tasks ran on the same workers"

    stored = json.dumps(
        {
            "checkpoints": list(
                Checkpoint.objects.filter(task__in=ids).values("state", "observations")
            ),
            "audit": list(AuditEvent.objects.filter(task__in=ids).values("payload")),
        },
        default=str,
    )
    logs = "".join(path.read_text(errors="replace") for path, _ in workers.logs)
    for secret in secrets.values():
        assert secret not in stored
        assert secret not in logs
    assert "session.peek read a credential" in logs
    assert MASK in logs


def credential_value(task: AgentTask) -> str:
    from tools.credentials import credentials_for_task

    return credentials_for_task(task_id=task.pk, owner_id=task.owner_id)["task_only"]
