"""Issue 23, item 1: tampering that kept the chain consistent is found.

(a) An edited event whose hash, and every later one's, is blanked used to pass as
"written before the chain": the chain's start is recorded, so it is ``unsealed``.
(b) Deleting a task's last events and lowering its count left a shorter, consistent
chain: the heads anchored outside the database (``audit_anchor``) show it ``cut``.
Keys rotate (``AGENTS_AUDIT_KEY=NEW,OLD``) without breaking older events.
"""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from agents.models import AgentTask
from audit.anchor import anchor_line, anchor_make
from audit.models import AuditChainStart, AuditEvent
from tests.api.factories import completed

pytestmark = pytest.mark.django_db(transaction=True)


def owner_sql(sql: str, params: list) -> None:
    """What the tables' owner can do: disable the append-only trigger and rewrite."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(sql, params)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")


def verify(*args: str) -> str:
    out = StringIO()
    call_command("audit_verify", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def broken(*args: str) -> str:
    err = StringIO()
    with pytest.raises(CommandError, match="audit trail broken") as refused:
        call_command("audit_verify", *args, stdout=StringIO(), stderr=err)
    return err.getvalue() + str(refused.value)


def anchor_now(path) -> None:
    """Anchor every event so far (as ``audit_anchor --lag 0`` does)."""
    call_command("audit_anchor", "--to", str(path), "--lag", "0", stdout=StringIO())


def test_a_forged_event_with_blanked_hashes_is_unsealed_not_before_the_chain(user):
    task = completed(user)
    AuditChainStart.objects.all().delete()
    AuditChainStart.objects.create(unchained_through_id=0)
    owner_sql(
        "UPDATE audit_auditevent SET payload = %s WHERE task_id = %s AND seq = 2",
        [json.dumps({"result": "FORGED-999"}), task.pk],
    )
    owner_sql(
        "UPDATE audit_auditevent SET hash = '' WHERE task_id = %s AND seq >= 2",
        [task.pk],
    )
    report = broken(str(task.pk))
    assert f"task {task.pk}: event #2: its hash was removed" in report
    assert "[unsealed]" in report
    assert "0 written before the chain" in report


def test_events_older_than_the_chain_stay_unverifiable_not_broken(user):
    task = completed(user)
    owner_sql("UPDATE audit_auditevent SET hash = '' WHERE task_id = %s", [task.pk])
    last = AuditEvent.objects.filter(task=task).order_by("-id").values_list("id", flat=True)[0]
    AuditChainStart.objects.all().delete()
    AuditChainStart.objects.create(unchained_through_id=last)
    newer = completed(user)
    out = verify("--all")
    assert f"{task.audit_seq} written before the chain" in out and "0 break(s)" in out
    assert "intact" in verify(str(newer.pk))


def test_a_cut_tail_is_found_by_the_anchors(user, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    task = completed(user)
    other = completed(user)
    anchor_now(anchors)
    count = task.audit_seq
    assert count >= 4
    # The owner deletes the last 3 events and lowers the task's count: the chain that
    # is left is consistent, so only the anchor can tell.
    owner_sql("DELETE FROM audit_auditevent WHERE task_id = %s AND seq > %s", [task.pk, count - 3])
    AgentTask.objects.filter(pk=task.pk).update(audit_seq=count - 3)
    assert "intact" in verify("--all")
    report = broken("--all", "--anchors", str(anchors))
    assert (
        f"task {task.pk}: event #{count}: anchored at" in report
        and f"the trail now ends at #{count - 3}" in report
        and "[cut]" in report
    )
    assert str(other.pk) not in report
    assert "1 anchored head(s) checked" in verify(str(other.pk), "--anchors", str(anchors))


def test_anchors_are_incremental_and_find_a_rewritten_head(user, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    first = completed(user)
    anchor_now(anchors)
    anchor_now(anchors)  # nothing new: no line
    second = completed(user)
    anchor_now(anchors)
    lines = anchors.read_text().splitlines()
    assert len(lines) == 2
    assert set(json.loads(lines[0])["heads"]) == {str(first.pk)}
    assert set(json.loads(lines[1])["heads"]) == {str(second.pk)}
    owner_sql(
        "UPDATE audit_auditevent SET hash = sha256(hash) WHERE task_id = %s AND seq = %s",
        [second.pk, second.audit_seq],
    )
    report = broken("--all", "--anchors", str(anchors))
    assert f"event #{second.audit_seq}: its hash is not the one anchored" in report
    assert "[rewritten]" in report and "[changed]" in report


def test_an_edited_anchor_line_is_named(user, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    task = completed(user)
    anchor_now(anchors)
    line = json.loads(anchors.read_text())
    line["heads"][str(task.pk)][0] = 1  # pretend the task had one event
    anchors.write_text(json.dumps(line) + "\n")
    report = broken("--all", "--anchors", str(anchors))
    assert "anchor log: line 1:" in report and "[forged-anchor]" in report


def test_events_younger_than_the_lag_wait_for_the_next_anchor(user):
    task = completed(user)
    assert anchor_make(after_id=0) is None  # just written: its transaction may be open
    later = anchor_make(after_id=0, now=timezone.now() + timedelta(minutes=1))
    assert later is not None and later["heads"][str(task.pk)][0] == task.audit_seq
    assert json.loads(anchor_line(later))["sig"] == later["sig"]


def test_the_key_rotates_without_breaking_older_events(user, settings, tmp_path):
    old, new = "old-audit-key-" + "o" * 32, "new-audit-key-" + "n" * 32
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": old}
    before = completed(user)
    anchors = tmp_path / "anchors.jsonl"
    anchor_now(anchors)
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": f"{new},{old}"}
    after = completed(user)
    assert "0 break(s)" in verify("--all", "--anchors", str(anchors))
    # The new key signs: the newer task verifies with it alone, the older does not.
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": new}
    assert "intact" in verify(str(after.pk))
    report = broken(str(before.pk), "--anchors", str(anchors))
    assert "does not match its hash (changed)" in report and "[forged-anchor]" in report


def test_the_configured_anchor_file_is_both_commands_default(user, settings, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    settings.AGENTS = {**settings.AGENTS, "AUDIT_ANCHOR_FILE": str(anchors)}
    task = completed(user)
    assert "0 anchored" not in verify("--all")  # no log yet: said, not a break
    call_command("audit_anchor", "--lag", "0", stdout=StringIO())
    assert "1 anchored head(s) checked" in verify("--all")
    owner_sql("DELETE FROM audit_auditevent WHERE task_id = %s AND seq > 1", [task.pk])
    AgentTask.objects.filter(pk=task.pk).update(audit_seq=1)
    assert "[cut]" in broken("--all")


def test_a_removed_anchor_line_is_named_and_log_lines_are_skipped(user, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    completed(user)
    anchor_now(anchors)
    completed(user)
    anchor_now(anchors)
    completed(user)
    anchor_now(anchors)
    first, second, third = anchors.read_text().splitlines()
    mixed = f"timestamp='x' level='info' event='a log line'\n{first}\n\n{second}\n{third}\n"
    anchors.write_text(mixed)
    assert "3 anchored head(s) checked" in verify("--all", "--anchors", str(anchors))
    anchors.write_text(f"{first}\n{third}\n")
    report = broken("--all", "--anchors", str(anchors))
    assert "anchor log: line 2: starts after event id" in report
    assert "(an anchor line was removed) [forged-anchor]" in report


def test_a_deployment_that_had_no_key_keeps_verifying_with_derived(user, settings):
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": ""}
    before = completed(user)  # signed with the key derived from DJANGO_SECRET_KEY
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": "a-new-audit-key-" + "k" * 32}
    assert "(changed)" in broken(str(before.pk))
    settings.AGENTS = {**settings.AGENTS, "AUDIT_KEY": "a-new-audit-key-" + "k" * 32 + ",derived"}
    after = completed(user)
    assert "0 break(s)" in verify("--all")
    assert "intact" in verify(str(after.pk))
