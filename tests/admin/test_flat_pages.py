"""Issue 24: the console's lists cost the same however many rows there are and however
deep the page: pages by key (no OFFSET), estimated or bounded counts (no COUNT(*) over
the table), an agent filter without SELECT DISTINCT, a search over indexes. Counted in
SQL statements and rows, never in time."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.models import AgentTask
from agents_project import admin_paging
from audit.models import AuditEvent, DeadLetter, EventType

pytestmark = pytest.mark.django_db

TASKS = "/admin/agents/agenttask/"
EVENTS = "/admin/audit/auditevent/"


def many_tasks(owner: Any, count: int, **fields: Any) -> list[AgentTask]:
    """``count`` finished tasks, newest first one second apart, with ties in
    ``created_at`` (every fifth shares its neighbour's time) that the id breaks."""
    now = timezone.now()
    rows = [
        AgentTask(
            owner=owner,
            agent_name="scripted",
            agent_version="1.0",
            input={},
            state_version=1,
            created_at=now - timedelta(seconds=i - i % 5 // 4),
            **{"status": "completed", **fields},
        )
        for i in range(count)
    ]
    AgentTask.objects.bulk_create(rows)
    return rows


def walk(client: Any, url: str) -> tuple[list[str], list[list[str]]]:
    """Follow the list's "next page" links from ``url``: the ids shown, in order, and
    the SQL of each page."""
    shown: list[str] = []
    statements: list[list[str]] = []
    while url:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        assert response.status_code == 200, response.content[:500]
        statements.append([q["sql"] for q in queries.captured_queries])
        cl = response.context["cl"]
        shown += [str(row.pk) for row in cl.result_list]
        url = (url.split("?")[0] + cl.next_page_url) if cl.next_page_url else ""
    return shown, statements


def data_statements(statements: list[str]) -> list[str]:
    """The statements that read the listed table (not the session, user or filters)."""
    return [s for s in statements if "agents_agenttask" in s or "audit_auditevent" in s]


def test_task_pages_follow_by_key_show_every_task_once_in_order(ops_client, user):
    many_tasks(user, 130)
    shown, statements = walk(ops_client, TASKS)
    expected = [
        str(pk)
        for pk in AgentTask.objects.order_by("-created_at", "-id").values_list("pk", flat=True)
    ]
    assert shown == expected
    assert len(statements) == 3  # 50 + 50 + 30
    for page in statements:
        for sql in data_statements(page):
            assert "OFFSET" not in sql.upper(), sql
            # Counting, if at all, stops at the bound: never the whole table.
            if "COUNT(" in sql.upper():
                assert "LIMIT" in sql.upper(), sql


def test_a_page_runs_as_many_statements_with_more_tasks_and_deeper(ops_client, user):
    many_tasks(user, 60)
    _, few = walk(ops_client, TASKS)
    many_tasks(user, 200)
    _, more = walk(ops_client, TASKS)
    counts = {len(page) for page in few + more}
    assert len(counts) == 1, [len(page) for page in few + more]


def test_the_count_is_the_planners_estimate_when_nothing_narrows_the_list(
    ops_client, user, monkeypatch
):
    monkeypatch.setattr(admin_paging, "COUNT_LIMIT", 20)
    many_tasks(user, 45)
    many_tasks(user, 5, status="failed", error="upstream connection refused")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_agenttask")
    cl = ops_client.get(TASKS).context["cl"]
    assert cl.count_text == "about 50"
    narrowed = ops_client.get(TASKS, {"status__exact": "completed"}).context["cl"]
    assert narrowed.count_text == "over 20"
    failed = ops_client.get(TASKS, {"status__exact": "failed"}).context["cl"]
    assert failed.count_text == "5"
    assert {t.status for t in failed.result_list} == {"failed"}


def test_the_agent_filter_lists_known_agents_without_reading_the_tasks(ops_client, user):
    many_tasks(user, 3)
    with CaptureQueriesContext(connection) as queries:
        response = ops_client.get(TASKS)
    choices = {
        choice["display"]
        for spec in response.context["cl"].filter_specs
        if spec.title == "agent"
        for choice in spec.choices(response.context["cl"])
    }
    assert {"scripted", "llm"} <= choices
    # The worker-version registry is read (a row per worker and agent), the tasks not.
    assert not [
        q["sql"]
        for q in queries.captured_queries
        if "DISTINCT" in q["sql"].upper() and "agents_agenttask" in q["sql"]
    ]
    only = ops_client.get(TASKS, {"agent_name__exact": "llm"}).context["cl"]
    assert list(only.result_list) == []


def test_error_search_finds_the_tasks_own_error_and_dead_letters_only(ops_client, user):
    own = many_tasks(user, 1, status="failed", error="upstream connection REFUSED")[0]
    lettered = many_tasks(user, 1, status="dead_lettered")[0]
    DeadLetter.objects.create(
        task=lettered, step=2, reason="retries_exhausted", error="connection refused by peer"
    )
    many_tasks(user, 4, error="timeout")
    cl = ops_client.get(TASKS, {"q": "error:refused"}).context["cl"]
    assert {row.pk for row in cl.result_list} == {own.pk, lettered.pk}
    assert cl.count_text == "2"


def test_a_search_reads_trigram_indexes_not_the_table(user):
    from agents.search import task_search

    many_tasks(user, 5, error="upstream connection refused")
    query = task_search(AgentTask.objects.all(), "error:refused").order_by()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        sql, params = query.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "agent_task_error_trgm" in plan, plan
    assert "dead_letter_error_trgm" in plan, plan


def test_audit_event_pages_follow_by_key(ops_client, user):
    tasks = many_tasks(user, 3)
    AuditEvent.objects.bulk_create(
        AuditEvent(task=task, seq=seq, type=EventType.STEP, payload={}, actor="test")
        for task in tasks
        for seq in range(1, 91)
    )
    shown, statements = walk(ops_client, EVENTS)
    assert shown == [
        str(pk) for pk in AuditEvent.objects.order_by("-id").values_list("pk", flat=True)
    ]
    assert len(statements) == 3  # 100 + 100 + 70
    assert len({len(page) for page in statements}) == 1
    for page in statements:
        for sql in data_statements(page):
            assert "OFFSET" not in sql.upper(), sql
    one, _ = walk(ops_client, f"{EVENTS}?q={tasks[1].pk}")
    seqs = list(
        AuditEvent.objects.filter(task=tasks[1]).order_by("seq").values_list("pk", flat=True)
    )
    assert one == [str(pk) for pk in seqs]


def test_a_bad_cursor_is_refused_not_a_server_error(ops_client, user):
    many_tasks(user, 3)
    response = ops_client.get(TASKS, {"after": "not-a-cursor"})
    # The admin's answer to a bad query parameter: back to the list, flagged.
    assert response.status_code == 302
    assert "e=1" in response["Location"]


def error_kinds(user: Any) -> set[Any]:
    """Tasks whose error says "refused" in each of the three places a search looks (the
    row, a dead letter, a failed attempt of a task waiting to retry), among others that
    do not; returns the ids of the first."""
    own = many_tasks(user, 3, status="failed", error="upstream connection REFUSED")
    lettered = many_tasks(user, 2, status="dead_lettered")
    for task in lettered:
        DeadLetter.objects.create(
            task=task, step=2, reason="retries_exhausted", error="connection refused by peer"
        )
    retrying = many_tasks(
        user, 1, status="running", retry_at=timezone.now() + timedelta(minutes=1), audit_seq=2
    )[0]
    AuditEvent.objects.bulk_create(
        [
            AuditEvent(task=retrying, seq=1, type=EventType.STEP, payload={}, actor="test"),
            AuditEvent(
                task=retrying,
                seq=2,
                type=EventType.STEP_FAILED,
                payload={"error": "ECONNREFUSED"},
                actor="test",
            ),
        ]
    )
    many_tasks(user, 6, error="timeout")
    quiet = many_tasks(user, 1, status="dead_lettered")[0]
    DeadLetter.objects.create(task=quiet, step=1, reason="retries_exhausted", error="timeout")
    return {t.pk for t in own + lettered + [retrying]}


def test_an_error_search_finds_the_same_tasks_walking_the_list_or_reading_the_matches(
    user, monkeypatch
):
    from agents import search

    expected = error_kinds(user)
    found = {}
    for walking in (False, True):
        monkeypatch.setattr(search, "walks", lambda matches, tasks, w=walking: w)
        for q in ("error:refused", "refused"):
            rows = search.task_search(AgentTask.objects.all(), q)
            found[walking, q] = set(rows.values_list("pk", flat=True))
    assert all(ids == expected for ids in found.values()), found


def test_a_common_error_search_walks_the_list_index_and_stops_after_a_page(user, monkeypatch):
    """Many matches: the page reads the (created_at, id) index in order and probes each
    task's dead letters by task id; no trigram index, no hashed set of every match."""
    from agents import search

    error_kinds(user)
    monkeypatch.setattr(search, "walks", lambda matches, tasks: True)
    page = search.task_search(AgentTask.objects.all(), "error:refused").order_by(
        "-created_at", "-id"
    )[:51]
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_sort = off")
        sql, params = page.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "agent_task_created" in plan, plan
    assert "trgm" not in plan and "hashed SubPlan" not in plan, plan


def test_walks_when_the_matches_make_a_page_cheaper_to_walk_than_to_read():
    from agents.search import walks

    assert not walks(None, 1_000_000) and not walks(5, None)
    assert not walks(200, 10_000) and walks(2_000, 10_000)
    assert not walks(2_000, 1_000_000) and walks(20_000, 1_000_000)


def test_a_search_matching_over_the_bound_shows_an_estimate_not_a_count(
    ops_client, user, monkeypatch
):
    monkeypatch.setattr(admin_paging, "COUNT_LIMIT", 4)
    expected = error_kinds(user)
    many_tasks(user, 60, status="failed", error="refused again")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_agenttask")
        cursor.execute("ANALYZE audit_deadletter")
    with CaptureQueriesContext(connection) as queries:
        cl = ops_client.get(TASKS, {"q": "error:refused"}).context["cl"]
    assert cl.count_text.startswith("about "), cl.count_text
    statements = data_statements([q["sql"] for q in queries.captured_queries])
    assert not [s for s in statements if "COUNT(" in s.upper()], statements
    again = set(AgentTask.objects.filter(error="refused again").values_list("pk", flat=True))
    matching = AgentTask.objects.filter(pk__in=expected | again).order_by("-created_at", "-id")
    shown, pages = walk(ops_client, f"{TASKS}?q=error:refused")
    assert shown == [str(pk) for pk in matching.values_list("pk", flat=True)]
    assert len(pages) == 2  # 50 + 16
