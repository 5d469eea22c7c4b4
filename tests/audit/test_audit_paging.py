"""Reading a long audit trail a page at a time: in order, by cursor, from the index.

The time per page is printed (``-s``), not asserted; ``benchmarks/audit_page.py``
measures it properly.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from django.core.management import call_command
from django.db import connection

from agents.models import AgentTask
from audit.models import AuditEvent, EventType
from audit.selectors import audit_events
from tests.api.conftest import token_client
from tests.api.factories import started

pytestmark = pytest.mark.django_db(transaction=True)

EVENTS = 10_000


def long_trail(user) -> AgentTask:
    task = started(user)
    first = task.audit_seq + 1
    AuditEvent.objects.bulk_create(
        AuditEvent(
            task=task,
            seq=seq,
            type=EventType.REASONING,
            step=seq // 10,
            payload={"text": f"thought {seq}"},
            actor="test",
        )
        for seq in range(first, first + EVENTS)
    )
    AgentTask.objects.filter(pk=task.pk).update(audit_seq=first + EVENTS - 1)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE audit_auditevent")
    task.refresh_from_db()
    return task


def test_a_page_deep_in_a_long_trail_comes_from_the_task_seq_index(user):
    task = long_trail(user)
    page = audit_events(task_id=task.pk, after_seq=9_000)[:100]
    with connection.cursor() as cursor:
        sql, params = page.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    # Each month partition's copy of audit_event_seq_per_task (audit.0011), merged in
    # order: no sort of the task's events.
    assert "_task_id_seq_created_at_key" in plan, plan
    assert "->  Sort" not in plan, plan
    assert [e.seq for e in page] == list(range(9_001, 9_101))


def test_the_api_pages_through_ten_thousand_events_in_order(user):
    task = long_trail(user)
    api = token_client(user)
    url, seen, timings = f"/api/tasks/{task.pk}/audit/?limit=1000", 0, []
    while url:
        started_at = time.perf_counter()
        body = api.get(url).json()
        timings.append(time.perf_counter() - started_at)
        assert [e["seq"] for e in body["results"]] == list(
            range(seen + 1, seen + 1 + len(body["results"]))
        )
        seen += len(body["results"])
        url = body["next"]
    assert seen == task.audit_seq
    deep = time.perf_counter()
    api.get(f"/api/tasks/{task.pk}/audit/", {"after": 9_900, "limit": 100})
    deep = time.perf_counter() - deep
    print(
        f"\naudit API, {task.audit_seq} events: 1000-event pages "
        f"{min(timings) * 1000:.1f}-{max(timings) * 1000:.1f} ms, "
        f"a 100-event page after seq 9900: {deep * 1000:.1f} ms"
    )


def test_the_audit_command_streams_the_whole_trail_as_json(user):
    task = long_trail(user)
    out = io.StringIO()
    call_command("audit", str(task.pk), "--json", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == task.audit_seq
    assert [json.loads(line)["seq"] for line in lines[:3]] == [1, 2, 3]
    assert json.loads(lines[-1])["payload"] == {"text": f"thought {task.audit_seq}"}
