"""``replay`` and ``requeue_dead_letters``: thin commands over the services."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from agents.models import AgentTask, TaskStatus
from audit.models import AuditEvent, DeadLetter
from tests.api.factories import completed, dead_lettered
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_replay_from_a_step_prints_the_new_task(user):
    original = completed(user)
    out, err = command("replay", str(original.pk), "--from-step", "1")
    replay = AgentTask.objects.get(pk=out.strip())
    assert (replay.replayed_from_id, replay.replayed_from_step) == (original.pk, 1)
    assert "from checkpoint 1" in err
    assert AuditEvent.objects.filter(task=replay, type="replayed_from").count() == 1
    run_until_idle()
    replay.refresh_from_db()
    assert replay.status == TaskStatus.COMPLETED and replay.owner == user


def test_replay_errors_name_the_field(user):
    original = completed(user)
    with pytest.raises(CommandError, match="from_step: .*no checkpoint 99"):
        command("replay", str(original.pk), "--from-step", "99")
    with pytest.raises(CommandError, match="no task"):
        command("replay", "not-a-task")


def test_requeue_one_tasks_dead_letter(user):
    task, letter = dead_lettered(user)
    out, err = command("requeue_dead_letters", "--task", str(task.pk))
    assert out.strip() == str(task.pk) and "1 requeued" in err
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING
    assert DeadLetter.objects.get(pk=letter.pk).requeued_by.startswith("cli:")
    with pytest.raises(CommandError, match="no open dead letter"):
        command("requeue_dead_letters", "--task", str(task.pk))


def test_requeue_all_and_listing(user, other_user):
    first, _ = dead_lettered(user)
    second, _ = dead_lettered(other_user)
    listing, note = command("requeue_dead_letters")
    assert str(first.pk) in listing and str(second.pk) in listing
    assert "2 open dead letter(s)" in note
    out, _ = command("requeue_dead_letters", "--all")
    assert set(out.split()) == {str(first.pk), str(second.pk)}
    statuses = set(AgentTask.objects.values_list("status", flat=True))
    assert statuses == {TaskStatus.RUNNING}


def test_task_and_all_are_exclusive():
    with pytest.raises(CommandError):
        command("requeue_dead_letters", "--all", "--task", "x")
