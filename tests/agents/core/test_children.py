"""Child tasks, in-process: the cost of a fan-out, the join's results, bad spawns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from agents.core.children import child_id, orphans_cancel
from agents.core.engine import step_execute
from agents.core.results import StepResult
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import task_replay, task_start
from agents_project.errors import InvalidInput
from audit.models import AuditEvent
from audit.timeline import describe, render
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def _fan_out(user, n: int, join: object = "all") -> AgentTask:
    children = [{"agent": "scripted", "input": {"script": [{"final": i}]}} for i in range(n)]
    task, _ = task_start(
        owner=user,
        agent="scripted",
        input={"script": [{"think": "go"}, {"spawn": children, "join": join}]},
    )
    assert step_execute(task_id=task.pk, step=1) == StepResult.COMMITTED
    return task


def _statements_of_spawn(user, n: int) -> list[str]:
    task = _fan_out(user, n)
    with CaptureQueriesContext(connection) as queries:
        assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    assert AgentTask.objects.filter(parent=task).count() == n
    return [q["sql"].split()[0].upper() for q in queries.captured_queries]


def test_a_fan_out_of_100_children_is_as_many_statements_as_one(user):
    one = _statements_of_spawn(user, 1)
    hundred = _statements_of_spawn(user, 100)
    # One step's work whatever the number: the tasks, their checkpoints and their
    # ``created`` events one INSERT each, one statement taking their creation locks.
    print(f"statements: 1 child {len(one)}, 100 children {len(hundred)}")
    assert len(hundred) == len(one), (one, hundred)
    assert len(hundred) <= 15, hundred  # measured: 15


def test_children_results_reach_the_parent_in_spawn_order(user):
    task = _fan_out(user, 5)
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == [0, 1, 2, 3, 4]
    ids = list(
        AgentTask.objects.filter(parent=task).order_by("spawn_index").values_list("pk", flat=True)
    )
    assert ids == [child_id(parent_id=task.pk, step=2, index=i) for i in range(5)]
    assert AuditEvent.objects.filter(task=task, type="child_ended").count() == 5
    trail = render(AuditEvent.objects.filter(task=task).order_by("seq"))
    assert "started 5 children (scripted), join all" in trail
    assert "waits for children: join all" in trail
    assert f"child 4 {ids[4]} (scripted) completed" in trail
    created = AuditEvent.objects.get(task_id=ids[4], type="created")
    assert describe(created).endswith(f"accepted, child 4 of {task.pk}")


def test_a_join_of_n_yields_the_completed_results(user):
    children = [
        {"agent": "scripted", "input": {"script": [{"final": "a"}]}},
        {"agent": "scripted", "input": {"script": [{"wait_event": "never"}]}},
        {"agent": "scripted", "input": {"script": [{"final": "c"}]}},
    ]
    task, _ = task_start(
        owner=user, agent="scripted", input={"script": [{"spawn": children, "join": 2}]}
    )
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == ["a", "c"]
    waiting = AgentTask.objects.get(parent=task, spawn_index=1)
    assert waiting.status == TaskStatus.CANCELLED


def test_a_step_that_runs_again_after_its_commit_starts_no_second_child(user):
    task = _fan_out(user, 3)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    # The same delivery again (a redelivered message): the step is not current.
    assert step_execute(task_id=task.pk, step=2) == StepResult.STALE
    assert AgentTask.objects.filter(parent=task).count() == 3
    assert Checkpoint.objects.filter(task__parent=task, step=0).count() == 3


@pytest.mark.parametrize(
    ("spawn", "field"),
    [
        ({"spawn": []}, "input.script[0].spawn"),
        ({"spawn": [{"agent": "nope"}]}, "input.script[0].spawn[0].agent"),
        ({"spawn": [{"agent": "scripted", "input": {}}]}, "input.script[0].spawn[0].input.script"),
        (
            {"spawn": [{"agent": "scripted", "input": {"script": [{"final": 1}]}}], "join": 2},
            "input.script[0].join",
        ),
        ({"spawn": [{"agent": "scripted", "extra": 1}]}, "input.script[0].spawn[0].extra"),
    ],
)
def test_a_bad_spawn_is_refused_naming_the_field_and_leaves_nothing(user, spawn, field):
    with pytest.raises(InvalidInput) as refused:
        task_start(owner=user, agent="scripted", input={"script": [spawn]})
    assert refused.value.field == field
    assert not AgentTask.objects.exists()


def test_the_readme_example_runs_as_written(user):
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## Sub-agents and fan-out", 1)[1]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    task, _ = task_start(owner=user, agent=example["agent"], input=example["input"])
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == [42, "the weather is fine"]


def test_children_belong_to_the_parents_owner_and_wait_for_its_admission(settings, user):
    settings.AGENTS = {**settings.AGENTS, "OWNER_MAX_RUNNING": 1}
    task = _fan_out(user, 3)
    assert step_execute(task_id=task.pk, step=2) == StepResult.COMMITTED
    children = AgentTask.objects.filter(parent=task)
    assert {c.owner_id for c in children} == {user.pk}
    # The parent was running at its spawn (it counts), so all wait for admission; once it
    # is suspended it counts no more, and the scheduler admits them one at a time.
    assert set(children.values_list("queued_for_admission", flat=True)) == {True}
    run_until_idle()
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == [0, 1, 2]


def test_the_scheduler_cancels_children_that_outlived_their_parent(user):
    child = {"agent": "scripted", "input": {"script": [{"wait_event": "never"}]}}
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"spawn": [child]}]})
    run_until_idle()
    # As if the parent's process died between its ending's commit and the cascade.
    AgentTask.objects.filter(pk=task.pk).update(status=TaskStatus.CANCELLED)
    assert AgentTask.objects.get(parent=task).status == TaskStatus.SUSPENDED
    assert orphans_cancel(actor="scheduler:test") == 1
    assert AgentTask.objects.get(parent=task).status == TaskStatus.CANCELLED
    assert orphans_cancel(actor="scheduler:test") == 0


def test_a_replay_after_the_join_reuses_the_finished_children(user):
    task = _fan_out(user, 2)
    run_until_idle()
    replay = task_replay(task_id=task.pk, user=user, from_step=2)
    run_until_idle()
    replay.refresh_from_db()
    assert replay.status == TaskStatus.COMPLETED
    assert replay.result == [0, 1]
    assert not AgentTask.objects.filter(parent=replay).exists()
    assert AgentTask.objects.filter(parent=task).count() == 2


def test_the_scheduler_finds_orphans_on_the_live_children_index(user):
    """The orphan sweep runs on every tick: it reads the partial index of live children,
    not every live or dead-lettered task (a plan, not a time)."""
    from agents.core.children import orphan_parents

    query = orphan_parents()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        sql, params = query.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "agent_task_live_children" in plan, plan
    # The index's own condition, so the planner may start there whatever the parents'
    # side looks like (at a million tasks it otherwise walked every task by created_at).
    assert '"agents_agenttask"."parent_id" IS NOT NULL' in sql, sql
