"""Issue 24: retention and archival that keep the audit guarantee.

Finished tasks made by the real runtime (the scripted agent, run by the in-process
worker on the real queue) are archived to a real FileSystemStorage, verified from the
archive alone, and removed from the hot tables; the removal is recorded in a chained,
append-only record; held and live tasks are never touched; a run killed between
archive and delete (a real SIGKILL at a fault point) resumes without loss or duplicate.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.files.storage import FileSystemStorage
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from agents.core.suspensions import task_cancel
from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.retention import candidates, retention_run, task_legal_hold_set
from audit.anchor import _signature, anchor_line, anchor_make
from audit.archive import archive_verify
from audit.integrity import audit_keys
from audit.models import AuditEvent, DeadLetter, EventType, TaskRemoval
from tests.agents_project.test_metrics import counted, scrape
from tests.api.factories import completed, dead_lettered, run, started, waiting_for_approval
from tests.audit.test_app_role import app_role  # noqa: F401, F811 - a fixture
from tests.helpers import worker_env
from tools.models import LedgerEntry

pytestmark = pytest.mark.django_db(transaction=True)

REMOVE = {"default": {"mode": "archive_and_remove", "archive_after_days": 0}, "batch": 50}
LEDGER = {
    "script": [
        {"think": "pay"},
        {"tool": "ledger.append", "args": {"key": "refund", "value": 42}},
        {"final": "paid"},
    ]
}


@pytest.fixture
def storage(tmp_path: Path) -> FileSystemStorage:
    return FileSystemStorage(location=str(tmp_path / "archive"), allow_overwrite=True)


def policy(config: dict[str, Any]) -> Any:
    return override_settings(AGENTS={**settings.AGENTS, "RETENTION": config})


def archives(storage: FileSystemStorage) -> list[Path]:
    return sorted(Path(storage.location).rglob("*.jsonl.gz"))


def refused(sql: str, params: list | None = None, *, match: str) -> None:
    """``sql`` fails with a database error matching ``match`` (and changes nothing)."""
    with (
        pytest.raises(DatabaseError, match=match),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, params)


def rows_of(task_id: Any) -> dict[str, int]:
    return {
        "task": AgentTask.objects.filter(pk=task_id).count(),
        "checkpoints": Checkpoint.objects.filter(task_id=task_id).count(),
        "events": AuditEvent.objects.filter(task_id=task_id).count(),
        "ledger": LedgerEntry.objects.filter(task_id=task_id).count(),
    }


def test_a_finished_task_is_archived_verified_and_removed_with_a_removal_record(user, storage):
    task = run(user, LEDGER, TaskStatus.COMPLETED)
    before = rows_of(task.pk)
    assert before["ledger"] == 1 and before["events"] == task.audit_seq > 5
    with policy(REMOVE):
        report = retention_run(storage=storage)
    assert report.removed == [str(task.pk)]
    assert rows_of(task.pk) == {"task": 0, "checkpoints": 0, "events": 0, "ledger": 0}

    [path] = archives(storage)
    assert path.name == f"{task.pk}.{task.audit_seq}.jsonl.gz"
    with gzip.open(path) as source:
        lines = [json.loads(line) for line in source]
    kinds = [line["record"] for line in lines]
    assert kinds[0] == "archive" and kinds[1] == "agents.agenttask" and kinds[-1] == "end"
    assert kinds.count("audit.auditevent") == before["events"]
    assert kinds.count("agents.checkpoint") == before["checkpoints"]
    assert kinds.count("tools.ledgerentry") == 1
    event = next(line["fields"] for line in lines if line["record"] == "audit.auditevent")
    assert len(event["hash"]) == 64 and int(event["hash"], 16) >= 0

    record = TaskRemoval.objects.get(task_id=task.pk)
    for sql in ("DELETE FROM audit_taskremoval", "UPDATE audit_taskremoval SET owner = 'x'"):
        refused(sql, match="append-only")
    assert record.archive == str(path.relative_to(storage.location))
    assert record.head_seq == task.audit_seq
    assert record.counts["audit.auditevent"] == before["events"]
    out = StringIO()
    call_command("audit_verify", "--archive", str(path), stdout=out)
    assert f"{before['events']} event(s) verified, 0 break(s)" in out.getvalue()
    out = StringIO()
    call_command("audit_verify", "--all", stdout=out, stderr=StringIO())
    assert "1 removal record(s)" in out.getvalue() and "0 break(s)" in out.getvalue()


def test_retention_is_counted_on_metrics(user, storage, client):
    before = scrape(client)
    completed(user)
    with policy(REMOVE):
        retention_run(storage=storage)
    after = scrape(client)
    name = "agents_retention_tasks_total"
    assert counted(after, name, outcome="removed") - counted(before, name, outcome="removed") == 1


def test_live_and_held_tasks_are_never_touched(user, storage):
    waiting = waiting_for_approval(user)
    held = completed(user)
    task_legal_hold_set(task_id=held.pk, held=True, reason="litigation 7")
    done = completed(user)
    pending = started(user)  # published, not run: pending
    assert pending.status == TaskStatus.PENDING
    live = {t.pk: rows_of(t.pk) for t in (waiting, pending, held)}
    with policy(REMOVE):
        report = retention_run(storage=storage)
    assert report.removed == [str(done.pk)]
    assert {pk: rows_of(pk) for pk in live} == live
    assert AuditEvent.objects.filter(task=held, type=EventType.LEGAL_HOLD).get().payload == {
        "held": True,
        "reason": "litigation 7",
    }
    # Not even a direct DELETE gets past the database's own guard.
    for task in (held, waiting):
        refused(
            "DELETE FROM agents_agenttask WHERE id = %s",
            [task.pk],
            match="legal hold|only finished tasks",
        )
    # Released, it goes on the next run.
    call_command("retention", "release", str(held.pk), "--reason", "settled", stdout=StringIO())
    with policy(REMOVE):
        assert retention_run(storage=storage).removed == [str(held.pk)]


def test_audit_events_cannot_be_deleted_outside_the_removal_path(user):
    task = completed(user)
    refused("DELETE FROM audit_auditevent WHERE task_id = %s", [task.pk], match="append-only")
    refused("SELECT audit_events_remove(%s)", [task.pk], match="no removal record")
    assert AuditEvent.objects.filter(task=task).count() == task.audit_seq


def test_policies_per_agent_and_owner_and_age(user, other_user, storage):
    mine = completed(user)
    theirs = completed(other_user)
    config = {
        "default": {"mode": "archive_and_remove", "archive_after_days": 30},
        "owners": {other_user.username: {"archive_after_days": 0}},
    }
    with policy(config):
        assert list(candidates().values_list("pk", flat=True)) == [theirs.pk]
        out = StringIO()
        call_command("retention", "--dry-run", stdout=out)
        assert f"would archive_and_remove: {theirs.pk}" in out.getvalue()
        assert AgentTask.objects.filter(pk=theirs.pk).exists()  # a dry run changes nothing
        AgentTask.objects.filter(pk=mine.pk).update(
            finished_at=mine.finished_at - timedelta(days=31)
        )
        assert set(candidates().values_list("pk", flat=True)) == {mine.pk, theirs.pk}
    with policy({**config, "agents": {"scripted": {"mode": "keep"}}}):
        # The owner's policy overrides the agent's field by field: theirs keeps mode
        # "keep" from the agent's rule, mine too.
        assert not candidates().exists()


def test_keep_latest_keeps_the_task_and_its_latest_checkpoint(user, storage):
    task = completed(user)
    steps = list(Checkpoint.objects.filter(task=task).values_list("step", flat=True))
    assert len(steps) > 2
    with policy({"default": {"mode": "keep_latest", "archive_after_days": 0}}):
        assert retention_run(storage=storage).pruned == [str(task.pk)]
        assert retention_run(storage=storage).pruned == []  # nothing left to prune
    assert list(Checkpoint.objects.filter(task=task).values_list("step", flat=True)) == [max(steps)]
    event = AuditEvent.objects.filter(task=task).order_by("-seq").first()
    assert event.type == EventType.CHECKPOINTS_REMOVED
    assert event.payload["removed"] == len(steps) - 1
    [path] = archives(storage)
    with open(path, "rb") as source:
        assert archive_verify(source).counts["agents.checkpoint"] == len(steps)
    out = StringIO()
    call_command("audit_verify", str(task.pk), stdout=out, stderr=StringIO())
    assert "0 break(s)" in out.getvalue()


def _archived(user, storage) -> tuple[Path, AgentTask]:
    task = completed(user)
    with policy(REMOVE):
        retention_run(storage=storage)
    [path] = archives(storage)
    return path, task


def _rewrite(path: Path, edit) -> None:
    with gzip.open(path) as source:
        lines = source.read().decode().splitlines()
    lines = edit(lines)
    with gzip.open(path, "wb") as out:
        out.write(("\n".join(lines) + "\n").encode())


def _event_index(lines: list[str], seq: int) -> int:
    return next(
        i
        for i, line in enumerate(lines)
        if '"audit.auditevent"' in line and json.loads(line)["fields"]["seq"] == seq
    )


def _broken(path: Path) -> str:
    err = StringIO()
    with pytest.raises(CommandError, match="archive broken"):
        call_command("audit_verify", "--archive", str(path), stdout=StringIO(), stderr=err)
    return err.getvalue()


def test_an_edited_event_in_an_archive_is_found(user, storage):
    path, task = _archived(user, storage)

    def edit(lines):
        i = _event_index(lines, 2)
        record = json.loads(lines[i])
        record["fields"]["actor"] = "user:mallory"
        lines[i] = json.dumps(record)
        return lines

    _rewrite(path, edit)
    assert f"task {task.pk}: event #2: its content does not match its hash (changed)" in _broken(
        path
    )


def test_a_dropped_event_in_an_archive_is_found(user, storage):
    path, task = _archived(user, storage)
    _rewrite(
        path, lambda lines: lines[: _event_index(lines, 3)] + lines[_event_index(lines, 3) + 1 :]
    )
    report = _broken(path)
    assert f"task {task.pk}: event #4: events #3 are missing (removed) [removed]" in report


def test_an_inserted_event_in_an_archive_is_found(user, storage):
    path, task = _archived(user, storage)

    def insert(lines):
        i = _event_index(lines, 2)
        copy = json.loads(lines[i])
        copy["fields"]["payload"] = {"approved": True}
        return lines[: i + 1] + [json.dumps(copy)] + lines[i + 1 :]

    _rewrite(path, insert)
    assert f"task {task.pk}: event #2: a second event with this number (inserted)" in _broken(path)


def test_a_cut_archive_is_found(user, storage):
    path, task = _archived(user, storage)
    _rewrite(path, lambda lines: lines[:-3])
    assert "ends before its end record (cut)" in _broken(path)


def test_show_prints_the_archived_trail(user, storage):
    path, task = _archived(user, storage)
    out = StringIO()
    call_command("retention", "show", str(path), stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert f"task {task.pk}  scripted" in text and "archive intact" in text
    assert "pending -> running" in text and "running -> completed" in text


def _run_killed_at(point: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **worker_env(),
        "AGENTS_FAULT_INJECTION": point,
        "AGENTS_ENVIRONMENT": "test",
        "AGENTS_RETENTION": json.dumps(REMOVE),
        "AGENTS_ARCHIVE_OPTIONS": json.dumps(
            {"location": os.environ["RETENTION_TEST_ARCHIVE"], "allow_overwrite": True}
        ),
    }
    return subprocess.run(
        [sys.executable, "manage.py", "retention"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", ["retention_archived", "retention_before_commit"])
def test_a_run_killed_between_archive_and_delete_resumes_without_loss_or_duplicates(
    user, tmp_path, point, monkeypatch
):
    folder = tmp_path / "archive"
    monkeypatch.setenv("RETENTION_TEST_ARCHIVE", str(folder))
    storage = FileSystemStorage(location=str(folder), allow_overwrite=True)
    tasks = [completed(user), completed(user)]
    before = {t.pk: rows_of(t.pk) for t in tasks}

    killed = _run_killed_at(point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # The first task's archive is written; nothing of it (or of the second) is gone.
    [first] = archives(storage)
    written = first.read_bytes()
    assert {t.pk: rows_of(t.pk) for t in tasks} == before
    assert not TaskRemoval.objects.exists()

    with policy(REMOVE):
        report = retention_run(storage=storage)
    assert sorted(report.removed) == sorted(str(t.pk) for t in tasks)
    assert first.read_bytes() == written  # archived again: the same bytes, same name
    assert len(archives(storage)) == 2
    assert TaskRemoval.objects.count() == 2
    assert all(rows_of(t.pk)["events"] == 0 for t in tasks)
    out = StringIO()
    call_command("audit_verify", "--archive", *[str(p) for p in archives(storage)], stdout=out)
    total = sum(b["events"] for b in before.values())
    assert f"2 archive(s), {total} event(s) verified, 0 break(s)" in out.getvalue()


def test_retention_runs_as_the_app_role_which_still_cannot_delete_history(
    user,
    storage,
    app_role,  # noqa: F811 - the imported fixture
):
    call_command("db_app_role", stdout=StringIO())
    task = completed(user)
    other = completed(user)
    with connection.cursor() as cursor:
        cursor.execute(f"SET ROLE {app_role}")
    try:
        with policy({**REMOVE, "batch": 1}):
            report = retention_run(storage=storage)
        refused("DELETE FROM audit_auditevent WHERE task_id = %s", [other.pk], match="denied")
        refused("DELETE FROM audit_taskremoval", match="denied")
        refused("UPDATE audit_taskremoval SET owner = 'x'", match="denied")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")
    assert report.removed == [str(task.pk)]
    assert TaskRemoval.objects.get().task_id == task.pk
    assert AuditEvent.objects.filter(task=other).count() == other.audit_seq


def test_a_legal_hold_needs_its_permission_and_is_audited_through_the_api(user, other_user):
    api_client = APIClient()
    task = completed(user)
    api_client.force_authenticate(user)
    refused_hold = api_client.post(f"/api/tasks/{task.pk}/hold/", {"held": True}, format="json")
    assert refused_hold.status_code == 403  # an owner cannot hold (or release) their own
    other_user.user_permissions.add(Permission.objects.get(codename="hold_agenttask"))
    other_user.user_permissions.add(Permission.objects.get(codename="view_agenttask"))
    api_client.force_authenticate(other_user)
    bad = api_client.post(f"/api/tasks/{task.pk}/hold/", {"held": "maybe"}, format="json")
    assert bad.status_code == 400 and "held" in bad.content.decode()
    held = api_client.post(
        f"/api/tasks/{task.pk}/hold/", {"held": True, "reason": "subpoena"}, format="json"
    )
    assert held.status_code == 200 and held.json()["legal_hold"] is True
    event = AuditEvent.objects.filter(task=task).order_by("-seq").first()
    assert (event.type, event.payload, event.actor) == (
        EventType.LEGAL_HOLD,
        {"held": True, "reason": "subpoena"},
        f"user:{other_user.username}",
    )


def test_an_anchored_head_of_a_removed_task_is_checked_against_its_removal_record(
    user, storage, tmp_path
):
    task = completed(user)
    anchor = anchor_make(after_id=0, now=timezone.now() + timedelta(minutes=1))
    log = tmp_path / "anchors.log"
    log.write_text(anchor_line(anchor) + "\n")
    with policy(REMOVE):
        assert retention_run(storage=storage).removed == [str(task.pk)]
    out = StringIO()
    call_command("audit_verify", "--all", "--anchors", str(log), stdout=out, stderr=StringIO())
    assert "1 anchored head(s) checked, 0 break(s)" in out.getvalue()

    # A removal record whose head is below the anchored one: the tail was cut first.
    forged = dict(anchor)
    forged["heads"] = {str(task.pk): [task.audit_seq + 5, "f" * 64]}
    forged.pop("sig")
    forged["sig"] = _signature(forged, audit_keys()[0])
    log.write_text(anchor_line(forged) + "\n")
    err = StringIO()
    with pytest.raises(CommandError, match="broken"):
        call_command("audit_verify", "--all", "--anchors", str(log), stdout=StringIO(), stderr=err)
    assert "(cut before removal) [cut]" in err.getvalue()


def test_an_archived_task_is_restored_under_legal_hold_with_its_chain_intact(user, storage):
    path, task = _archived(user, storage)
    assert not AgentTask.objects.filter(pk=task.pk).exists()
    out = StringIO()
    call_command("retention", "restore", str(path), stdout=out)
    assert "restored under legal hold" in out.getvalue()
    restored = AgentTask.objects.get(pk=task.pk)
    assert restored.legal_hold and restored.audit_seq == task.audit_seq + 1
    assert Checkpoint.objects.filter(task=restored).count() == task.current_step
    last = AuditEvent.objects.filter(task=restored).order_by("-seq").first()
    assert last.type == EventType.RESTORED and last.payload["archive"] == str(path)
    out = StringIO()
    call_command("audit_verify", str(task.pk), stdout=out, stderr=StringIO())
    assert f"{task.audit_seq + 1} event(s) verified" in out.getvalue()
    with policy(REMOVE):
        assert retention_run(storage=storage).removed == []  # held: it stays
    with pytest.raises(CommandError, match="in the database already"):
        call_command("retention", "restore", str(path), stdout=StringIO())


def test_a_tampered_archive_is_not_restored(user, storage):
    path, task = _archived(user, storage)
    _rewrite(path, lambda lines: lines[:3] + lines[4:])
    with pytest.raises(CommandError, match="does not verify"):
        call_command("retention", "restore", str(path), stdout=StringIO())
    assert not AgentTask.objects.filter(pk=task.pk).exists()
    assert not AuditEvent.objects.filter(task_id=task.pk).exists()


def test_a_task_whose_row_someone_holds_is_skipped_not_waited_for(user, storage):
    task = completed(user)
    locked, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        try:
            with transaction.atomic():
                AgentTask.objects.select_for_update().get(pk=task.pk)
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(10)
        with policy(REMOVE):
            report = retention_run(storage=storage)
        assert (report.removed, report.skipped) == ([], [str(task.pk)])
    finally:
        release.set()
        holder.join()
    assert rows_of(task.pk)["events"] == task.audit_seq
    with policy(REMOVE):
        assert retention_run(storage=storage).removed == [str(task.pk)]


def test_a_cancelled_dead_lettered_task_goes_with_its_dead_letter(user, storage):
    task, letter = dead_lettered(user)
    task_cancel(task_id=task.pk, user=None)
    with policy(REMOVE):
        assert retention_run(storage=storage).removed == [str(task.pk)]
    assert not DeadLetter.objects.filter(pk=letter.pk).exists()
    [path] = archives(storage)
    with open(path, "rb") as source:
        report = archive_verify(source)
    assert report.counts["audit.deadletter"] == 1 and report.breaks == []
    assert TaskRemoval.objects.get(task_id=task.pk).counts["audit.deadletter"] == 1


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ('{"default": {"mode": "delete"}}', "default.mode"),
        (
            '{"agents": {"refunds": {"archive_after_days": -1}}}',
            "agents.refunds.archive_after_days",
        ),
        ('{"owners": {"ann": {"keep": true}}}', "owners.ann.keep"),
        ('{"batch": "many"}', "batch"),
    ],
)
def test_a_bad_retention_setting_stops_start_up_naming_the_key(setting, named):
    env = {**os.environ, "AGENTS_RETENTION": setting}
    started = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert f"AGENTS_RETENTION: {named}" in started.stderr
