"""Issue 24: audit hashes are stored as 32 bytes, and migration ``audit.0006`` converts
a database that already holds hex hashes without breaking a chain."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from agents.core.leases import lease_claim
from agents.models import AgentTask
from audit.models import AuditEvent
from tests.api.factories import completed, started

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [
    ("audit", "0005_audit_chain_start"),
    ("agents", "0009_task_swept_fence"),
    ("llm", "0001_initial"),
]


def migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def latest() -> list[tuple[str, str]]:
    executor = MigrationExecutor(connection)
    return executor.loader.graph.leaf_nodes()


def column(sql: str, params: list | None = None) -> list:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def test_hashes_are_stored_as_32_bytes_and_read_as_hex(user):
    task = completed(user)
    lengths = column(
        "SELECT octet_length(hash) FROM audit_auditevent WHERE task_id = %s", [task.pk]
    )
    assert lengths and set(lengths) == {32}
    events = list(AuditEvent.objects.filter(task=task).order_by("seq"))
    assert all(len(e.hash) == 64 and int(e.hash, 16) >= 0 for e in events)


def test_a_step_continues_the_chain_from_the_stored_head(user):
    """The claim reads the head's hash in SQL (``agents_step_before``): as hex, the
    form the next event's hash is sealed over."""
    task = started(user)
    claim = lease_claim(task_id=task.pk, step=1, owner="worker:test:1")
    head = AuditEvent.objects.get(task=task, seq=task.audit_seq)
    assert claim.audit_head == (task.audit_seq, head.hash)


def test_the_migration_converts_hex_hashes_and_the_chains_still_verify(user):
    tasks = [completed(user) for _ in range(2)]
    before = {(e.task_id, e.seq): e.hash for e in AuditEvent.objects.all()}
    try:
        migrate(BEFORE)
        # The old schema: hex text, "" for none.
        assert column(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'audit_auditevent' AND column_name = 'hash'"
        ) == ["character varying"]
        hexes = column("SELECT hash FROM audit_auditevent ORDER BY id")
        assert all(len(h) == 64 for h in hexes)
        # Migration audit.0010 put each event's prev_hash back: its predecessor's hash.
        assert column("SELECT count(*) FROM audit_auditevent WHERE prev_hash = ''") == [2]
        assert column(
            "SELECT count(*) FROM (SELECT prev_hash, lag(hash) OVER (PARTITION BY task_id"
            " ORDER BY seq) AS before FROM audit_auditevent) e WHERE prev_hash <> before"
        ) == [0]
    finally:
        migrate(latest())
    assert column("SELECT count(*) FROM audit_auditevent WHERE octet_length(hash) <> 32") == [0]
    after = {(e.task_id, e.seq): e.hash for e in AuditEvent.objects.all()}
    assert after == before
    out = StringIO()
    call_command("audit_verify", "--all", stdout=out, stderr=out)
    assert "0 break(s)" in out.getvalue()
    assert AgentTask.objects.filter(pk__in=[t.pk for t in tasks]).count() == 2


def test_the_created_event_records_the_inputs_digest_not_a_copy(user):
    from agents.core.intake import input_digest
    from agents.services import task_start

    script = {"script": [{"think": "a"}, {"final": {"n": 1.5, "text": "ünï"}}]}
    task, _ = task_start(owner=user, agent="scripted", input=script)
    created = AuditEvent.objects.get(task=task, seq=1)
    assert "input" not in created.payload
    assert created.payload["input_sha256"] == input_digest(task.input)
    assert input_digest(task.input) == input_digest(
        {"script": [{"think": "a"}, {"final": {"text": "ünï", "n": 1.5}}]}
    )
    assert input_digest(task.input) != input_digest({"script": [{"think": "b"}]})
