"""Issue 24: retention runs on a schedule in the workers (``agents.worker.RunRetention``):
a real worker archives and removes a task it finished, and leaves a live one alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from audit.archive import archive_verify
from audit.models import AuditEvent, TaskRemoval
from tests.api.factories import APPROVAL, SIMPLE
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_worker_archives_and_removes_finished_tasks_on_its_schedule(user, workers, tmp_path):
    folder = tmp_path / "archive"
    workers.start(
        AGENTS_RETENTION=json.dumps(
            {"default": {"mode": "archive_and_remove", "archive_after_days": 0}, "interval": 1}
        ),
        AGENTS_ARCHIVE_OPTIONS=json.dumps({"location": str(folder), "allow_overwrite": True}),
    )
    waiting, _ = task_start(owner=user, agent="scripted", input=APPROVAL)
    done, _ = task_start(owner=user, agent="scripted", input=SIMPLE)
    record = wait_until(
        lambda: TaskRemoval.objects.filter(task_id=done.pk).first(), timeout=60, interval=0.5
    )
    assert not AgentTask.objects.filter(pk=done.pk).exists()
    assert record.actor.startswith("retention:")
    with open(Path(folder) / record.archive, "rb") as source:
        report = archive_verify(source)
    assert report.breaks == [] and report.verified == record.head_seq
    waiting.refresh_from_db()
    assert waiting.status == TaskStatus.SUSPENDED
    assert AuditEvent.objects.filter(task=waiting).count() == waiting.audit_seq
