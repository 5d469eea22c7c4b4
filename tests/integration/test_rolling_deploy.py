"""A rolling deploy with real workers of two code versions of one agent.

Workers of version 1 and 2 (``tests.integration.versioned_v1`` / ``_v2``: the same
agent name, different state schemas, 2 not declaring 1 compatible) share one queue.
Every step records the version that ran it, so "never on the wrong code" is checked on
every step of every task, not sampled.
"""

from __future__ import annotations

import signal
from io import StringIO

import pytest
from django.core.management import call_command

from agents.core.suspensions import task_signal
from agents.core.versions import intake_shares, live_workers
from agents.definition import _REGISTRY, register
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import service_user, task_start
from audit.models import AuditEvent
from tests.helpers import wait_until
from tests.integration import versioned_v1, versioned_v2

pytestmark = pytest.mark.django_db(transaction=True)

V1 = {"AGENTS_MODULES": "tests.integration.versioned_v1", "AGENTS_WORKER_TTL": "10"}
V2 = {"AGENTS_MODULES": "tests.integration.versioned_v2", "AGENTS_WORKER_TTL": "10"}


@pytest.fixture
def api_code(settings):
    """The code of the process that accepts tasks (the API's), as a deploy swaps it."""
    settings.AGENTS = {**settings.AGENTS, "WORKER_TTL": 10.0, "VERSION_RAMP": {}}

    def deploy(cls):
        register(cls)

    deploy(versioned_v1.DeployedV1)
    yield deploy
    _REGISTRY.pop("deployed", None)


def serving(version: str) -> int:
    return live_workers(agent="deployed").filter(version=version).count()


def start(owner, count: int) -> list[AgentTask]:
    return [task_start(owner=owner, agent="deployed", input={})[0] for _ in range(count)]


def waiting(tasks: list[AgentTask]) -> bool:
    return all(AgentTask.objects.get(pk=t.pk).status == TaskStatus.SUSPENDED for t in tasks)


def finished(tasks: list[AgentTask]) -> bool:
    return all(AgentTask.objects.get(pk=t.pk).status == TaskStatus.COMPLETED for t in tasks)


def go(owner, tasks: list[AgentTask]) -> None:
    for task in tasks:
        task_signal(task_id=task.pk, user=owner, name="go")


def refused_for_version(tasks: list[AgentTask]) -> set[str]:
    """Tasks whose trail says a step was refused for its version."""
    return {
        str(e.task_id)
        for e in AuditEvent.objects.filter(task__in=tasks, type="schema_refused")
        if "runs deployed version 1; this worker serves version 2" in e.payload["reason"]
    }


def versions_ran(task: AgentTask) -> set[str]:
    return set(AgentTask.objects.get(pk=task.pk).result["ran"])


def test_tasks_finish_on_their_version_through_a_deploy_a_ramp_and_a_rollback(
    workers, api_code, settings
):
    owner = service_user("deployer")
    workers.start(concurrency=2, **V1)
    wait_until(lambda: serving("1") == 1)
    old = start(owner, 4)
    assert {t.agent_version for t in old} == {"1"}
    wait_until(lambda: waiting(old))

    # The deploy: a v2 worker starts, the v1 worker stops (SIGTERM, as Kubernetes does).
    workers.start(concurrency=2, **V2)
    wait_until(lambda: serving("2") == 1)
    workers.processes[0].send_signal(signal.SIGTERM)
    workers.processes[0].wait(timeout=60)
    wait_until(lambda: serving("1") == 0)

    # The v1 tasks go on, but only a v2 worker is left: they wait, parked, visibly.
    go(owner, old)
    wait_until(lambda: len(refused_for_version(old)) == len(old))
    assert all(AgentTask.objects.get(pk=t.pk).status == TaskStatus.RUNNING for t in old)
    listing = StringIO()
    call_command("versions", "deployed", stdout=listing)
    assert "NO LIVE WORKER" in listing.getvalue(), listing.getvalue()

    # New tasks go to the newest version served, and finish there.
    new = start(owner, 4)
    assert {t.agent_version for t in new} == {"2"}
    wait_until(lambda: waiting(new))
    go(owner, new)
    wait_until(lambda: finished(new), timeout=60)
    assert all(versions_ran(t) == {"2"} for t in new)
    assert all(AgentTask.objects.get(pk=t.pk).status == TaskStatus.RUNNING for t in old)

    # An old worker is brought back to drain version 1: its tasks finish on it.
    workers.start(concurrency=2, **V1)
    wait_until(lambda: finished(old), timeout=90)
    assert all(versions_ran(t) == {"1"} for t in old), [versions_ran(t) for t in old]

    # A ramp: half of the new tasks to version 2 (the API now runs version 2's code).
    api_code(versioned_v2.DeployedV2)
    settings.AGENTS = {**settings.AGENTS, "VERSION_RAMP": {"deployed": {"2": 50}}}
    assert intake_shares(agent="deployed") == {"1": 50.0, "2": 50.0}
    ramped = start(owner, 30)
    split = {v: sum(t.agent_version == v for t in ramped) for v in ("1", "2")}
    assert split["1"] > 0 and split["2"] > 0, split

    # The rollback, one step: version 2 takes no new tasks; its running tasks finish on it.
    call_command("versions", "--rollback", "deployed", "2", stdout=StringIO())
    after = start(owner, 6)
    assert {t.agent_version for t in after} == {"1"}
    everything = [*ramped, *after]
    wait_until(lambda: waiting(everything), timeout=90)
    go(owner, everything)
    try:
        wait_until(lambda: finished(everything), timeout=240)
    finally:
        for t in everything:
            row = AgentTask.objects.get(pk=t.pk)
            if row.status != TaskStatus.COMPLETED:
                print(
                    "DBG",
                    row.pk,
                    row.agent_version,
                    row.status,
                    row.current_step,
                    row.in_flight,
                    row.needs_state_version,
                    row.lease_expires_at,
                    row.error,
                    [e.payload for e in AuditEvent.objects.filter(task=row, type="schema_refused")],
                )
    for task in everything:
        assert versions_ran(task) == {AgentTask.objects.get(pk=task.pk).agent_version}
    # The version-1 tasks were accepted by version 2's code: their checkpoint 0 was left
    # for version 1 to compute (schema 0), which it did rather than refuse the step.
    assert all(versions_ran(t) == {"1"} for t in after)
    assert {c.schema_version for c in Checkpoint.objects.filter(task__in=after, step=0)} == {0}
    listing = StringIO()
    call_command("versions", "deployed", stdout=listing)
    assert "held" in listing.getvalue()


def test_a_new_worker_announces_its_versions_before_it_consumes(workers, api_code):
    """Issue 22, item 7: a task created as soon as a version 2 worker consumes is pinned
    to version 2. The worker's scheduler ticks only every 60 s here, so only the
    announcement made at start (before the consumer) can tell the API about it."""
    owner = service_user("deployer")
    workers.start(concurrency=1, **V1)
    wait_until(lambda: serving("1") == 1)
    api_code(versioned_v2.DeployedV2)
    workers.start(concurrency=1, AGENTS_SCHEDULER_INTERVAL="60", CELERY_LOG_LEVEL="INFO", **V2)
    log = workers.logs[1][0]
    wait_until(lambda: log.exists() and b"ready." in log.read_bytes(), timeout=60)
    assert serving("2") == 1, "the worker consumes, and nobody knows its version"
    [task] = start(owner, 1)
    assert task.agent_version == "2"
