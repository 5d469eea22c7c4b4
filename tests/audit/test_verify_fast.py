"""Issue 24: ``audit_verify`` streams rows whose hashed bytes PostgreSQL writes (but the
payload's canonical JSON), derives each event's previous hash from the event before it
(no stored ``prev_hash``), and splits a long trail into seq ranges verified by several
processes. The hashed bytes are the sealing code's, byte for byte; the ranges find
what one walk finds."""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor

from agents.models import AgentTask
from audit import integrity
from audit.integrity import _content, _range_rows, _time, audit_chain_verify
from audit.models import AuditEvent, EventType
from audit.services import AuditBatch

pytestmark = pytest.mark.django_db(transaction=True)

PAYLOADS = [
    {},
    {"a": None, "b": [None, True, False], "c": {"z": 1, "a": {"y": [1.5, 0.0, -2]}}},
    {"unicode": "naïve 日本語 \U0001f600 \u2028", "quote": 'a "b" \\c /d', "ctl": "\x01\t\n\r\x7f"},
    {"floats": [1.0, 0.1, 1e300, 1e-7, 2.5e-310, 123456789.125, -3.75]},
    {"ints": [0, -1, 10**30, 2**63, 100, 7]},
    {"nested": [[[{"k": "v"}]], {"": ""}], "Ä": 1, "a": 2, "B": 3, "é": 4, "\U0001f600": 5},
    {"text": "x" * 3000},
]
ACTORS = ["worker:vm:1", 'user:o"hara\\', "user:\x01soh\x1ftab\tjp:日本", "system"]
TYPES = [EventType.TOOL_RESULT, 'custom\t"type"', EventType.STEP]


def task_with(events: list[tuple[str, dict, str, int | None]]) -> AgentTask:
    owner = get_user_model().objects.create_user(f"v{AgentTask.objects.count()}")
    task = AgentTask.objects.create(
        owner=owner, agent_name="scripted", agent_version="1.0", input={}, state_version=1
    )
    with transaction.atomic():
        locked = AgentTask.objects.select_for_update().get(pk=task.pk)
        batch = AuditBatch(locked, actor="worker:test:1")
        for type_, payload, actor, step in events:
            batch.add(type_, payload, actor=actor, step=step)
        batch.flush()
        locked.save(update_fields=["audit_seq"])
    task.refresh_from_db()
    return task


def test_the_bytes_postgresql_writes_are_the_ones_the_seal_hashed(user):
    """The hashed bytes of the old path (``_content``: Python objects through the
    canonical encoder) and of the fast one (PostgreSQL's tail, the payload's canonical
    text from jsonb) are identical, on varied payloads, actors and types."""
    events = [
        (TYPES[i % len(TYPES)], payload, ACTORS[i % len(ACTORS)], None if i % 2 else i)
        for i, payload in enumerate(PAYLOADS * 2)
    ]
    task = task_with(events)
    with connection.cursor() as cursor:
        fast = {seq: tail for _, seq, _, tail in _range_rows(cursor.cursor, task.pk, 0, 2**31)}
    stored = {e.seq: e for e in AuditEvent.objects.filter(task=task)}
    assert len(fast) == len(events)
    for seq, tail in fast.items():
        e = stored[seq]
        slow = _content(
            "ab" * 32, e.task_id, e.seq, e.type, e.step, e.actor, e.created_at, e.payload
        )
        assert f'["{"ab" * 32}"{tail}'.encode() == slow, (seq, tail)
    # Python values as written (before the jsonb round trip) hash the same too.
    for seq, (type_, payload, actor, step) in enumerate(events, start=1):
        e = stored[seq]
        slow = _content("", task.pk, seq, type_, step, actor, e.created_at, payload)
        assert f'[""{fast[seq]}'.encode() == slow
    breaks, verified, _ = audit_chain_verify(task_id=task.pk, audit_seq=task.audit_seq)
    assert breaks == [] and verified == len(events)


def test_times_are_written_as_the_seal_writes_them(user):
    task = task_with([(EventType.STEP, {}, "a", 1)] * 3)
    for at in (
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 0, 0, 10, tzinfo=timezone(timedelta(hours=5))),
        datetime(2026, 6, 1, 12, 0, 0, 120000, tzinfo=UTC),
        datetime(987, 6, 1, 0, 0, 0, 1, tzinfo=UTC),
    ):
        with connection.cursor() as cursor:
            cursor.execute("SELECT (%s::timestamptz AT TIME ZONE 'UTC')::text", [at])
            (text,) = cursor.fetchone()
        assert integrity._utc_time(text) == _time(at.astimezone(UTC)), text
    assert audit_chain_verify(task_id=task.pk, audit_seq=3)[0] == []


def tamper(sql: str, params: list) -> None:
    """As the table's owner could (an INSERT needs no trickery)."""
    with transaction.atomic(), connection.cursor() as cursor:
        if sql.startswith("INSERT"):
            cursor.execute(sql, params)
            return
        cursor.execute("ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only")
        cursor.execute(sql, params)
        cursor.execute("ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only")


def long_task() -> AgentTask:
    return task_with(
        [(EventType.TOOL_RESULT, {"n": n, "x": n * 1.5}, "worker:test:1", n) for n in range(40)]
    )


