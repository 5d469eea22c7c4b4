"""How fast one page of a long audit trail comes back, from the database and the API.

    python benchmarks/audit_page.py [--events 10000] [--other-tasks 200] [--repeat 200]

Needs PostgreSQL (``DATABASE_URL``'s server; the benchmark creates and drops its own
database, ``agents_bench_audit``). It builds one task with ``--events`` audit events
among ``--other-tasks`` tasks of 500 events each (so the table is not just the one
task), then times, for pages near the start, the middle and the end of the trail:

  selector  ``audit.selectors.audit_events(task_id, after_seq)[:limit]``, rows fetched;
  API       ``GET /api/tasks/{id}/audit/?after=..&limit=..`` through Django's test
            client with a token: authentication, the query, serialization, JSON.

and the ``audit TASK_ID --json`` command streaming the whole trail. Figures are the
median and 95th percentile of ``--repeat`` runs, after a warm-up, in milliseconds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import django_on, fresh_database  # noqa: E402

django_on(
    "agents_bench_audit",
    # Thousands of timed requests from one user: not what the throttle is for.
    API_THROTTLE_RATE="100000000/minute",
)

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from agents.models import AgentTask  # noqa: E402
from audit.models import AuditEvent, EventType  # noqa: E402
from audit.selectors import audit_events  # noqa: E402


def task_with_events(owner, events: int) -> AgentTask:
    task = AgentTask.objects.create(
        owner=owner, agent_name="scripted", agent_version="1.0", input={}, state_version=1
    )
    batch = 5000
    for start in range(1, events + 1, batch):
        AuditEvent.objects.bulk_create(
            AuditEvent(
                task=task,
                seq=seq,
                type=EventType.TOOL_RESULT,
                step=seq // 4,
                payload={"tool": "calc", "ok": True, "value": seq, "duration_ms": 0.4},
                actor="worker:bench:1",
            )
            for seq in range(start, min(start + batch, events + 1))
        )
    AgentTask.objects.filter(pk=task.pk).update(audit_seq=events)
    task.refresh_from_db()
    return task


def timed(action: Callable[[], object], repeat: int) -> tuple[float, float]:
    for _ in range(5):
        action()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        runs.append((time.perf_counter() - started) * 1000)
    runs.sort()
    return statistics.median(runs), runs[int(len(runs) * 0.95) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--other-tasks", type=int, default=200)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    setup_test_environment()  # lets the test client's "testserver" host in
    fresh_database()
    owner = get_user_model().objects.create_user(username="bench")
    for _ in range(args.other_tasks):
        task_with_events(owner, 500)
    task = task_with_events(owner, args.events)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE audit_auditevent")
    total = AuditEvent.objects.count()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=owner).key}")

    print(
        f"audit trail of {args.events} events; {total} events in the table; pages of {args.limit}"
    )
    print()
    print("| page starting after seq | selector median / p95 ms | API median / p95 ms |")
    print("| ---: | ---: | ---: |")
    for after in (0, args.events // 2, args.events - args.limit):

        def select(after: int = after) -> object:
            return list(audit_events(task_id=task.pk, after_seq=after)[: args.limit])

        def request(after: int = after) -> object:
            response = client.get(
                f"/api/tasks/{task.pk}/audit/", {"after": after, "limit": args.limit}
            )
            assert response.status_code == 200, response.content[:200]
            return response

        db = timed(select, args.repeat)
        api = timed(request, args.repeat)
        print(f"| {after} | {db[0]:.2f} / {db[1]:.2f} | {api[0]:.2f} / {api[1]:.2f} |")

    started = time.perf_counter()
    out = io.StringIO()
    call_command("audit", str(task.pk), "--json", stdout=out)
    whole = (time.perf_counter() - started) * 1000
    print()
    print(f"`audit TASK_ID --json`, all {args.events} events: {whole:.0f} ms")
    with connection.cursor() as cursor:
        sql, params = audit_events(task_id=task.pk, after_seq=args.events // 2)[
            : args.limit
        ].query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        print("plan:", " / ".join(row[0].strip() for row in cursor.fetchall()))


if __name__ == "__main__":
    main()
