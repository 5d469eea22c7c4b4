"""Operator commands of the runbook, run as an operator would."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from tests.helpers import publishes_refused, queue_depth, run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def test_resume_stuck_lists_and_republishes_a_task_whose_message_was_lost(user):
    task, _ = task_start(
        owner=user, agent="scripted", input={"script": [{"think": "a"}, {"final": 1}]}
    )
    with publishes_refused():
        run_until_idle(max_messages=1)
    assert queue_depth() == 0
    listing = StringIO()
    call_command("resume_stuck", "--dry-run", stdout=listing)
    assert str(task.pk) in listing.getvalue()
    assert queue_depth() == 0, "a dry run publishes nothing"
    out = StringIO()
    call_command("resume_stuck", stdout=out)
    assert "1 task(s)" in out.getvalue()
    run_until_idle()
    assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED


def test_resume_stuck_says_so_when_nothing_is_stuck():
    out = StringIO()
    call_command("resume_stuck", stdout=out)
    assert "No stuck tasks." in out.getvalue()