TAMPERING = {
    "intact": [],
    "edited at a range's start": [
        ("UPDATE audit_auditevent SET payload = '{\"n\": 0}' WHERE task_id = %s AND seq = 11", [])
    ],
    "deleted before a range": [
        ("DELETE FROM audit_auditevent WHERE task_id = %s AND seq = 10", [])
    ],
    "deleted across ranges": [
        ("DELETE FROM audit_auditevent WHERE task_id = %s AND seq BETWEEN 9 AND 12", [])
    ],
    "inserted by renumbering": [
        ("UPDATE audit_auditevent SET seq = seq + 1000 WHERE task_id = %s AND seq >= 21", []),
        ("UPDATE audit_auditevent SET seq = seq - 999 WHERE task_id = %s AND seq > 1000", []),
        (
            "INSERT INTO audit_auditevent (task_id, seq, type, step, payload, actor, created_at,"
            " hash) SELECT task_id, 21, type, step, '{}', actor, created_at, hash"
            " FROM audit_auditevent WHERE task_id = %s AND seq = 20",
            [],
        ),
    ],
    "hash emptied": [
        ("UPDATE audit_auditevent SET hash = NULL WHERE task_id = %s AND seq = 31", [])
    ],
    "tail cut": [("DELETE FROM audit_auditevent WHERE task_id = %s AND seq > 35", [])],
    "beyond the count": [
        (
            "INSERT INTO audit_auditevent (task_id, seq, type, step, payload, actor, created_at,"
            " hash) SELECT task_id, 41, type, step, payload, actor, created_at, hash"
            " FROM audit_auditevent WHERE task_id = %s AND seq = 40",
            [],
        )
    ],
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_ranges_verified_apart_find_what_one_walk_finds(monkeypatch, user, case):
    """Four processes, ranges of about ten events (boundaries at 11, 21, 31): the same
    breaks, in the same order, as one walk."""
    task = long_task()
    for sql, params in TAMPERING[case]:
        tamper(sql, [task.pk, *params])
    one = audit_chain_verify(task_id=task.pk, audit_seq=40, processes=1)
    monkeypatch.setattr(integrity, "PARALLEL_EVENTS", 20)
    apart = audit_chain_verify(task_id=task.pk, audit_seq=40, processes=4)
    assert integrity._ranges(40, 4) == [(0, 11), (11, 21), (21, 31), (31, 2**31)]
    assert apart == one
    assert (one[0] == []) == (case == "intact"), one[0]


def test_what_each_tampering_is_called(user):
    task = long_task()
    for sql, params in TAMPERING["inserted by renumbering"]:
        tamper(sql, [task.pk, *params])
    breaks = audit_chain_verify(task_id=task.pk, audit_seq=40)[0]
    # The forged #21 and every renumbered one after it (a seq is hashed), and the last
    # is beyond the count.
    assert [(b.seq, b.kind) for b in breaks] == [(s, "changed") for s in range(21, 41)] + [
        (41, "inserted"),
        (41, "changed"),
    ]
    other = long_task()
    tamper("DELETE FROM audit_auditevent WHERE task_id = %s AND seq = 5", [other.pk])
    breaks = audit_chain_verify(task_id=other.pk, audit_seq=40)[0]
    assert [(b.seq, b.kind) for b in breaks] == [(6, "removed"), (6, "removed")]
    assert "does not follow the event before it (removed)" in str(breaks[1])
    edited = long_task()
    tamper(
        "UPDATE audit_auditevent SET payload = %s WHERE task_id = %s AND seq = 7",
        [json.dumps({"n": 6, "x": 9.5}), edited.pk],
    )
    breaks = audit_chain_verify(task_id=edited.pk, audit_seq=40)[0]
    assert [(b.seq, b.kind) for b in breaks] == [(7, "changed")]


def migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def test_the_migration_drops_prev_hash_only_where_it_is_derivable(user, monkeypatch):
    """Backwards, ``audit.0010`` fills ``prev_hash`` from the predecessors; forwards, it
    refuses a trail whose ``prev_hash`` is not its predecessor's hash, unless forced."""
    tasks = [long_task(), long_task()]
    latest = MigrationExecutor(connection).loader.graph.leaf_nodes()
    try:
        migrate([("audit", "0009_growth_digest_bytes")])
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM (SELECT prev_hash, lag(hash) OVER (PARTITION BY task_id"
                " ORDER BY seq) AS before FROM audit_auditevent) e"
                " WHERE prev_hash IS DISTINCT FROM before"
            )
            assert cursor.fetchone() == (0,)
        tamper(
            "UPDATE audit_auditevent SET prev_hash = hash WHERE task_id = %s AND seq = 7",
            [tasks[1].pk],
        )
        with pytest.raises(RuntimeError, match=f"task {tasks[1].pk} event #7"):
            migrate(latest)
        monkeypatch.setenv("AGENTS_AUDIT_DROP_PREV_HASH", "force")
    finally:
        migrate(latest)
    assert audit_chain_verify(task_id=tasks[0].pk, audit_seq=40)[0] == []


@pytest.mark.parametrize("key", [b"", b"k", b"k" * 32, b"k" * 64, b"k" * 65, bytes(range(256))])
def test_the_verifiers_hmac_is_hmac_sha256(key):
    for message in (b"", b"x", "é".encode() * 500, bytes(range(256)) * 3):
        assert integrity.Mac(key).hexdigest(message) == hmac.digest(key, message, "sha256").hex()
